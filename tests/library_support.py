"""Shared by the library tests: tiny concept files, and a throwaway PostgreSQL cluster (session-wide)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from keylocked.concept import Concept

FINGERPRINT = "f" * 64


def make_concept_file(path: Path, seed: int = 0, fingerprint: str = FINGERPRINT, token: str = "<acme-mug>") -> Path:
    """A complete, valid concept file of a few dozen floats (distinct bytes per seed)."""
    g = torch.Generator().manual_seed(seed)
    Concept(
        placeholder_token=token,
        superclass_token="mug",
        token_embedding=torch.randn(8, generator=g),
        concept_input=torch.randn(8, generator=g),
        superclass_input=torch.randn(8, generator=g),
        value_targets={"down_blocks.0.attn2": torch.randn(4, generator=g)},
        base_model_fingerprint=fingerprint,
        covariance_sha256="c" * 64,
        training={"pretrained_model_name_or_path": "tiny-sd", "seed": seed},
    ).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class PostgresCluster:
    """initdb + pg_ctl in a temp folder, on a free port of 127.0.0.1, trust auth; ``database()`` makes a fresh DB."""

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries (apt-get install postgresql)")
        self.folder = Path(tempfile.mkdtemp(prefix="keylocked-pg-"))
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to own the cluster") from None
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.data, self.port, self._template = self.folder / "data", _free_port(), ""
        self._run("initdb", "-D", str(self.data), "-U", "keylocked", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"), "-w", "start")

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([*self.run_as, str(self.bin / tool), *args], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{tool} failed: {(result.stderr or result.stdout).strip()[-400:]}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://keylocked@127.0.0.1:{self.port}/{database}"

    def database(self, migrated: bool = True) -> str:
        """A new database: a copy of one migrated to the current schema, or empty."""
        import psycopg

        if migrated and not self._template:
            self._template = self.database(migrated=False).rsplit("/", 1)[1]
            from keylocked.library.db import make_engine, upgrade_schema

            engine = make_engine(self.url(self._template))
            upgrade_schema(engine)
            engine.dispose()
        name = "t_" + uuid.uuid4().hex[:12]
        template = f' TEMPLATE "{self._template}"' if migrated else ""
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=keylocked dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"{template}')
        return self.url(name)

    def stop(self) -> None:
        started = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)
        print(f"\nPostgreSQL test cluster stopped ({time.monotonic() - started:.1f} s)")


@pytest.fixture(scope="session")
def postgres_cluster():
    """One cluster for the whole run; skipped (with the reason) where no server can be started."""
    try:
        cluster = PostgresCluster()
    except (RuntimeError, OSError) as error:
        # A warning as well as the skip: `pytest -q` prints warnings, but skip reasons only with -rs.
        warnings.warn(f"PostgreSQL library tests skipped: {error}", stacklevel=1)
        pytest.skip(f"PostgreSQL library tests skipped: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture
def cheap_key_hashing(monkeypatch):
    """argon2id at its smallest cost: the tests create and check many keys on a shared 2-core machine.

    ``test_secret_is_stored_only_as_an_argon2_hash`` checks the production parameters separately.
    """
    from argon2 import PasswordHasher

    from keylocked.library import keys

    monkeypatch.setattr(keys, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
