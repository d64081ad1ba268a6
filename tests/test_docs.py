"""The Sphinx docs build without warnings (-W), with the benchmark figures drawn from the
committed JSON records (docs/performance.rst, docs/batching.rst)."""
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("sphinx")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_build_without_warnings(tmp_path):
    pytest.importorskip("matplotlib", reason="the docs draw their figures with matplotlib "
                        "(the docs extra)")
    html = tmp_path / "html"
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html",
                        str(ROOT / "docs"), str(html)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("performance", "batching"):
        images = re.findall(r'<img [^>]*src="([^"]+\.png)"', (html / f"{page}.html").read_text())
        assert images, f"{page}.html has no figure"
        for src in images:
            png = html / src
            assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000, src
    assert (html / "tools.html").is_file()
