"""The built-in demo runs and learns (a short version of `hift demo`)."""

from hift_engine.cli.main import main
from hift_engine.demo import run_demo


def test_demo_loss_falls_and_visits_every_group():
    result = run_demo(steps=160, batch_size=32, eval_problems=20, printer=None)
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.6 * first
    assert sorted(set(result.groups)) == list(range(result.num_groups))


def test_hift_demo_cli_runs(capsys):
    assert main(["demo", "--steps", "8", "--batch-size", "4", "--log-every", "4"]) == 0
    out = capsys.readouterr().out
    assert "summary: loss" in out and "group" in out


def test_demo_equals_a_block_coordinate_loop_of_torch_adamw():
    """The engine on the demo is exactly HiFT's algorithm: one torch.optim.AdamW per group, one group updated per
    step in bottom-up order, the learning rate advancing once per cycle; losses equal bit for bit."""
    import math
    import random

    import torch

    from hift_engine.demo.run import tiny_llama
    from hift_engine.demo.task import ArithmeticTask

    steps, lr, batch = 96, 3e-3, 32
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    named = dict(model.named_parameters())
    groups = [[p for n, p in named.items() if key(n)] for key in (
        lambda n: "embed_tokens" in n, lambda n: ".layers.0." in n, lambda n: ".layers.1." in n,
        lambda n: n in ("model.norm.weight", "lm_head.weight"))]
    assert sum(map(len, groups)) == len(named)
    opts = [torch.optim.AdamW(g, lr=lr, weight_decay=0.0) for g in groups]
    task, rng, losses = ArithmeticTask(), random.Random(0), []
    for step in range(steps):
        active = step % len(groups)
        for i, g in enumerate(groups):
            for p in g:
                p.requires_grad_(i == active)
        cycle_start = step - step % len(groups)  # the delayed schedule: constant within a cycle
        opts[active].param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * cycle_start / steps))
        loss = model(**task.batch(rng, batch)).loss
        loss.backward()
        opts[active].step()
        opts[active].zero_grad(set_to_none=True)
        losses.append(loss.item())
    result = run_demo(steps=steps, lr=lr, batch_size=batch, eval_problems=1, printer=None)
    assert result.groups[:8] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert result.losses == losses


def test_init_noise_nudges_the_initial_weights_reproducibly():
    base = run_demo(steps=2, batch_size=8, eval_problems=1, printer=None)
    nudged = [run_demo(steps=2, batch_size=8, eval_problems=1, printer=None, init_noise=1e-3) for _ in range(2)]
    assert nudged[0].losses == nudged[1].losses  # a fixed noise seed
    assert nudged[0].losses[0] != base.losses[0]
    assert abs(nudged[0].losses[0] - base.losses[0]) < 1e-2 * base.losses[0]


def test_text_task_scores_held_out_bytes_and_learns():
    result = run_demo(task="text", steps=40, printer=None)
    assert result.task == "text" and result.eval_loss_before is not None
    assert result.eval_loss < 0.85 * result.eval_loss_before  # ln(256) = 5.5 at the start
    # 40 steps learn little more than the commonest byte (a space: 30% of the held-out bytes); the 800-step runs of
    # tests/test_demo_precision.py check that it learns past what byte frequencies alone give
    assert result.accuracy > result.accuracy_before + 0.1
    assert sorted(set(result.groups)) == list(range(result.num_groups))


def test_unknown_demo_task_is_refused():
    import pytest

    with pytest.raises(ValueError, match="task must be one of"):
        run_demo(task="poetry", printer=None)


def test_hift_demo_cli_runs_the_text_task(capsys):
    assert main(["demo", "--task", "text", "--steps", "4", "--batch-size", "2", "--log-every", "2"]) == 0
    assert "held-out loss" in capsys.readouterr().out


def test_text_task_without_stdlib_sources_says_what_to_do(monkeypatch):
    """A Python install shipped without its .py files cannot give the text task its corpus: a ConfigError (one line
    from the CLI) naming the arithmetic task instead, not a traceback about a benchmark."""
    import pytest

    from hift_engine.demo import text
    from hift_engine.errors import ConfigError

    def no_sources(**_):
        raise RuntimeError("found no Python source of the standard library in /nowhere")

    monkeypatch.setattr(text, "load_corpus", no_sources)
    with pytest.raises(ConfigError, match="--task arithmetic"):
        run_demo(task="text", steps=1, printer=None)
