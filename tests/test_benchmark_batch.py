"""tools/benchmark_batch.py: a smoke run on a tiny random model, and the prompt file."""
import pathlib
import re

_REPO = pathlib.Path(__file__).resolve().parents[1]
import benchmark_batch  # noqa: E402
from xllm.random_model import write_random_model

PROMPTS = _REPO / "benchmarks" / "prompts.txt"


def test_prompt_file_has_enough_prompts():
    lines = PROMPTS.read_text(encoding="utf-8").splitlines()
    assert sum(bool(line.strip()) for line in lines) >= 64
    assert all(line.strip() for line in lines)  # no empty lines


def test_batch_benchmark_smoke(tmp_path, capsys):
    path = write_random_model(str(tmp_path / "m"), "tiny", "fp32", 0, hidden_size=64,
                              intermediate_size=128, num_layers=1)
    benchmark_batch.main(["--model", path, "--file", str(PROMPTS), "--batch", "4",
                          "--max-new-tokens", "4", "--raw", "--single"])
    out = capsys.readouterr().out
    number = r"\s+([0-9.]+|nan)"
    agg = re.search(r"aggregate \(batch 4\)" + number * 4, out)
    single = re.search(r"single \(batch 1\)" + number * 4, out)
    assert agg and single, out
    assert "decode tok/s" in out and "aggregate / single" in out
    assert "batch tokens identical to the single runs: yes" in out
    generated = int(re.search(r"generated: (\d+) tokens", out).group(1))
    assert 0 < generated <= 16
    if generated > 4:  # some sequence got past its first token: decode figures are numbers
        assert agg.group(2) != "nan" and single.group(2) != "nan"
    assert "peak RSS" in out


def test_read_prompts_cycles(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a\n\nb\n", encoding="utf-8")
    texts, n = benchmark_batch.read_prompts(f, 5)
    assert texts == ["a", "b", "a", "b", "a"] and n == 2
