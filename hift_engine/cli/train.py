"""``hift train``: fine-tune a causal LM (built-in tiny model or a local Hugging Face directory) with HiFT.

    hift train --config configs/tiny.yaml --lr 1e-3 --layers_per_group 2 --steps 100
    hift train --config configs/tiny.yaml --resume            # continue from the latest checkpoint
    hift train --config configs/tiny.yaml --overwrite         # start over in a used output directory

Any option of the config (see configs/*.yaml) can be overridden as --name VALUE or --section.name VALUE;
values are type-checked against the schema and unknown names are errors.
"""

from __future__ import annotations

import json
import shlex
import sys

NAME = "train"


def register(sub) -> None:
    p = sub.add_parser(NAME, help="fine-tune a model with HiFT from a config file", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML or TOML config (defaults: the built-in tiny model and task)")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest checkpoint in the output directory, or from the given checkpoint")
    p.add_argument("--resume-fallback", "--resume_fallback", action="store_true",
                   help="with --resume: if the newest checkpoint does not load, resume from the newest one that "
                        "does (each skipped checkpoint is named in a warning); without it that is an error")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a used output directory: deletes the previous run's files (config.json, "
                        "log.jsonl, training.png, checkpoints/, final/) once the new run has loaded; others stay")
    p.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--print-config", "--print_config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run, accepts_overrides=True)


def parse_overrides(extra: list[str]) -> dict[str, str]:
    """['--lr', '1e-5', '--steps=3'] -> {'lr': '1e-5', 'steps': '3'}; anything else is an error."""
    from ..errors import ConfigError

    out, i = {}, 0
    while i < len(extra):
        tok = extra[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}; overrides look like --name VALUE")
        key = tok[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"option {tok} needs a value")
            value = extra[i + 1]
            i += 2
        out[key] = value
    return out


def resume_command(argv: list[str], resume) -> str:
    """The ``hift train`` command line that continues this run: ``argv`` without --overwrite or --resume
    [PATH], plus --resume."""
    kept, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--overwrite" or tok.startswith("--resume="):
            i += 1
            continue
        if tok == "--resume":
            i += 2 if resume is not True and i + 1 < len(argv) and argv[i + 1] == str(resume) else 1
            continue
        kept.append(tok)
        i += 1
    return "hift " + shlex.join(kept + ["--resume"])


def run(args) -> int:
    from ..recipe import load_run_config, train
    from ..recipe.loop import TrainingInterrupted

    cfg = load_run_config(args.config, parse_overrides(getattr(args, "overrides", [])))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1, default=str))
        return 0
    try:
        summary = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                        resume_fallback=args.resume_fallback)
    except TrainingInterrupted as e:
        argv = getattr(args, "argv", None) or ["train"]
        if e.checkpoint is not None:
            print(f"hift train: interrupted after step {e.step}; last checkpoint {e.checkpoint} (steps after it are "
                  f"trained again); continue with: {resume_command(argv, args.resume)}", file=sys.stderr)
        else:
            restart = resume_command(argv, args.resume).removesuffix(" --resume") + " --overwrite"
            print(f"hift train: interrupted after step {e.step}, before the first checkpoint (train.save_every="
                  f"{cfg.train.save_every}); nothing to resume, start again with: {restart}", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=1))
    return 0
