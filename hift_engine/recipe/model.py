"""The model and tokenizer of ``hift train``: the built-in tiny byte-level LLaMA, or a local Hugging Face
directory, with one-line errors (ConfigError) for a directory that is incomplete or damaged."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from .config import RunConfig
from .data import ByteTokenizer

__all__ = ["build_model", "resolve_device", "masters_from_host"]


def masters_from_host(cfg: RunConfig) -> bool:
    """bf16-mixed from fp32 weights: they become the masters and never go to the device in fp32."""
    return cfg.optimizer.precision.endswith("-mixed") and cfg.model.dtype == "float32"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)


def _first_line(e: BaseException) -> str:
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_model_path(cfg: RunConfig) -> None:
    """Cheap checks of model.path, before the data is read and the model loaded."""
    if cfg.model.path != "tiny" and not (Path(cfg.model.path) / "config.json").is_file():
        raise ConfigError(f"model.path={cfg.model.path!r} is not 'tiny' nor a local Hugging Face model directory (no config.json)")


def build_model(cfg: RunConfig, device: torch.device):
    """(model, tokenizer): the built-in tiny byte-level LLaMA, or a local Hugging Face model directory.
    For ``optimizer.precision: bf16-mixed`` with ``model.dtype: float32`` the model stays on the CPU in fp32:
    the loop moves it to the device in bf16 and keeps its fp32 weights as the masters (``to_device_bf16``)."""
    dtype = _DTYPES[cfg.model.dtype]
    if masters_from_host(cfg):
        device = torch.device("cpu")
    if cfg.model.path == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = ByteTokenizer()
        heads = max(1, cfg.model.tiny_hidden // 32)
        mcfg = LlamaConfig(
            vocab_size=tok.vocab_size, hidden_size=cfg.model.tiny_hidden, intermediate_size=2 * cfg.model.tiny_hidden,
            num_hidden_layers=cfg.model.tiny_layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=max(64, cfg.data.max_length), pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
        )
        torch.manual_seed(cfg.train.seed)
        return LlamaForCausalLM(mcfg).to(device=device, dtype=dtype), tok
    check_model_path(cfg)
    path = Path(cfg.model.path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers reports a broken directory with long tracebacks (a truncated safetensors file, missing
    # tokenizer files ending in a sentencepiece hint): say in one line which part is broken and what to do.
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the tokenizer files are missing or bad
        raise ConfigError(
            f"model.path={str(path)!r}: cannot load the tokenizer ({_first_line(e)}); the directory needs the "
            f"tokenizer files saved with the model (tokenizer.json, or tokenizer.model with sentencepiece installed)"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged or incomplete checkpoint in the model directory
        raise ConfigError(
            f"model.path={str(path)!r}: cannot load the model ({_first_line(e)}); its config.json or weight files "
            f"(*.safetensors / *.bin) are incomplete or damaged: copy or download the model again"
        ) from None
    model = model.to(device)
    model.config.use_cache = False
    return model, tok
