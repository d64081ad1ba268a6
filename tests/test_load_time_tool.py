"""tools/load_time.py times import and load in fresh processes and says which xllm it timed."""
import json

import pytest

import load_time
from conftest import write_tiny_gguf


def test_load_time_reports_every_figure(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "m.gguf")
    load_time.main([str(path), "--runs", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    for name in load_time.FIGURES:
        runs = result[name]["runs"]
        assert len(runs) == 2 and all(x > 0 for x in runs)
        assert min(runs) <= result[name]["median"] <= max(runs)
    assert result["xllm"].endswith("xllm/__init__.py") and len(result["load_average"]) == 3


def test_a_failed_load_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    with pytest.raises(SystemExit, match="bad.gguf"):
        load_time.main([str(bad), "--runs", "1"])
