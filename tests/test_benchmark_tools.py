"""tools/benchmark.py and tools/benchmark_batch.py run every engine in a process of its own."""
import os
import pathlib
import re

import pytest

_REPO = pathlib.Path(__file__).resolve().parents[1]
import benchmark  # noqa: E402
import benchmark_batch  # noqa: E402
import quantize  # noqa: E402
from xllm.random_model import write_random_model

PROMPTS = _REPO / "benchmarks" / "prompts.txt"
NUMBER = r"\s+([0-9.]+) tok/s"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_model(str(tmp_path_factory.mktemp("m") / "m"), "tiny", "fp32", 0,
                              hidden_size=64, intermediate_size=128, num_layers=1)


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    path = tmp_path_factory.mktemp("g") / "m-q8_0.gguf"
    assert quantize.main(["--model", tiny, "--out", str(path), "--bits", "8",
                          "--format", "gguf"]) == 0
    return str(path)


def test_xllm_runs_in_a_process_of_its_own(tiny):
    engine = benchmark.EngineProcess(benchmark.XllmEngine, tiny, 1)
    try:
        assert engine.info["pid"] not in (os.getpid(), None)
        assert engine.info["threads"] == 1 and engine.info["vocab_size"] == 512
        prefill, decode = engine.call("run", [5, 6, 7, 8], 3)
        assert prefill > 0 and decode > 0
        rss, kv_bytes = engine.call("memory")
        assert rss > 0 and kv_bytes > 0
        assert 0 < engine.call("python_share", [5, 6, 7, 8], 3) < 2
    finally:
        engine.close()
    assert engine.process.poll() is not None


def test_engine_environment_has_the_launch_openmp_settings(monkeypatch):
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")  # as importing xllm sets it (to 1000)
    monkeypatch.setenv("OMP_TEST_SETTING", "1")
    monkeypatch.setenv("XLLM_TEST_SETTING", "1")
    env = benchmark.engine_environment()
    assert env.get("GOMP_SPINCOUNT") != "7" and "OMP_TEST_SETTING" not in env
    assert env["XLLM_TEST_SETTING"] == "1" and env["PATH"] == os.environ["PATH"]


def test_engine_failure_is_reported(tmp_path):
    with pytest.raises(SystemExit, match=f"XllmEngine: .*{tmp_path / 'missing'}"):
        benchmark.EngineProcess(benchmark.XllmEngine, str(tmp_path / "missing"), 1)


def test_benchmark_vs_torch(tiny, capsys):
    pytest.importorskip("transformers")
    benchmark.main(["--model", tiny, "--prompt-len", "8", "--new-tokens", "4", "--reps", "2",
                    "--threads", "1", "--vs-torch"])
    out = capsys.readouterr().out
    for name in ("xllm", "torch fp32", "torch bf16"):
        assert re.search(rf"\n  {name}\s+prefill{NUMBER}  decode{NUMBER}", out), out
    assert "xllm/torch bf16: prefill" in out and "peak RSS (xllm's process)" in out


def test_llama_cpp_runs_in_another_process(tiny_gguf):
    engines = [benchmark.EngineProcess(benchmark.LlamaCppEngine, tiny_gguf, 1, 64, 512),
               benchmark.EngineProcess(benchmark.XllmEngine, tiny_gguf, 1)]
    try:
        pids = {e.info["pid"] for e in engines} | {os.getpid()}
        assert len(pids) == 3
        prefill, decode = engines[0].call("run", [5, 6, 7, 8], 3)
        assert prefill > 0 and decode > 0
    finally:
        for e in engines:
            e.close()


def test_benchmarks_vs_llama_cpp(tiny_gguf, capsys):
    benchmark.main(["--model", tiny_gguf, "--prompt-len", "8", "--new-tokens", "4", "--reps", "2",
                    "--threads", "1", "--vs-llama-cpp", "--prefill-len", "16"])
    out = capsys.readouterr().out
    assert re.search(rf"\n  llama.cpp\s+prefill{NUMBER}  decode{NUMBER}  prefill@16{NUMBER}"
                     r"   xllm/llama.cpp: prefill", out), out
    benchmark_batch.main(["--model", tiny_gguf, "--file", str(PROMPTS), "--batch", "3",
                          "--max-new-tokens", "3", "--raw", "--single", "--threads", "1",
                          "--llama-cpp-model", tiny_gguf])
    out = capsys.readouterr().out
    for row in ("llama.cpp batch 3", "llama.cpp single", "llama.cpp batch/single",
                "xllm / llama.cpp batch"):
        assert f"\n  {row}" in out, out
