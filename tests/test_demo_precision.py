"""The issue's quality target on the demo: bf16-mixed ends within 2% of fp32 (same seed, same steps), run on the CPU
(torch's CPU kernels run bf16; the model's matmuls, residual stream and logits are bf16, the masters fp32).

Measured on the text task at its defaults (800 steps), where it can be measured: there a one-in-a-million nudge of
fp32's initial weights moves the held-out loss by well under 1%, which this test checks too (on the arithmetic task the
same nudge moves the final loss by 5-95%, so no 2% claim can be tested there; README, "Demo: quality of bf16-mixed").
bf16-mixed runs spread more than fp32 ones (a nudged one ended 3% from fp32 on another seed), so this checks what
bf16-mixed typically does, not a bound on every run.

What this test does not guard: that the masters matter. Pure bf16 weights (no masters) end within about 2% here too,
because at lr 1e-3 most updates exceed half a bf16 step of the weight; tests/test_precision.py shows the masters'
effect where it is large (lr 1e-5: pure bf16 loses most updates, bf16-mixed tracks fp32).
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
    # it trained past a model that knows only byte frequencies: the best such model scores 3.03 on these bytes
    assert fp32 < 2.9 < 0.55 * text_runs["fp32"].eval_loss_before
    assert abs(nudged / fp32 - 1) < 0.005  # the control: a 1e-6 nudge moves the held-out loss < 0.5%


def test_text_demo_bf16_mixed_within_two_percent_of_fp32(text_runs):
    fp32, bf16 = text_runs["fp32"], text_runs["bf16-mixed"]
    # Really computed in bf16: the first loss (same weights, same batch, before any update) differs by a bf16
    # rounding's worth, not by one float32 ulp and not by a different model.
    first = abs(bf16.losses[0] / fp32.losses[0] - 1)
    assert 1e-5 < first < 1e-2
    assert abs(bf16.eval_loss / fp32.eval_loss - 1) < 0.02
    # the mean train loss of the last 100 steps, the other reading of "final loss"
    assert abs(sum(bf16.losses[-100:]) / sum(fp32.losses[-100:]) - 1) < 0.02
