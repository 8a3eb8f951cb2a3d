"""`hift train` errors are one line with what to do (exit code 2); Ctrl-C is one line with the resume command
(exit code 130); the data file is checked before the model is loaded."""

import json
import shlex


from hift_engine.cli.main import main
from tests.conftest import TINY_TRAIN


def _hf_model_dir(path, tokenizer=True):
    """A tiny Hugging Face LLaMA directory (weights, config, and a character-level fast tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path)
    if tokenizer:
        vocab = {"<unk>": 0, "</s>": 1, **{chr(i): i for i in range(32, 127)}}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return path


def _one_line_error(rc, err):
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("hift train: error: "), err


def test_a_working_hf_model_dir_trains(tmp_path, hift_train):
    model = _hf_model_dir(tmp_path / "model")
    rc, _, err = hift_train("--path", model, "--steps", "2")
    assert rc == 0, err


def test_truncated_weights_are_one_line(tmp_path, hift_train):
    model = _hf_model_dir(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    rc, _, err = hift_train("--path", model)
    _one_line_error(rc, err)
    assert "cannot load the model" in err and "SafetensorError" in err and "download the model again" in err


def test_missing_tokenizer_files_are_one_line(tmp_path, hift_train):
    model = _hf_model_dir(tmp_path / "model", tokenizer=False)
    rc, _, err = hift_train("--path", model)
    _one_line_error(rc, err)
    assert "cannot load the tokenizer" in err and "tokenizer.json" in err


def test_missing_data_file_is_reported_before_the_model_loads(tmp_path, hift_train, monkeypatch):
    import hift_engine.recipe.loop as loop

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(loop, "build_model", no_model)
    rc, _, err = hift_train("--data", tmp_path / "missing.jsonl")
    _one_line_error(rc, err)
    assert "missing.jsonl does not exist" in err


def _interrupt_at(monkeypatch, at_step):
    from hift_engine.recipe.data import Batches

    real = Batches.get

    def get(self, step, micro, device):
        if step == at_step:
            raise KeyboardInterrupt
        return real(self, step, micro, device)

    monkeypatch.setattr(Batches, "get", get)


def test_ctrl_c_prints_the_last_checkpoint_and_the_resume_command(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["train", *TINY_TRAIN, "--output_dir", str(out), "--steps", "6", "--save_every", "2"]
    _interrupt_at(monkeypatch, 3)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "ckpt-00000002" in err and "continue with: hift train " in err
    command = err.split("continue with: ")[1].strip()
    assert shlex.split(command)[1:] == argv + ["--resume"]
    monkeypatch.undo()
    assert main(shlex.split(command)[1:]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from"] == 2


def test_ctrl_c_before_the_first_checkpoint_says_how_to_start_again(tmp_path, hift_train, monkeypatch):
    _interrupt_at(monkeypatch, 1)
    rc, _, err = hift_train()
    assert rc == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "before the first checkpoint" in err and err.strip().endswith("--overwrite")


def test_main_returns_to_a_python_caller_after_a_gloo_group_was_torn_down(tmp_path):
    """main() is a function that tests and scripts call and then go on. Once a gloo process group had been torn
    down it ended the whole process with os._exit: the caller's later code and its buffered files were lost
    while the process reported success. Only the console entry may leave that way."""
    import os
    import subprocess
    import sys

    code = (
        "import hift_engine.recipe.ranks as r\n"
        "r._gloo_torn_down = True  # as Ranks.close leaves it after hift train or bench ddp under torchrun (gloo)\n"
        f"f = open({str(tmp_path / 'buffered.txt')!r}, 'w'); f.write('written by the caller')\n"
        "from hift_engine.cli.main import main\n"
        "rc = main(['env'])\n"
        "print('AFTER', rc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "AFTER 0" in done.stdout, (done.returncode, done.stdout[-500:], done.stderr[-1000:])
    assert (tmp_path / "buffered.txt").read_text() == "written by the caller"
