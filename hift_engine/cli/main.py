"""Entry point of the ``hift`` console script."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import HiFTError
from . import bench, demo, env, train

__all__ = ["main", "entry", "build_parser"]

SUBCOMMANDS = (demo, train, bench, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hift", description="Hierarchical full-parameter fine-tuning (HiFT) engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(m.NAME for m in SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Exit codes: 0 done, 2 a usage or HiFTError error (one line on stderr, no
    traceback), 130 interrupted (Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides, args.argv = extra, argv
    # The engine's warnings and notes ("hift_engine" logger) as "hift <command>: ..." lines on stderr.
    logger = logging.getLogger("hift_engine")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"hift {args.command}: %(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    if old_level == logging.NOTSET or old_level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        rc = int(args.func(args) or 0)
    except HiFTError as e:  # expected, user-facing errors: one clear line, no traceback
        print(f"hift {args.command}: error: {e}", file=sys.stderr)
        rc = 2
    except KeyboardInterrupt:
        print(f"hift {args.command}: interrupted", file=sys.stderr)
        rc = 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return rc


def entry() -> None:
    """The ``hift`` console script and ``python -m hift_engine.cli.main``: run, then exit with main's code.
    After a gloo process group ran in this process, leave with os._exit: its exit could abort in C++ static
    destructors after all work was done (torchrun then reported a finished run as failed). Only here, never in
    main(), which Python callers use as a function."""
    from ..recipe.ranks import leave_without_destructors

    rc = main()
    if leave_without_destructors():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
