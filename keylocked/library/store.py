"""Content-addressed blob store: files named by their sha256, written once, verified on every read."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..base_model import KeylockedError

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(sha256: str) -> str:
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise KeylockedError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class BlobStore:
    """``root/ab/abcdef...``: one read-only file per distinct content."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        _check_name(sha256)
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (fsync'd, atomic rename, never overwriting); return its sha256."""
        sha256 = sha256_bytes(data)
        target = self.path(sha256)
        if target.exists():
            self.verify(sha256)  # the same name must hold the same bytes; a damaged copy is an error, not reused
            return sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".incoming.", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
            # link() fails if another writer got there first, so an existing file is never replaced.
            try:
                os.link(tmp, target)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        return sha256

    def read(self, sha256: str) -> bytes:
        """The bytes of ``sha256``, or KeylockedError if missing or no longer matching."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise KeylockedError(f"blob {sha256[:12]} is missing from the store {self.root}") from None
        if sha256_bytes(data) != sha256:
            raise KeylockedError(f"blob {sha256[:12]} in {self.root} no longer matches its sha256 (damaged or edited)")
        return data

    def verify(self, sha256: str) -> Path:
        """Check the stored file against its name; return its path."""
        path = self.path(sha256)
        if not path.is_file():
            raise KeylockedError(f"blob {sha256[:12]} is missing from the store {self.root}")
        if sha256_file(path) != sha256:
            raise KeylockedError(f"blob {sha256[:12]} in {self.root} no longer matches its sha256 (damaged or edited)")
        return path

    def __iter__(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and len(folder.name) == 2:
                for file in sorted(folder.iterdir()):
                    if len(file.name) == 64 and file.name.startswith(folder.name):
                        yield file.name

    def age_seconds(self, sha256: str) -> float:
        return time.time() - self.path(sha256).stat().st_mtime

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
