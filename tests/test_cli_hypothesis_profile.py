"""Property tests are derandomized under CI (conftest's `ci` profile), random otherwise (`dev`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import tests.conftest; from hypothesis import settings; print(settings().derandomize, settings().deadline)"


@pytest.mark.parametrize("env, derandomized", [({"CI": "true"}, True), ({}, False),
                                               ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, False)],
                         ids=["CI", "local", "CI-asks-dev"])
def test_hypothesis_profile_follows_the_environment(env, derandomized):
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(derandomized), "None"]
