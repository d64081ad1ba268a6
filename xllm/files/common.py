"""Checks every file reader shares: regular files only, bounded JSON, whole-file maps."""
import json
import mmap
import os
import stat
from pathlib import Path

import numpy as np

from ..errors import ModelFormatError

MAX_JSON_BYTES = 64 << 20  # config files are kilobytes; refuse to parse gigabytes


def check_regular_file(path) -> None:
    """ModelFormatError naming `path` unless it is a regular file (symlinks followed): opening
    a FIFO would block forever, and a device, socket or directory is no model file.
    FileNotFoundError if it does not exist."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot stat ({e})") from None
    if not stat.S_ISREG(mode):
        raise ModelFormatError(f"{path}: not a regular file (a FIFO, device, socket or "
                               f"directory); refused")


def read_json(path) -> dict:
    """The JSON object in `path` (a regular file of at most MAX_JSON_BYTES); ModelFormatError
    naming the file if it cannot be read or is not an object."""
    check_regular_file(path)
    try:
        if (size := os.path.getsize(path)) > MAX_JSON_BYTES:
            raise ValueError(f"{size} bytes is more than the {MAX_JSON_BYTES} allowed")
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFormatError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def map_file(path):
    """A read-only uint8 array over the whole file, backed by one mmap (kept alive by the array)."""
    check_regular_file(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ModelFormatError(f"{path}: file is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=np.uint8)
