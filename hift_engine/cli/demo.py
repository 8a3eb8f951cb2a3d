"""``hift demo``: train a tiny LLaMA with HiFT AdamW on a built-in task (about 30 s on a 2-core CPU).

Tasks: ``arithmetic`` (default; "a+b=" problems, scored by exact-match accuracy) and ``text`` (next-byte prediction on
Python's email package source, scored by held-out loss and next-byte accuracy). --steps, --batch-size and --lr default
to the task's own settings (hift_engine.demo.run.TASK_DEFAULTS)."""

from __future__ import annotations

from ..demo.run import TASK_DEFAULTS, TASKS

NAME = "demo"


def _per_task(name: str) -> str:
    return ", ".join(f"{getattr(d, name)} for {task}" for task, d in TASK_DEFAULTS.items())


def register(sub) -> None:
    p = sub.add_parser(NAME, help="train a tiny model on a built-in task (CPU-friendly)", description=__doc__)
    p.add_argument("--task", default="arithmetic", choices=TASKS, help="the built-in task (default arithmetic)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default: {_per_task('steps')})")
    # Both spellings, as hift train takes them: --layers-per-group and --layers_per_group.
    p.add_argument("--batch-size", "--batch_size", type=int, default=None, help=f"default: {_per_task('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"default: {_per_task('lr')}")
    p.add_argument("--layers-per-group", "--layers_per_group", type=int, default=1)
    p.add_argument("--strategy", default="bottom2up", choices=("bottom2up", "top2down", "random"))
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", "--log_every", type=int, default=100)
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16-mixed", "fp16-mixed"))
    p.add_argument("--state-dtype", "--state_dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: AdamW's moments in bf16 (stochastic rounding)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo

    if (args.steps is not None and args.steps < 1) or (args.batch_size is not None and args.batch_size < 1):
        raise SystemExit("hift demo: --steps and --batch-size must be >= 1")
    run_demo(
        task=args.task,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        layers_per_group=args.layers_per_group,
        strategy=args.strategy,
        device=args.device,
        seed=args.seed,
        log_every=args.log_every,
        precision=args.precision,
        state_dtype=args.state_dtype,
    )
    return 0
