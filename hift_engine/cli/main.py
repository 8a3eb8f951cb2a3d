"""Entry point of the ``hift`` console script."""

from __future__ import annotations

import argparse
import sys

from ..errors import HiFTError
from . import bench, demo, env, train

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (demo, train, bench, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hift", description="Hierarchical full-parameter fine-tuning (HiFT) engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(m.NAME for m in SUBCOMMANDS) + "}")
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except HiFTError as e:  # expected, user-facing errors: one clear line, no traceback
        print(f"hift {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
