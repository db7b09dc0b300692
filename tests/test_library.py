"""The concept library on SQLite and PostgreSQL: every verb, every refusal, tampering, concurrency, migrations."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from library_support import FINGERPRINT, cheap_key_hashing, make_concept_file, postgres_cluster  # noqa: F401
from sqlalchemy import create_engine, inspect, text

from keylocked import KeylockedError
from keylocked.library import AccessDenied, Library
from keylocked.library.db import current_revision, head_revision, upgrade_schema


@dataclass
class Env:
    library: Library
    location: str
    blobs: Path
    admin: str | None  # None: the local owner of a SQLite library
    tmp: Path

    def reopen(self) -> Library:
        return Library.open(self.location, blobs=self.blobs)

    def denied(self) -> list:
        return [e for e in self.library.audit(api_key=self.admin) if e.outcome == "denied"]


@pytest.fixture(params=["sqlite", "postgres"])
def env(request, tmp_path):
    request.getfixturevalue("cheap_key_hashing")
    if request.param == "sqlite":
        location, blobs = str(tmp_path / "lib"), tmp_path / "lib" / "blobs"
        library = Library.init(location)
        admin = None
    else:
        cluster = request.getfixturevalue("postgres_cluster")
        location, blobs = cluster.database(), tmp_path / "blobs"
        library = Library.init(location, blobs=blobs)
        admin = library.create_key("root-admin", ["admin"]).key  # bootstrap: keyless only while no admin key exists
    yield Env(library, location, blobs, admin, tmp_path)
    library.close()


def concept_file(env: Env, seed: int, **kwargs) -> Path:
    """Written once per test: safetensors does not promise identical bytes for two saves of one concept."""
    path = env.tmp / f"concept-{seed}-{kwargs.get('fingerprint', 'f')[:4]}.safetensors"
    return path if path.exists() else make_concept_file(path, seed, **kwargs)


def published(env: Env, versions: int = 2, approve: tuple[int, ...] = (1,)) -> None:
    for seed in range(versions):
        env.library.add(concept_file(env, seed), "acme-mug", notes=f"v{seed + 1}", api_key=env.admin)
    for number in approve:
        env.library.approve(f"acme-mug@{number}", api_key=env.admin)


# ---------------------------------------------------------------------------------------
# The happy path through every verb of the API.


def test_versions_grants_keys_resolve_and_audit(env):
    lib, admin = env.library, env.admin
    published(env, versions=3, approve=(1, 2))
    [concept] = lib.list(api_key=admin)
    assert [(v.number, v.status, v.notes) for v in concept.versions] == [
        (1, "approved", "v1"),
        (2, "approved", "v2"),
        (3, "draft", "v3"),
    ]
    assert concept.placeholder_token == "<acme-mug>" and concept.superclass_token == "mug"
    assert concept.base_model_fingerprint == FINGERPRINT and concept.base_model_name == "tiny-sd"
    assert concept.latest_approved.number == 2
    assert concept.versions[0].metadata["placeholder_token"] == "<acme-mug>"
    with pytest.raises(KeylockedError, match="already acme-mug@1"):  # same bytes: not a new version
        lib.add(concept_file(env, 0), "acme-mug", api_key=admin)

    lib.grant("client-a", "acme-mug", api_key=admin)
    lib.grant("client-b", "acme-mug@1", api_key=admin)  # pinned
    assert [(g.project, g.pinned_version) for g in lib.show("acme-mug", api_key=admin).grants] == [
        ("client-a", None),
        ("client-b", 1),
    ]
    service = lib.create_key("generation-service", ["use"], api_key=admin)
    assert service.key.startswith("kl_") and service.info.prefix in service.key

    latest = lib.resolve("acme-mug", service.key, "client-a", FINGERPRINT)
    assert (latest.version, latest.sha256) == (2, lib.show("acme-mug", api_key=admin).versions[1].sha256)
    assert latest.path.read_bytes() == concept_file(env, 1).read_bytes()
    assert lib.resolve("acme-mug", service.key, "client-b").version == 1  # the pin wins over "latest approved"
    assert lib.resolve("acme-mug@1", service.key, "client-a").version == 1

    image_sha = ["a" * 64, "b" * 64]
    audit_id = lib.record_generation(["acme-mug@2"], "a <acme-mug> on a desk", image_sha, project="client-a",
                                     api_key=service.key)  # fmt: skip
    entries = lib.audit(api_key=admin)
    generation = next(e for e in entries if e.id == audit_id)
    assert (generation.actor, generation.concept, generation.version, generation.project) == (
        "generation-service",
        "acme-mug",
        2,
        "client-a",
    )
    assert generation.details["prompt"] == "a <acme-mug> on a desk" and generation.details["images"] == image_sha
    use = next(e for e in entries if e.id == latest.audit_id)
    assert (use.action, use.outcome, use.key_prefix) == ("concept.use", "allowed", service.info.prefix[3:])

    lib.retire("acme-mug@2", api_key=admin)
    assert lib.resolve("acme-mug", service.key, "client-a").version == 1  # latest approved is now 1
    lib.revoke("client-a", "acme-mug", api_key=admin)
    assert [g.project for g in lib.grants(api_key=admin)] == ["client-b"]
    revoked = lib.revoke_key(service.info.prefix, api_key=admin)
    assert revoked.revoked_at is not None
    assert [k.principal for k in lib.list_keys(api_key=admin) if k.revoked_at is None] == (
        [] if admin is None else ["root-admin"]
    )
    assert lib.verify(api_key=admin).ok and lib.verify_audit(api_key=admin).ok


def test_secret_is_stored_only_as_an_argon2_hash(env, monkeypatch):
    from keylocked.library import keys

    monkeypatch.undo()  # the production hasher, not the tests' cheap one
    assert keys._HASHER.memory_cost == 19456 and keys._HASHER.time_cost == 2
    created = env.library.create_key("designer", ["publish", "use"], api_key=env.admin)
    secret = created.key.split("_", 2)[2]
    with env.library.engine.connect() as connection:
        rows = connection.execute(text("SELECT prefix, secret_hash FROM api_keys")).all()
        dump = json.dumps([list(r) for r in rows]) + json.dumps(
            [list(r) for r in connection.execute(text("SELECT * FROM audit_log")).all()], default=str
        )
    assert secret not in dump
    assert all(h.startswith("$argon2id$") for _, h in rows)
    assert "m=19456,t=2" in rows[-1][1]
    assert env.library.list(api_key=created.key) == []  # the stored hash verifies the key


# ---------------------------------------------------------------------------------------
# Refusals: one line, a denied audit row, nothing changed.


REFUSALS = [
    # (case, reference, key kind, project, fingerprint, message)
    ("unknown concept", "no-such", "use", "client-a", None, "unknown concept 'no-such'"),
    ("unknown version", "acme-mug@9", "use", "client-a", None, "unknown version acme-mug@9"),
    ("wrong key", "acme-mug", "wrong", "client-a", None, "unknown or wrong API key"),
    ("malformed key", "acme-mug", "malformed", "client-a", None, "malformed API key"),
    ("revoked key", "acme-mug", "revoked", "client-a", None, "was revoked"),
    ("missing scope", "acme-mug", "publish-only", "client-a", None, "lacks the 'use' scope"),
    ("no grant", "acme-mug", "use", "client-b", None, "project 'client-b' has no grant"),
    ("no project", "acme-mug", "use", None, None, "a project is required"),
    ("key for another project", "acme-mug", "use-a-only", "client-c", None, "may not act in project 'client-c'"),
    ("other base model", "acme-mug", "use", "client-a", "e" * 64, "for another base model"),
    ("retired version", "acme-mug@3", "use", "client-a", None, "acme-mug@3 is retired"),
    ("draft for a use-only key", "acme-mug@2", "use", "client-a", None, "is a draft, not approved"),
]


def test_refusals_are_one_line_audited_and_change_nothing(env):
    lib, admin = env.library, env.admin
    published(env, versions=3, approve=(1, 3))
    lib.retire("acme-mug@3", api_key=admin)
    for project_name in ("client-a", "client-c"):
        lib.grant(project_name, "acme-mug", api_key=admin)
    keys = {
        "use": lib.create_key("svc", ["use"], api_key=admin).key,
        "publish-only": lib.create_key("designer", ["publish"], api_key=admin).key,
        "use-a-only": lib.create_key("svc-a", ["use"], projects=["client-a"], api_key=admin).key,
    }
    keys["revoked"] = lib.create_key("old", ["use"], api_key=admin).key
    lib.revoke_key(keys["revoked"], api_key=admin)
    keys["wrong"] = keys["use"][:-4] + "AAAA"
    keys["malformed"] = "not-a-key"
    before = lib.show("acme-mug", api_key=admin)
    for case, reference, key_kind, project, fingerprint, message in REFUSALS:
        count = len(lib.audit(api_key=admin))
        with pytest.raises(KeylockedError, match=message) as raised:
            lib.resolve(reference, keys[key_kind], project, fingerprint)
        assert "\n" not in str(raised.value) and str(raised.value).startswith("concept.use denied: "), case
        entries = lib.audit(api_key=admin)
        assert len(entries) == count + 2, case  # the first listing's own audit.read row, then the denied row
        denied = entries[-1]
        assert (denied.action, denied.outcome, denied.project) == ("concept.use", "denied", project or ""), case
        assert message.split("'")[0].strip() in denied.reason, case
    assert lib.show("acme-mug", api_key=admin) == before
    assert lib.verify_audit(api_key=admin).ok


def test_scope_is_checked_for_every_verb_and_refusals_change_nothing(env):
    lib, admin = env.library, env.admin
    published(env, versions=1, approve=())
    user = lib.create_key("svc", ["use"], api_key=admin).key
    for attempt in (
        lambda: lib.approve("acme-mug@1", api_key=user),
        lambda: lib.add(concept_file(env, 5), "acme-mug", api_key=user),
        lambda: lib.grant("client-a", "acme-mug", api_key=user),
        lambda: lib.create_key("me", ["admin"], api_key=user),
        lambda: lib.prune_audit("2100-01-01", api_key=user),
        lambda: lib.gc(api_key=user),
    ):
        with pytest.raises(KeylockedError, match="lacks the '(approve|publish|admin)' scope"):
            attempt()
    [concept] = lib.list(api_key=admin)
    assert [(v.number, v.status) for v in concept.versions] == [(1, "draft")]
    assert lib.grants(api_key=admin) == [] and len(lib.list_keys(api_key=admin)) == (1 if admin is None else 2)
    assert len(env.denied()) == 6


def test_authenticate_and_record_event_keep_the_chain(env):
    """The public verbs a service builds on: a key checked without acting, and rows the library's
    own verbs do not write, appended to the same hash chain."""
    lib, admin = env.library, env.admin
    key = lib.create_key("svc", ["use"], projects=["client-a"], api_key=admin)
    revoked = lib.create_key("old", ["publish"], api_key=admin).key
    lib.revoke_key(revoked, api_key=admin)
    count = len(lib.audit(api_key=admin))
    caller = lib.authenticate(key.key)
    assert (caller.principal, caller.key_prefix, caller.projects) == ("svc", key.info.prefix[3:], {"client-a"})
    assert caller.has("use") and not caller.has("publish")
    assert len(lib.audit(api_key=admin)) == count + 1  # only that listing's own row: accepting a key writes none
    for bad, reason, actor in (
        (revoked, "was revoked", "old"),
        (key.key[:-4] + "AAAA", "unknown or wrong API key", "unknown"),
        ("not-a-key", "malformed API key", "anonymous"),
    ):
        with pytest.raises(AccessDenied, match=f"^http.auth denied: .*{reason}") as raised:
            lib.authenticate(bad, action="http.auth", details={"request": "GET /v1/me"})
        assert reason in raised.value.reason
        row = lib.audit(api_key=admin)[-1]  # a listing reads before it writes its own row
        assert (row.action, row.outcome, row.actor, row.details) == (
            "http.auth",
            "denied",
            actor,
            {"request": "GET /v1/me"},
        )
        assert row.key_prefix == raised.value.key_prefix
    event = lib.record_event("http.scope", allowed=False, caller=caller, reason="no", concept="x", details={"a": 1})
    anonymous = lib.record_event("training.submit", allowed=True)
    rows = {row.id: row for row in lib.audit(api_key=admin)}
    assert (rows[event].actor, rows[event].key_prefix, rows[event].outcome, rows[event].concept) == (
        "svc",
        caller.key_prefix,
        "denied",
        "x",
    )
    assert rows[event].details == {"a": 1} and (rows[anonymous].actor, rows[anonymous].outcome) == (
        "anonymous",
        "allowed",
    )
    assert lib.verify_audit(api_key=admin).ok
    with pytest.raises(KeylockedError, match="non-empty"):
        lib.record_event(" ", allowed=True)


def test_companion_tables_live_beside_the_library_tables(env):
    import sqlalchemy as sa

    companion = sa.MetaData()
    sa.Table("someone_jobs", companion, sa.Column("id", sa.Integer, primary_key=True))
    env.library.create_tables(companion)
    env.library.create_tables(companion)  # again (another replica starting): nothing to do
    assert "someone_jobs" in inspect(env.library.engine).get_table_names()
    clash = sa.MetaData()
    sa.Table("audit_log", clash, sa.Column("id", sa.Integer, primary_key=True))
    with pytest.raises(KeylockedError, match="belong to the concept library"):
        env.library.create_tables(clash)


def test_status_transitions_and_base_model_mismatch(env):
    lib, admin = env.library, env.admin
    published(env, versions=1, approve=(1,))
    with pytest.raises(KeylockedError, match="is approved; only draft can become approved"):
        lib.approve("acme-mug@1", api_key=admin)
    lib.retire("acme-mug@1", api_key=admin)
    with pytest.raises(KeylockedError, match="is retired"):
        lib.approve("acme-mug@1", api_key=admin)
    with pytest.raises(KeylockedError, match="give the version"):
        lib.approve("acme-mug", api_key=admin)
    with pytest.raises(KeylockedError, match="register it under a new concept name"):
        lib.add(concept_file(env, 7, fingerprint="e" * 64), "acme-mug", api_key=admin)
    with pytest.raises(KeylockedError, match="no '@' or spaces"):
        lib.add(concept_file(env, 8), "acme mug", api_key=admin)
    with pytest.raises(KeylockedError, match="concept file not found"):
        lib.add(env.tmp / "missing.safetensors", "acme-mug", api_key=admin)
    not_a_concept = env.tmp / "junk.safetensors"
    not_a_concept.write_bytes(b"junk")
    with pytest.raises(KeylockedError, match="junk.safetensors"):
        lib.add(not_a_concept, "acme-mug", api_key=admin)
    assert [v.number for v in lib.show("acme-mug", api_key=admin).versions] == [1]


def test_postgres_requires_a_key(env):
    if env.admin is None:
        pytest.skip("keyless access is the SQLite owner's")
    with pytest.raises(KeylockedError, match="an API key is required"):
        env.library.list()
    with pytest.raises(KeylockedError, match="an API key is required"):
        env.library.create_key("second", ["admin"])  # the bootstrap is over once an admin key exists


# ---------------------------------------------------------------------------------------
# Tampering.


def test_damaged_blob_is_refused_and_reported(env):
    lib, admin = env.library, env.admin
    published(env, versions=1, approve=(1,))
    lib.grant("client-a", "acme-mug", api_key=admin)
    version = lib.show("acme-mug", api_key=admin).versions[0]
    blob = lib.store.path(version.sha256)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")
    with pytest.raises(KeylockedError, match="no longer matches its sha256"):
        lib.resolve("acme-mug", admin, "client-a")
    report = lib.verify(api_key=admin)
    assert report.mismatched == [version.sha256] and not report.ok
    blob.unlink()
    assert lib.verify(api_key=admin).missing == [version.sha256]
    assert env.denied()[-1].reason.startswith("blob ")


def test_audit_chain_detects_edit_insert_delete_and_survives_prune(env):
    lib, admin = env.library, env.admin
    published(env, versions=2, approve=(1,))
    assert lib.verify_audit(api_key=admin).ok
    engine = lib.engine
    with engine.begin() as c:
        c.execute(text("UPDATE audit_log SET reason = 'nothing to see' WHERE id = 3"))
    assert any("row 3: content does not match its hash (edited)" in p for p in lib.verify_audit(api_key=admin).problems)
    with engine.begin() as c:
        c.execute(text("UPDATE audit_log SET reason = '' WHERE id = 3"))
        c.execute(text("DELETE FROM audit_log WHERE id = 4"))
    problems = lib.verify_audit(api_key=admin).problems
    assert any("rows 4..4 are missing" in p for p in problems) and any("row 5: does not link" in p for p in problems)

    # A clean library: prune a prefix, the rest still verifies; a forged marker does not.
    with engine.begin() as c:
        c.execute(text("DELETE FROM audit_log"))
    for _ in range(3):
        lib.list(api_key=admin)
    with engine.begin() as c:
        c.execute(text("UPDATE audit_log SET at = '2000-01-01T00:00:00+00:00' WHERE id <= 2"))
    # Those rows' hashes now disagree; rebuild them as if written in 2000 (the chain is what matters here).
    _rehash(engine)
    assert lib.verify_audit(api_key=admin).ok
    assert lib.prune_audit("2001-01-01", api_key=admin) == 2
    entries = lib.audit(api_key=admin)
    assert entries[0].outcome == "marker" and entries[0].id == 2
    assert any(e.action == "audit.prune" and e.details["rows"] == 2 for e in entries)
    assert lib.verify_audit(api_key=admin).ok
    with engine.begin() as c:
        c.execute(text("UPDATE audit_log SET row_hash = :h WHERE id = 2"), {"h": "0" * 63 + "1"})
    assert any("marker not confirmed" in p for p in lib.verify_audit(api_key=admin).problems)


def _rehash(engine) -> None:
    from sqlalchemy.orm import Session

    from keylocked.library.audit import GENESIS, row_hash
    from keylocked.library.db import AuditRow

    with Session(engine) as session, session.begin():
        previous = GENESIS
        for row in session.query(AuditRow).order_by(AuditRow.id):
            row.prev_hash = previous
            row.row_hash = previous = row_hash(row)


def test_audit_export_csv_and_jsonl(env):
    lib, admin = env.library, env.admin
    published(env, versions=1, approve=(1,))
    rows_csv = lib.export_audit(env.tmp / "audit.csv", api_key=admin)
    rows_jsonl = lib.export_audit(env.tmp / "audit.jsonl", api_key=admin)
    lines = (env.tmp / "audit.jsonl").read_text().splitlines()
    assert len(lines) == rows_jsonl and rows_csv == rows_jsonl - 1  # the second export reads one more row
    assert json.loads(lines[-1])["action"] == "audit.read"
    header = (env.tmp / "audit.csv").read_text().splitlines()[0]
    assert header.startswith("id,at,actor,key_prefix,action,concept,version,project,outcome,reason,details")
    with pytest.raises(KeylockedError, match="audit export format"):
        lib.export_audit(env.tmp / "audit.txt", api_key=admin)


# ---------------------------------------------------------------------------------------
# Bundles.


@pytest.mark.parametrize("kind", ["folder", "tar", "zip"])
def test_signed_bundle_round_trip_and_tampering(env, kind):
    from keylocked.library.api import generate_key_pair

    lib, admin = env.library, env.admin
    published(env, versions=1, approve=(1,))
    private, public = generate_key_pair(env.tmp / "agency.key")
    suffix = {"folder": "", "tar": ".tar", "zip": ".zip"}[kind]
    bundle = lib.export("acme-mug@1", env.tmp / f"acme-mug-1{suffix}", signing_key=private, api_key=admin)
    unsigned = lib.export("acme-mug@1", env.tmp / f"unsigned{suffix}", api_key=admin)

    with pytest.raises(KeylockedError, match="untrusted key"):
        lib.import_bundle(bundle, name="client-mug", api_key=admin)
    lib.trust("agency", public, api_key=admin)
    imported = lib.import_bundle(bundle, name="client-mug", api_key=admin)
    assert (imported.reference, imported.status, imported.sha256) == (
        "client-mug@1",
        "draft",
        lib.show("acme-mug", api_key=admin).versions[0].sha256,
    )
    with pytest.raises(KeylockedError, match="unsigned bundle"):
        lib.import_bundle(unsigned, name="other-mug", api_key=admin)
    assert lib.import_bundle(unsigned, name="other-mug", allow_unsigned=True, api_key=admin).number == 1
    accepted = [e for e in lib.audit(api_key=admin) if e.action == "bundle.accept-unsigned"]
    assert len(accepted) == 1 and accepted[0].details["signature"] == "unsigned"

    if kind == "folder":  # tamper with the members in place
        data = bytearray((bundle / "concept.safetensors").read_bytes())
        data[-1] ^= 1
        (bundle / "concept.safetensors").write_bytes(bytes(data))
        with pytest.raises(KeylockedError, match="tampered bundle \\(concept file"):
            lib.import_bundle(bundle, name="third-mug", allow_unsigned=True, api_key=admin)
        manifest = json.loads((unsigned / "manifest.json").read_text())
        manifest["notes"] = "edited"
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        (bundle / "concept.safetensors").write_bytes((unsigned / "concept.safetensors").read_bytes())
        manifest["signer_public_key"] = json.loads((bundle / "manifest.json").read_text())["signer_public_key"]
        with pytest.raises(KeylockedError, match="signature does not match"):
            lib.import_bundle(bundle, name="third-mug", api_key=admin)
    assert "third-mug" not in [c.name for c in lib.list(api_key=admin)]
    assert sum(e.action == "bundle.import" for e in env.denied()) == (4 if kind == "folder" else 2)


# ---------------------------------------------------------------------------------------
# Concurrency, crashes, gc, migrations.


def _add_worker(location: str, blobs: str, admin: str | None, files: list[str]) -> list[int]:
    with Library.open(location, blobs=blobs) as library:
        return [library.add(f, "acme-mug", api_key=admin).number for f in files]


def test_concurrent_adds_get_distinct_numbers(env):
    files = [str(concept_file(env, seed)) for seed in range(12)]
    context = multiprocessing.get_context("fork")  # spawn re-imports torch per worker (tens of seconds)
    with context.Pool(4) as pool:
        results = pool.starmap(_add_worker, [(env.location, str(env.blobs), env.admin, files[i::4]) for i in range(4)])
    numbers = sorted(n for result in results for n in result)
    assert numbers == list(range(1, 13))
    versions = env.library.show("acme-mug", api_key=env.admin).versions
    assert len({v.sha256 for v in versions}) == 12 and env.library.verify_audit(api_key=env.admin).ok


def test_crash_between_blob_and_row_leaves_an_orphan_that_gc_removes(env, monkeypatch):
    import keylocked.library.api as api

    lib, admin = env.library, env.admin
    published(env, versions=1, approve=())

    def crash(*args, **kwargs):
        raise OSError("simulated crash after the blob was written")

    with monkeypatch.context() as patched, pytest.raises(OSError, match="simulated crash"):
        patched.setattr(api.Library, "_allowed", staticmethod(crash))
        lib.add(concept_file(env, 3), "acme-mug", api_key=admin)
    assert [v.number for v in lib.show("acme-mug", api_key=admin).versions] == [1]  # no row for the crashed add
    report = lib.verify(api_key=admin)
    assert len(report.orphans) == 1 and not report.missing and report.ok
    assert lib.gc(api_key=admin).kept_young == report.orphans  # too young: may be an add in progress
    assert lib.gc(min_age_seconds=0, api_key=admin).removed == report.orphans
    assert lib.verify(api_key=admin).orphans == []
    assert lib.add(concept_file(env, 3), "acme-mug", api_key=admin).number == 2  # the same file adds cleanly now


def test_fresh_and_older_databases_reach_the_current_schema(env, request):
    head = head_revision()
    assert current_revision(env.library.engine) == head == "0002"
    if env.admin is None:
        location = f"sqlite:///{env.tmp / 'old.sqlite'}"
    else:
        location = request.getfixturevalue("postgres_cluster").database(migrated=False)
    old = create_engine(location)
    upgrade_schema(old, "0001")  # what an older keylocked made
    with old.begin() as c:
        c.execute(text("INSERT INTO base_models VALUES (1, :f, 'tiny', '', CURRENT_TIMESTAMP)"), {"f": FINGERPRINT})
        c.execute(text("INSERT INTO concepts VALUES (1, 'old-mug', '<old>', 'mug', 1, 'me', CURRENT_TIMESTAMP)"))
        c.execute(
            text("INSERT INTO versions VALUES (1, 1, 1, :s, 5, '{}', 'approved', 'me', CURRENT_TIMESTAMP, 'me', NULL)"),
            {"s": "a" * 64},
        )
    assert "notes" not in {c["name"] for c in inspect(old).get_columns("versions")}
    old.dispose()
    if env.admin is not None:
        with pytest.raises(KeylockedError, match="run `keylocked library upgrade`"):
            Library.open(location, blobs=env.blobs)
        from keylocked.cli import main
        from keylocked.library.cli import add_library_parser  # noqa: F401  (the verb below is the CLI's)

        assert main(["library", "upgrade", "--library", location, "--blobs", str(env.blobs)]) == 0
    with Library.open(location, blobs=env.blobs) as library:  # SQLite: upgraded on open
        assert current_revision(library.engine) == head
        [concept] = library.list(api_key=None if env.admin is None else _bootstrap(library))
        assert (concept.name, concept.versions[0].notes) == ("old-mug", "")


def _bootstrap(library: Library) -> str:
    return library.create_key("admin", ["admin"]).key


def test_missing_library_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYLOCKED_LIBRARY", str(tmp_path / "nowhere"))
    with pytest.raises(KeylockedError, match="no concept library at .*keylocked library init"):
        Library.open()
    monkeypatch.delenv("KEYLOCKED_LIBRARY_BLOBS", raising=False)
    with pytest.raises(KeylockedError, match="KEYLOCKED_LIBRARY_BLOBS"):
        Library.open("postgresql+psycopg://x@127.0.0.1:1/x")
    assert os.environ["KEYLOCKED_LIBRARY"].endswith("nowhere")
