"""docs/tools.rst ("Using xllm from other tools"): each Python example, as the page shows it, run
against ``python -m xllm.serve`` on 127.0.0.1 with the default model; greedy, so the answer
names Paris. The openai client's example always runs (openai is in the test extra); LangChain's
and LlamaIndex's only where their packages are installed (they are not test dependencies)."""
import importlib.util
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
PAGE = Path(__file__).resolve().parents[1] / "docs" / "tools.rst"
# The module each example imports first, and the package that provides it.
EXAMPLES = {"openai": "openai", "langchain_openai": "langchain-openai",
            "llama_index.llms.openai_like": "llama-index-llms-openai-like"}


def examples():
    """{module imported first: source} of the page's Python code blocks."""
    text = PAGE.read_text(encoding="utf-8")
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", text)
    found = {}
    for block in blocks:
        source = textwrap.dedent(block)
        module = re.match(r"from (\S+) import", source).group(1)
        found[module] = source
    return found


def test_the_page_has_the_three_examples():
    assert set(examples()) == set(EXAMPLES)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_gguf, tmp_path_factory):
    """The base URL of `python -m xllm.serve --model smollm2-135m-instruct` on a free port."""
    pytest.importorskip("fastapi", reason="the server needs the serve extra")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("serve") / "log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "xllm.serve", "--model", "smollm2-135m-instruct", "--port",
         str(port), "--threads", "2"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the server did not start:\n{log.read()}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.parametrize("module", sorted(EXAMPLES))
def test_example_answers_through_the_server(module, server):
    if importlib.util.find_spec(module.split(".")[0]) is None or (
            "." in module and importlib.util.find_spec(module) is None):
        pytest.skip(f"{EXAMPLES[module]} is not installed (not a test dependency)")
    source = examples()[module].replace("http://127.0.0.1:8000", server)
    assert server in source  # the example names the server's base URL
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_API_BASE")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1"
    r = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
