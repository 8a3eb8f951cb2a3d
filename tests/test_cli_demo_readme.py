"""`hift demo` takes both option spellings, and the README's plain-loop quickstart runs on a CPU."""

import re
from pathlib import Path

import torch

from tests.helpers import tiny_llama


def test_demo_takes_both_spellings():
    from hift_engine.cli.main import build_parser

    for spelling in ("_", "-"):
        args = build_parser().parse_args(["demo", f"--layers{spelling}per{spelling}group", "2", f"--batch{spelling}size",
                                          "4", f"--log{spelling}every", "5"])
        assert (args.layers_per_group, args.batch_size, args.log_every) == (2, 4, 5)


def test_readme_plain_loop_quickstart_runs_on_this_machine():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Quickstart: a plain training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    namespace = {"model": model, "loader": [{"input_ids": ids, "labels": ids}] * 3}
    exec(compile(code, "README.md (plain-loop quickstart)", "exec"), namespace)
    assert namespace["opt"].global_step == 3
