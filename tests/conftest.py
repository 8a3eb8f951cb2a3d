"""Shared test setup: seeded RNGs, a `cuda` marker that skips cleanly without a GPU, Triton's interpreter on
CPU-only machines (it must be switched on before triton is first imported), hypothesis profiles, and a
`hift_train` fixture that runs the CLI on the tiny built-in model.

Hypothesis profiles: ``ci`` (derandomized: the same examples every run, no deadline) is loaded when the
environment variable ``CI`` is set, as ``.ci/run`` does; ``dev`` (random examples) otherwise.
``HYPOTHESIS_PROFILE=ci|dev`` picks one explicitly.
"""

import os
import random

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=100,
                                 print_blob=True)
    _hyp_settings.register_profile("dev", derandomize=False, deadline=None, max_examples=100)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))
except ImportError:  # pragma: no cover - hypothesis is in the "test" extra
    pass


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m cuda` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def cuda_device():
    import torch

    return torch.device("cuda")


# A `hift train` run of a few seconds on a CPU: 4 groups (embedding, 2 blocks, head), no plot.
TINY_TRAIN = ["--no-progress", "--tiny_hidden", "32", "--steps", "4", "--batch_size", "4", "--max_length", "16",
              "--log_every", "1", "--plot", "false"]


@pytest.fixture
def hift_train(tmp_path, capsys):
    """``hift_train(*args, out=dir)`` runs ``hift train`` with TINY_TRAIN and ``--output_dir out`` (default
    tmp_path/"run"); returns (exit code, stdout, stderr). Later arguments override earlier ones."""
    from hift_engine.cli.main import main

    def run(*args, out=None):
        capsys.readouterr()
        out = tmp_path / "run" if out is None else out
        rc = main(["train", *TINY_TRAIN, "--output_dir", str(out), *map(str, args)])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    return run
