"""python -m xllm.generate: run.c's greedy output through the CLI; one-line errors, exit code 2."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "xllm.generate", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_cli_reproduces_run_c(data_dir):
    d = data_dir / "llama2c"
    for case in map(json.loads, open(d / "stories260K_greedy.jsonl")):
        n = case["steps"] + 1 - len(case["prompt_tokens"])
        r = run_cli("--model", d / "stories260K.bin", "--tokenizer", d / "tok512.bin",
                    "--prompt", case["prompt"], "--max-new-tokens", n, "--echo", "--threads", 2)
        assert r.returncode == 0, r.stderr
        assert r.stdout == case["stdout"]
        summary = r.stderr.strip().splitlines()[-1]
        assert f"prompt: {len(case['prompt_tokens'])} tokens" in summary
        assert f"generated: {n} tokens" in summary and "tok/s" in summary


@pytest.mark.parametrize("args", [
    ("--model", "/nonexistent/model.bin", "--prompt", "x"),
    ("--model", __file__, "--prompt", "x"),
])
def test_cli_errors_are_one_line(args):
    r = run_cli(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_threads(data_dir):
    d = data_dir / "llama2c"
    r = run_cli("--model", d / "stories260K.bin", "--tokenizer", d / "tok512.bin", "--threads", 0)
    assert r.returncode == 2 and "threads" in r.stderr


def test_cli_huge_max_new_tokens_is_clamped_to_the_context(data_dir):
    """--max-new-tokens 10**12 used to allocate for 10**12 tokens first (a traceback, exit 1):
    it now stops at the model's context (512 tokens for stories260K)."""
    d = data_dir / "llama2c"
    r = run_cli("--model", d / "stories260K.bin", "--tokenizer", d / "tok512.bin",
                "--prompt", "Once", "--max-new-tokens", 10**12, "--temperature", 1.0,
                "--seed", 1)
    assert r.returncode == 0, r.stderr
    generated = int(r.stderr.split("generated: ")[1].split()[0])
    assert 0 < generated <= 512


def test_cli_activation_parts(smollm2_gguf):
    """--activation-parts 1 reaches the kernels: the default question's first answer token is
    a near-tie (docs/quantization.rst, "Why three parts"), and with one part the greedy answer
    is another (the kernels are bitwise the same on every ISA, so this is deterministic); a
    value outside 1..3 is exit code 2."""
    default = run_cli("--model", smollm2_gguf, "--max-new-tokens", 8, "--threads", 2)
    one = run_cli("--model", smollm2_gguf, "--max-new-tokens", 8, "--threads", 2,
                  "--activation-parts", 1)
    assert default.returncode == 0 and one.returncode == 0, (default.stderr, one.stderr)
    assert default.stdout.startswith("The capital of France is Paris.")
    assert one.stdout.strip() and not one.stdout.startswith("The capital")
    assert "generated: 8 tokens" in one.stderr
    bad = run_cli("--model", smollm2_gguf, "--activation-parts", 4)
    assert bad.returncode == 2 and "activation-parts" in bad.stderr
