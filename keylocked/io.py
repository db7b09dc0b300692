"""Atomic file output: a crash or a bad input never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_safetensors_header(path: str | os.PathLike, what: str = "file") -> tuple[dict[str, str], dict[str, str]]:
    """(metadata, tensor name -> dtype) of a safetensors file, or a clear error."""
    from .base_model import KeylockedError

    path = Path(path)
    if not path.is_file():
        raise KeylockedError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
            return handle.metadata() or {}, dtypes
    except (SafetensorError, OSError, ValueError) as error:
        raise KeylockedError(f"{path}: not a readable safetensors file ({error})") from error
