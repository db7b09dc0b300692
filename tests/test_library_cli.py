"""``keylocked library ...`` verbs end to end on a SQLite library: readable tables, ``--json``, exit codes."""

from __future__ import annotations

import json
import sqlite3

import pytest
from library_support import make_concept_file

from keylocked.cli import main


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEYLOCKED_LIBRARY", str(tmp_path / "lib"))
    monkeypatch.delenv("KEYLOCKED_API_KEY", raising=False)

    def run(*argv: object, expect: int = 0) -> str:
        code = main(["library", *map(str, argv)])
        out, err = capsys.readouterr()
        assert code == expect, (argv, out, err)
        if expect == 2:
            assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
            return err
        return out

    run.tmp = tmp_path
    return run


def test_every_verb(cli, monkeypatch):
    tmp = cli.tmp
    assert "library ready" in cli("init")
    first, second = make_concept_file(tmp / "a.safetensors", 0), make_concept_file(tmp / "b.safetensors", 1)
    added = json.loads(cli("add", first, "--name", "acme-mug", "--notes", "first cut", "--json"))
    assert (added["reference"], added["status"], added["notes"]) == ("acme-mug@1", "draft", "first cut")
    assert "added acme-mug@2 (draft" in cli("add", second, "--name", "acme-mug")
    assert "acme-mug@1 is approved" in cli("approve", "acme-mug@1")
    table = cli("list")
    assert "acme-mug" in table and "1:approved 2:draft" in table
    shown = json.loads(cli("show", "acme-mug", "--json"))
    assert [v["status"] for v in shown["versions"]] == ["approved", "draft"]
    assert "may use acme-mug@1" in cli("grant", "client-a", "acme-mug@1")
    assert "(any approved version)" in cli("grant", "client-b", "acme-mug")
    assert [g["project"] for g in json.loads(cli("grants", "--json"))] == ["client-a", "client-b"]

    key = cli("keys", "create", "--principal", "svc", "--scopes", "use", "--project", "client-a").splitlines()[0]
    assert key.startswith("kl_")
    keys = json.loads(cli("keys", "list", "--json"))
    assert keys[0]["principal"] == "svc" and keys[0]["prefix"] in key and "secret" not in json.dumps(keys)
    monkeypatch.setenv("KEYLOCKED_API_KEY", key)  # now the service's key, with only the 'use' scope
    err = cli("approve", "acme-mug@2", expect=2)
    assert "lacks the 'approve' scope" in err
    monkeypatch.delenv("KEYLOCKED_API_KEY")
    assert "revoked kl_" in cli("keys", "revoke", keys[0]["prefix"])
    assert "may no longer use" in cli("revoke", "client-b", "acme-mug")

    cli("signing-key", tmp / "agency.key")
    assert "trusting bundles signed by agency" in cli("trust", "agency", tmp / "agency.key.pub")
    assert "wrote" in cli("export", "acme-mug@1", "--sign", tmp / "agency.key", "-o", tmp / "mug.tar")
    assert "imported client-mug@1 (draft)" in cli("import", tmp / "mug.tar", "--name", "client-mug")
    cli("export", "acme-mug@2", "-o", tmp / "unsigned.zip")
    assert "unsigned bundle" in cli("import", tmp / "unsigned.zip", "--name", "x-mug", expect=2)
    assert "imported x-mug@1" in cli("import", tmp / "unsigned.zip", "--name", "x-mug", "--allow-unsigned")

    audit = json.loads(cli("audit", "--json"))
    actions = [row["action"] for row in audit]
    assert {"version.add", "version.approve", "grant.add", "key.create", "bundle.accept-unsigned"} <= set(actions)
    assert any(row["outcome"] == "denied" and row["action"] == "version.approve" for row in audit)
    assert "intact" in cli("audit", "--verify")
    assert "audit log" in cli("audit", "--limit", "3")
    assert "wrote" in cli("audit", "export", tmp / "audit.jsonl")
    assert len((tmp / "audit.jsonl").read_text().splitlines()) > 10
    assert "pruned 0 audit rows" in cli("audit", "prune", "--before", "2000-01-01")
    assert "ok" in cli("verify").splitlines()[-1]
    assert "removed 0 orphan blobs" in cli("gc")
    assert "retired" in cli("retire", "acme-mug@2")
    assert "schema at revision 0002" in cli("upgrade")


def test_tampering_and_bad_input_exit_nonzero(cli):
    tmp = cli.tmp
    cli("init")
    cli("add", make_concept_file(tmp / "a.safetensors", 0), "--name", "acme-mug")
    assert "unknown concept 'nope'" in cli("approve", "nope@1", expect=2)
    assert "unknown version acme-mug@7" in cli("approve", "acme-mug@7", expect=2)
    assert "scopes must be some of" in cli("keys", "create", "--principal", "p", "--scopes", "root", expect=2)
    assert "ISO date" in cli("audit", "prune", "--before", "last tuesday", expect=2)
    with sqlite3.connect(tmp / "lib" / "library.sqlite") as db:
        db.execute("UPDATE audit_log SET actor = 'someone else' WHERE id = 2")
    out = cli("audit", "--verify", expect=1)
    assert "row 2: content does not match its hash (edited)" in out
    assert "PROBLEMS FOUND" in cli("verify", expect=1)


def test_no_library_is_one_clear_line(cli):
    assert "no concept library at" in cli("list", expect=2)
