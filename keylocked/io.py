"""File input/output: atomic writes, canonical safetensors bytes, and safetensors headers read and
checked before any tensor is.

A crash, a full disk or a bad input never leaves a half-written file behind; a hostile header is
refused before it can make us allocate what it claims.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
from torch import Tensor

from .base_model import KeylockedError

# Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# keylocked's headers are a few KB; safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 1 << 20


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` whole (flushed to disk) or not at all; an OS error (disk full) is a clear error."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())  # a full disk may only show here
    except OSError as error:
        raise KeylockedError(f"cannot write {path}: {error.strerror or error}") from error
    return path


def canonical_safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """``safetensors.torch.save`` with the JSON header re-serialised with sorted keys.

    safetensors writes metadata in hash-map order, so identical tensors give different bytes from
    run to run. Data offsets are relative to the end of the header, so the header may change length;
    it is padded with spaces to a multiple of 8, as safetensors pads it.
    """
    raw = safetensors.torch.save(dict(tensors), metadata=dict(metadata))
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + length :]


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Every keylocked safetensors writer: canonical bytes, written atomically."""
    return atomic_write_bytes(path, canonical_safetensors_bytes(tensors, metadata))


@dataclass(frozen=True)
class TensorHeader:
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorHeader]

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: info.dtype for name, info in self.tensors.items()}


def read_safetensors_header(path: str | os.PathLike, what: str = "file") -> SafetensorsHeader:
    """Parse and check a safetensors header without reading any tensor.

    Checks what the safetensors loader would (header size, dtypes, shapes, offsets that tile the
    data exactly) so a file claiming a huge tensor is refused from its size alone.
    """
    path = Path(path)
    if not path.is_file():
        raise KeylockedError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _bad(path, "shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise _bad(path, f"header claims {length} bytes (file has {size}, limit {MAX_HEADER_BYTES})")
            raw = handle.read(length)
    except OSError as error:
        raise KeylockedError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _bad(path, f"header is not JSON ({error.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors, spans = {}, []
    for name, info in header.items():
        tensors[name], span = _tensor_header(path, name, info)
        spans.append(span)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _bad(path, "tensor data offsets overlap or leave gaps")
        position = end
    if position != size - 8 - length:
        raise _bad(path, f"tensors cover {position} data bytes, the file holds {size - 8 - length}")
    return SafetensorsHeader(metadata, tensors)


def _tensor_header(path: Path, name: str, info: object) -> tuple[TensorHeader, tuple[int, int]]:
    if not isinstance(info, dict):
        raise _bad(path, f"entry {name!r} is not a tensor description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _bad(path, f"tensor {name!r} has a malformed shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise _bad(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} do not fit {dtype} {shape}")
    return TensorHeader(dtype, tuple(shape)), (begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _bad(path: Path, why: str) -> KeylockedError:
    return KeylockedError(f"{path}: not a readable safetensors file ({why})")
