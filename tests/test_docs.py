"""The Sphinx docs build without warnings (-W)."""
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("sphinx")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                        str(ROOT / "docs"), str(tmp_path / "html")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
