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
