"""`hift train`: config files, type-checked overrides, an end-to-end run with logs/checkpoint/plot, resume."""

import json

import pytest

from hift_engine import ConfigError
from hift_engine.cli.main import main
from hift_engine.cli.train import parse_overrides
from hift_engine.recipe import RunConfig, load_run_config


def test_overrides_are_type_checked_against_the_schema():
    cfg = RunConfig()
    cfg.apply_overrides({"lr": "1e-4", "layers_per_group": "2", "train.steps": "7", "per_step": "yes", "max_grad_norm": "0.5"})
    assert (cfg.optimizer.lr, cfg.optimizer.layers_per_group, cfg.train.steps) == (1e-4, 2, 7)
    assert cfg.schedule.per_step is True and cfg.optimizer.max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="layers_per_group must be an integer >= 1 .units per group. or 'auto', got 'two'"):
        RunConfig().apply_overrides({"layers_per_group": "two"})
    with pytest.raises(ConfigError, match="unknown option --layer_per_group.*did you mean 'layers_per_group'"):
        RunConfig().apply_overrides({"layer_per_group": "2"})
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        RunConfig().apply_overrides({"steps": "0"})
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig().apply_overrides({"strategy": "sideways"})


def test_parse_overrides():
    assert parse_overrides(["--lr", "1e-5", "--steps=3"]) == {"lr": "1e-5", "steps": "3"}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["lr", "3"])


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_files_and_unknown_keys(tmp_path, suffix):
    if suffix == ".yaml":
        good = "# hift train --config x.yaml\ntrain:\n  steps: 5\noptimizer:\n  lr: 0.001\n"
        bad = "train:\n  stepz: 5\n"
    else:
        good = "# hift train --config x.toml\n[train]\nsteps = 5\n[optimizer]\nlr = 0.001\n"
        bad = "[train]\nstepz = 5\n"
    f = tmp_path / f"c{suffix}"
    f.write_text(good)
    cfg = load_run_config(f)
    assert cfg.train.steps == 5 and cfg.optimizer.lr == 0.001
    f.write_text(bad)
    with pytest.raises(ConfigError, match="unknown option train.stepz.*did you mean 'steps'"):
        load_run_config(f)
    f.write_text("train: [1, 2\n" if suffix == ".yaml" else "[train\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_run_config(f)


def test_example_configs_load():
    for name in ("configs/tiny.yaml", "configs/llama2-7b-fp32-48gb.yaml"):
        first = open(name).readline()
        assert first.startswith("# hift train --config " + name)
        load_run_config(name)


def _jsonl(tmp_path):
    f = tmp_path / "data.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "response": f"{a + b};"} for a in range(10) for b in range(10)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f


def test_end_to_end_run_writes_logs_checkpoint_plot_and_resumes_exactly(tmp_path, capsys):
    data = _jsonl(tmp_path)
    out = tmp_path / "run"
    common = ["train", "--no-progress", "--data", str(data), "--output_dir", str(out), "--steps", "16",
              "--batch_size", "8", "--log_every", "1", "--save_every", "8", "--strategy", "random", "--max_length", "16"]
    assert main(common) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 16 and summary["resumed_from"] == 0 and summary["last_loss"] < summary["first_loss"]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(16))
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"loss", "group", "lr", "tokens_per_s", "memory_mib"} <= set(log[0])
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "final" / "config.json").is_file()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["ckpt-00000008", "ckpt-00000016"]

    # resume from step 8 (as after a crash): the tail of the log must repeat exactly
    import shutil

    shutil.rmtree(out / "checkpoints" / "ckpt-00000016")
    assert main(common + ["--resume"]) == 0
    resumed = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(16))
    assert [r["loss"] for r in resumed[8:]] == [r["loss"] for r in log[8:]]


def test_prompt_tokens_are_masked():
    from hift_engine.recipe.data import IGNORE, ByteTokenizer, encode_examples

    (ids, labels), = encode_examples([{"prompt": "2+2=", "response": "4;"}], ByteTokenizer(), 32).rows
    assert labels[:4] == [IGNORE] * 4 and labels[4:] == ids[4:] and ids[-1] == ByteTokenizer.eos_token_id


def test_bad_data_files_name_the_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "response": "b"}\n{"question": "x"}\n')
    from hift_engine.recipe.data import load_examples

    cfg = RunConfig()
    cfg.data.data = str(f)
    with pytest.raises(ConfigError, match=r"d.jsonl:2: needs 'prompt' and 'response', or 'text'"):
        load_examples(cfg.data)
    f.write_text("not json\n")
    with pytest.raises(ConfigError, match=r"d.jsonl:1: not valid JSON"):
        load_examples(cfg.data)


def test_plain_text_data(tmp_path):
    f = tmp_path / "d.txt"
    f.write_text("first paragraph\n\nsecond one\n")
    from hift_engine.recipe.data import load_examples

    cfg = RunConfig()
    cfg.data.data = str(f)
    assert load_examples(cfg.data) == [{"text": "first paragraph"}, {"text": "second one"}]


def test_list_valued_options_parse_json_from_the_command_line(capsys):
    groups = '[["embedding", "model.layers.0"], ["model.layers.1", "head"]]'
    cfg = RunConfig().apply_overrides({"no_decay": '[".*bias"]', "freeze": '["embedding"]', "groups": groups,
                                       "weight_decay": "null", "optimizer_kwargs": '{"betas": [0.9, 0.95]}'})
    assert cfg.optimizer.no_decay == (".*bias",) and cfg.optimizer.freeze == ("embedding",)
    assert cfg.optimizer.groups == [("embedding", "model.layers.0"), ("model.layers.1", "head")]
    assert cfg.optimizer.weight_decay is None and cfg.optimizer.optimizer_kwargs == {"betas": [0.9, 0.95]}
    cfg = RunConfig().apply_overrides({"freeze": "embedding", "no_decay": "[]"})
    assert cfg.optimizer.no_decay == () and cfg.optimizer.freeze == ("embedding",)
    assert RunConfig().apply_overrides({"no_decay": "auto"}).optimizer.no_decay == "auto"
    assert RunConfig().apply_overrides({"weight_decay": "0.1"}).optimizer.weight_decay == 0.1
    with pytest.raises(ConfigError, match=r"--freeze: cannot parse '\[\"embedding\"' as a JSON list"):
        RunConfig().apply_overrides({"freeze": '["embedding"'})
    # end to end through the command line
    assert main(["train", "--print-config", "--no_decay", '[".*bias", "norm"]', "--freeze", "[]"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizer"]["no_decay"] == [".*bias", "norm"] and printed["optimizer"]["freeze"] == []
