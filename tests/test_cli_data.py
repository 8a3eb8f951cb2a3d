"""`hift train` data: examples longer than data.max_length are truncated, dropped or refused as the user
chooses (data.overlong), and the counts are reported."""

import json

import pytest

from hift_engine import ConfigError
from hift_engine.recipe import RunConfig
from hift_engine.recipe.data import ByteTokenizer, encode_examples

EXAMPLES = [{"prompt": "1+1=", "response": "2;"},                 # 4 + 2 + eos = 7 tokens
            {"prompt": "12+34=", "response": "46, a long answer;"},  # 6 + 18 + 1 = 25 tokens
            {"prompt": "a very long prompt indeed=", "response": "x;"}]  # no response token within 16


@pytest.mark.parametrize("overlong, used, truncated, dropped", [("truncate", 2, 1, 1), ("drop", 1, 0, 2)])
def test_overlong_examples_are_counted(overlong, used, truncated, dropped):
    enc = encode_examples(EXAMPLES, ByteTokenizer(), 16, overlong)
    assert enc.summary() == {"examples": 3, "used": used, "overlong": 2, "truncated": truncated, "dropped": dropped}
    assert all(len(ids) <= 16 for ids, _ in enc.rows)


def test_overlong_error_names_the_example_and_the_fix():
    with pytest.raises(ConfigError, match=r"example 2 is 25 tokens, longer than data.max_length=16.*raise data.max_length"):
        encode_examples(EXAMPLES, ByteTokenizer(), 16, "error")
    with pytest.raises(ConfigError, match="data.overlong must be one of"):
        RunConfig().apply_overrides({"overlong": "clip"})


def test_the_run_reports_overlong_examples(tmp_path, hift_train):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 4))
    rc, stdout, err = hift_train("--data", data, "--steps", "2")
    assert rc == 0, err
    assert json.loads(stdout)["data"] == {"examples": 12, "used": 8, "overlong": 8, "truncated": 4, "dropped": 4}
    assert "data: 8 of 12 examples longer than data.max_length=16 (data.overlong=truncate): 4 truncated, 4 dropped" in err
    rc, _, err = hift_train("--data", data, "--overlong", "error", "--output_dir", tmp_path / "run2")
    assert rc == 2 and "example 2 is 25 tokens" in err
