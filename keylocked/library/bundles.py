"""Signed bundles: a concept file + ``manifest.json`` + an ed25519 signature of the manifest.

A bundle is a folder, a ``.tar`` or a ``.zip`` with exactly these members. The manifest lists the
sha256 of the concept file, so one signature covers everything. Reading never extracts an archive
to disk: only the three known member names are read, into memory.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..base_model import KeylockedError
from ..io import atomic_path
from .audit import canonical_json

BUNDLE_FORMAT = "keylocked.bundle"
BUNDLE_FORMAT_VERSION = 1
CONCEPT_MEMBER = "concept.safetensors"
MANIFEST_MEMBER = "manifest.json"
SIGNATURE_MEMBER = "signature.ed25519"  # base64 of the 64-byte signature of manifest.json's bytes
MEMBERS = (CONCEPT_MEMBER, MANIFEST_MEMBER, SIGNATURE_MEMBER)
MAX_MEMBER_BYTES = 256 << 20


@dataclass
class Bundle:
    manifest: dict[str, Any]
    manifest_bytes: bytes
    concept_bytes: bytes
    signature: bytes | None


# ---------------------------------------------------------------------------------------
# Keys.


def generate_signing_key(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new ed25519 private key (PEM, 0600) and its public key (``.pub``, PEM)."""
    path = Path(path)
    public_path = path.with_name(path.name + ".pub")
    if path.exists() or public_path.exists():
        raise KeylockedError(f"{path} or {public_path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(private_pem)
        os.chmod(tmp, 0o600)
    path.chmod(0o600)
    with atomic_path(public_path) as tmp:
        tmp.write_bytes(public_pem(key.public_key()))
    return path, public_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def load_private_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise KeylockedError(f"{path}: not a readable unencrypted PEM private key ({error})") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise KeylockedError(f"{path}: not an ed25519 private key")
    return key


def load_public_key(data: str | bytes | os.PathLike) -> Ed25519PublicKey:
    """A public key from a PEM file path, PEM text, or 64 hex digits."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_file():
        data = Path(data).read_bytes()
    if isinstance(data, str):
        data = data.encode()
    try:
        if data.strip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode().strip()))
    except (ValueError, TypeError) as error:
        raise KeylockedError(f"not an ed25519 public key (PEM file, PEM text or 64 hex digits): {error}") from error
    if not isinstance(key, Ed25519PublicKey):
        raise KeylockedError("not an ed25519 public key")
    return key


# ---------------------------------------------------------------------------------------
# Writing and reading.


def write_bundle(
    destination: str | os.PathLike, manifest: dict[str, Any], concept_bytes: bytes, key: Ed25519PrivateKey | None
) -> Path:
    """Write a folder, or a .tar/.zip when ``destination`` ends so; refuse to overwrite."""
    destination = Path(destination)
    if destination.exists():
        raise KeylockedError(f"{destination} already exists; choose a new bundle name")
    manifest_bytes = (canonical_json(manifest) + "\n").encode()
    members = {CONCEPT_MEMBER: concept_bytes, MANIFEST_MEMBER: manifest_bytes}
    if key is not None:
        members[SIGNATURE_MEMBER] = base64.b64encode(key.sign(manifest_bytes)) + b"\n"
    suffix = destination.suffix.lower()
    if suffix in (".tar", ".zip"):
        with atomic_path(destination) as tmp:
            if suffix == ".tar":
                with tarfile.open(tmp, "w") as tar:
                    for name, data in members.items():
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), 0o644
                        tar.addfile(info, io.BytesIO(data))
            else:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                    for name, data in members.items():
                        archive.writestr(name, data)
        return destination
    staging = destination.with_name(f".{destination.name}.incoming")
    staging.mkdir(parents=True)
    for name, data in members.items():
        (staging / name).write_bytes(data)
    os.replace(staging, destination)  # the folder appears complete or not at all
    return destination


def _read_members(source: Path) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    if source.is_dir():
        for name in MEMBERS:
            if (source / name).is_file():
                members[name] = (source / name).read_bytes()
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                if info.filename in MEMBERS and info.file_size <= MAX_MEMBER_BYTES:
                    members[info.filename] = archive.read(info)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            for info in tar.getmembers():
                if info.name in MEMBERS and info.isfile() and info.size <= MAX_MEMBER_BYTES:
                    members[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
    else:
        raise KeylockedError(f"{source}: not a bundle (a folder, .tar or .zip)")
    return members


def read_bundle(source: str | os.PathLike) -> Bundle:
    """The members of a bundle, parsed; no checks beyond the format (see ``check_bundle``)."""
    source = Path(source)
    if not source.exists():
        raise KeylockedError(f"bundle not found: {source}")
    members = _read_members(source)
    for name in (CONCEPT_MEMBER, MANIFEST_MEMBER):
        if name not in members:
            raise KeylockedError(f"{source}: not a complete bundle (no {name})")
    try:
        manifest = json.loads(members[MANIFEST_MEMBER])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KeylockedError(f"{source}: manifest.json is not valid JSON ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise KeylockedError(f"{source}: manifest.json is not a {BUNDLE_FORMAT} manifest")
    if int(manifest.get("format_version", 0)) > BUNDLE_FORMAT_VERSION:
        raise KeylockedError(f"{source}: bundle format version is newer than this keylocked; upgrade keylocked")
    signature = None
    if SIGNATURE_MEMBER in members:
        try:
            signature = base64.b64decode(members[SIGNATURE_MEMBER].strip(), validate=True)
        except ValueError:
            signature = b""  # present but garbled: a bad signature, not a missing one
    return Bundle(manifest, members[MANIFEST_MEMBER], members[CONCEPT_MEMBER], signature)


def signature_status(bundle: Bundle, trusted: dict[str, str]) -> tuple[str, str]:
    """('valid', signer name) | ('unsigned', '') | ('untrusted', key hex) | ('invalid', key hex).

    ``trusted``: raw public key hex -> signer name.
    """
    if bundle.signature is None:
        return "unsigned", ""
    key_hex = str(bundle.manifest.get("signer_public_key", ""))
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        key.verify(bundle.signature, bundle.manifest_bytes)
    except (ValueError, InvalidSignature):
        return "invalid", key_hex
    if key_hex not in trusted:
        return "untrusted", key_hex
    return "valid", trusted[key_hex]
