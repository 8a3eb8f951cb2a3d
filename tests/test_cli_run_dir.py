"""`hift train` and its output directory: a new run never mixes with an old one, a failed start changes
nothing, and --resume never silently skips a damaged checkpoint."""

import json
import os

import pytest

from hift_engine.checkpoint import list_checkpoints


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_new_run_in_a_used_output_dir_is_refused(tmp_path, hift_train):
    out = tmp_path / "run"
    assert hift_train()[0] == 0
    before = _files(out)
    rc, _, err = hift_train("--lr", "1e-3", "--steps", "6")
    assert rc == 2 and err.count("\n") == 1
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert _files(out) == before


def test_overwrite_clears_only_the_previous_runs_files(tmp_path, hift_train):
    out = tmp_path / "run"
    assert hift_train("--save_every", "2")[0] == 0
    (out / "notes.txt").write_text("mine")
    rc, stdout, err = hift_train("--steps", "3", "--overwrite")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert os.path.isdir(summary["checkpoint"])
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [os.path.basename(summary["checkpoint"])]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3
    assert (out / "notes.txt").read_text() == "mine"
    rc, _, err = hift_train("--overwrite", "--resume")
    assert rc == 2 and "--overwrite" in err and "--resume" in err


@pytest.mark.parametrize("bad", [["--data", "missing.jsonl"], ["--path", "no/such/model"], ["--tiny_layers", "3"]],
                         ids=["missing-data", "bad-model-path", "checkpoint-mismatch"])
def test_a_failed_start_leaves_the_previous_run_untouched(tmp_path, hift_train, bad):
    out = tmp_path / "run"
    assert hift_train()[0] == 0
    before = _files(out)
    for mode in ("--resume",) if "--tiny_layers" in bad else ("--resume", "--overwrite"):
        rc, _, err = hift_train(*bad, mode)
        assert rc == 2 and err.count("\n") == 1, err
        assert _files(out) == before


def test_nothing_to_resume_writes_nothing(tmp_path, hift_train):
    rc, _, err = hift_train("--resume")
    assert rc == 2 and "nothing to resume" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.fixture
def damaged_run(tmp_path, hift_train):
    """A run with checkpoints at steps 2 and 4 (the newest to be damaged by the test)."""
    assert hift_train("--save_every", "2", "--keep_last", "3")[0] == 0
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ckpts) == 2
    return ckpts


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated-group-file", "deleted-manifest"])
def test_resume_refuses_a_damaged_latest_checkpoint_and_falls_back_only_when_asked(hift_train, damaged_run, damage):
    older, newest = damaged_run
    if damage == "truncated-group-file":
        bad_file = sorted((newest / "optim").iterdir())[1]
        _truncate(bad_file)
    else:
        bad_file = newest / "manifest.json"
        bad_file.unlink()
    rc, _, err = hift_train("--resume")
    assert rc == 2 and err.count("\n") == 1, err
    assert str(newest) in err and "--resume-fallback" in err
    if damage == "truncated-group-file":
        assert bad_file.name in err

    rc, stdout, err = hift_train("--resume", "--resume-fallback")
    assert rc == 0, err
    assert json.loads(stdout)["resumed_from"] == 2
    assert f"skipped {newest}" in err and str(older) in err


def test_extending_a_finished_run_continues_the_schedule(tmp_path, hift_train):
    out = tmp_path / "run"
    assert hift_train("--schedule", "linear")[0] == 0
    rc, stdout, err = hift_train("--schedule", "linear", "--steps", "8", "--resume")
    assert rc == 0, err
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8))
    lrs = [r["lr"] for r in rows]
    assert all(lr > 0 for lr in lrs[:-1]) and lrs == sorted(lrs, reverse=True)
