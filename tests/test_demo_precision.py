"""The issue's quality target on the demo: bf16-mixed ends within 2% of fp32 (same seed, same steps), run on the CPU
(torch's CPU kernels run bf16; the model's matmuls, residual stream and logits are bf16, the masters fp32).

Measured on the text task at its defaults (800 steps), where it can be measured: there a one-in-a-million nudge of
fp32's initial weights moves the held-out loss by well under 1%, which this test checks too, so a 2% difference means
the precision and not luck. On the arithmetic task the same nudge moves the final loss by 5-95%
(benchmarks/demo_precision.py), so no 2% claim can be tested there (README, "Demo").
"""

import pytest

from hift_engine.demo import run_demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def text_runs():
    runs = {
        name: run_demo(task="text", seed=0, precision=precision, init_noise=noise, printer=None)
        for name, precision, noise in (("fp32", "fp32", 0.0), ("fp32+1e-6", "fp32", 1e-6), ("bf16-mixed", "bf16-mixed", 0.0))
    }
    return runs


def test_text_demo_is_a_fair_judge_of_two_percent(text_runs):
    fp32, nudged = text_runs["fp32"].eval_loss, text_runs["fp32+1e-6"].eval_loss
    assert fp32 < 0.5 * text_runs["fp32"].eval_loss_before  # it trained
    assert abs(nudged / fp32 - 1) < 0.005  # the control: a 1e-6 nudge moves the held-out loss < 0.5%


def test_text_demo_bf16_mixed_within_two_percent_of_fp32(text_runs):
    fp32, bf16 = text_runs["fp32"], text_runs["bf16-mixed"]
    assert bf16.losses != fp32.losses  # really ran in another precision
    assert abs(bf16.eval_loss / fp32.eval_loss - 1) < 0.02
    # the mean train loss of the last 100 steps, the other reading of "final loss"
    assert abs(sum(bf16.losses[-100:]) / sum(fp32.losses[-100:]) - 1) < 0.02
