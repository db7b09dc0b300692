"""``keylocked library ...``: a thin argparse layer over ``Library`` (rich tables, ``--json`` for scripts)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from datetime import datetime
from typing import Any

from .api import API_KEY_ENV, GC_MIN_AGE_SECONDS, Library, generate_key_pair, parse_reference

EXIT_PROBLEMS = 1  # verify / audit --verify found problems


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        data = {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for extra in ("reference", "ok"):
            if hasattr(type(value), extra):
                data[extra] = _jsonable(getattr(value, extra))
        return data
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(_jsonable(value), indent=2, sort_keys=True))


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    # Piped output (a log, a test) gets one wide line per row instead of rich's 80-column wrapping.
    Console(width=None if sys.stdout.isatty() else 240).print(table)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _open(args: argparse.Namespace) -> Library:
    return Library.open(args.library, blobs=args.blobs)


def _key(args: argparse.Namespace) -> str | None:
    return args.api_key or os.environ.get(API_KEY_ENV) or None


# ---------------------------------------------------------------------------------------
# Verbs.


def _init(args: argparse.Namespace) -> None:
    with Library.init(args.library, blobs=args.blobs) as library:
        where = {"database": library.location.display, "blobs": str(library.store.root)}
        _print_json(where) if args.json else print(f"library ready: {where['database']} (blobs in {where['blobs']})")


def _upgrade(args: argparse.Namespace) -> None:
    with Library.open(args.library, blobs=args.blobs, upgrade=True) as library:
        revision = library.upgrade()
    _print_json({"revision": revision}) if args.json else print(f"schema at revision {revision}")


def _add(args: argparse.Namespace) -> None:
    with _open(args) as library:
        version = library.add(
            args.file,
            args.name,
            notes=args.notes,
            base_model_name=args.base_model_name,
            project=args.project,
            api_key=_key(args),
        )
    _print_json(version) if args.json else print(
        f"added {version.reference} ({version.status}, sha256 {version.sha256[:12]})"
    )


def _list(args: argparse.Namespace) -> None:
    with _open(args) as library:
        concepts = library.list(api_key=_key(args))
    if args.json:
        return _print_json(concepts)
    rows = []
    for c in concepts:
        latest = c.latest_approved
        statuses = " ".join(f"{v.number}:{v.status}" for v in c.versions)
        rows.append(
            [
                c.name,
                c.placeholder_token,
                c.superclass_token,
                latest.number if latest else "-",
                statuses,
                c.base_model_name or c.base_model_fingerprint[:12],
            ]
        )
    _table("concepts", ["name", "token", "super-category", "approved", "versions", "base model"], rows)


def _show(args: argparse.Namespace) -> None:
    with _open(args) as library:
        concept = library.show(args.name, api_key=_key(args))
    if args.json:
        return _print_json(concept)
    print(f"{concept.name}: token {concept.placeholder_token}, super-category {concept.superclass_token}")
    print(f"base model {concept.base_model_name or '?'} ({concept.base_model_fingerprint})")
    rows = [
        [v.number, v.status, v.sha256[:12], v.size, v.created_by, _when(v.created_at), v.status_by, v.notes]
        for v in concept.versions
    ]
    _table("versions", ["#", "status", "sha256", "bytes", "created by", "created", "status by", "notes"], rows)
    if concept.grants:
        _table(
            "grants", ["project", "version"], [[g.project, g.pinned_version or "any approved"] for g in concept.grants]
        )


def _status(args: argparse.Namespace) -> None:
    with _open(args) as library:
        verb = library.approve if args.verb_library == "approve" else library.retire
        version = verb(args.reference, api_key=_key(args))
    _print_json(version) if args.json else print(f"{version.reference} is {version.status}")


def _grant(args: argparse.Namespace) -> None:
    with _open(args) as library:
        grant = library.grant(args.project, args.concept, api_key=_key(args))
    pinned = f"@{grant.pinned_version}" if grant.pinned_version else " (any approved version)"
    _print_json(grant) if args.json else print(f"project {grant.project} may use {grant.concept}{pinned}")


def _revoke(args: argparse.Namespace) -> None:
    with _open(args) as library:
        library.revoke(args.project, args.concept, api_key=_key(args))
    _print_json({"revoked": True}) if args.json else print(f"project {args.project} may no longer use {args.concept}")


def _grants(args: argparse.Namespace) -> None:
    with _open(args) as library:
        grants = library.grants(project=args.project, api_key=_key(args))
    if args.json:
        return _print_json(grants)
    rows = [
        [g.project, g.concept, g.pinned_version or "any approved", g.created_by, _when(g.created_at)] for g in grants
    ]
    _table("grants", ["project", "concept", "version", "granted by", "when"], rows)


def _keys_create(args: argparse.Namespace) -> None:
    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    with _open(args) as library:
        created = library.create_key(args.principal, scopes, projects=args.project or (), api_key=_key(args))
    if args.json:
        return _print_json(created)
    print(created.key)
    print(f"(the key for {created.info.principal}, scopes {','.join(created.info.scopes)}: shown only now)")


def _keys_revoke(args: argparse.Namespace) -> None:
    with _open(args) as library:
        info = library.revoke_key(args.prefix, api_key=_key(args))
    _print_json(info) if args.json else print(f"revoked {info.prefix} ({info.principal})")


def _keys_list(args: argparse.Namespace) -> None:
    with _open(args) as library:
        keys = library.list_keys(api_key=_key(args))
    if args.json:
        return _print_json(keys)
    rows = [
        [
            k.prefix,
            k.principal,
            ",".join(k.scopes),
            ",".join(k.projects) or "any",
            _when(k.created_at),
            _when(k.revoked_at) or "active",
        ]
        for k in keys
    ]
    _table("API keys", ["prefix", "principal", "scopes", "projects", "created", "revoked"], rows)


def _audit(args: argparse.Namespace) -> int | None:
    with _open(args) as library:
        if args.verify:
            report = library.verify_audit(api_key=_key(args))
            if args.json:
                _print_json(report)
            else:
                print(f"{report.rows} rows, head {report.head_hash[:16]}: " + ("intact" if report.ok else "PROBLEMS"))
                for problem in report.problems:
                    print(f"  {problem}")
            return 0 if report.ok else EXIT_PROBLEMS
        entries = library.audit(limit=args.limit, concept=args.concept, project=args.project, api_key=_key(args))
    if args.json:
        return _print_json(entries)
    rows = [
        [
            e.id,
            e.at[:19],
            e.actor,
            e.key_prefix and f"kl_{e.key_prefix}",
            e.action,
            f"{e.concept}@{e.version}" if e.version else e.concept,
            e.project,
            e.outcome,
            e.reason,
        ]
        for e in entries
    ]
    _table("audit log", ["id", "when (UTC)", "who", "key", "action", "concept", "project", "outcome", "reason"], rows)
    return None


def _audit_prune(args: argparse.Namespace) -> None:
    with _open(args) as library:
        removed = library.prune_audit(args.before, api_key=_key(args))
    _print_json({"removed": removed}) if args.json else print(f"pruned {removed} audit rows older than {args.before}")


def _audit_export(args: argparse.Namespace) -> None:
    with _open(args) as library:
        count = library.export_audit(args.output, args.format, api_key=_key(args))
    _print_json({"rows": count, "path": args.output}) if args.json else print(f"wrote {count} rows to {args.output}")


def _verify(args: argparse.Namespace) -> int:
    with _open(args) as library:
        report = library.verify(api_key=_key(args))
    if args.json:
        _print_json(report)
    else:
        print(f"blobs checked {report.blobs_checked}; audit rows {report.audit.rows}")
        for label, items in (
            ("missing", report.missing),
            ("mismatched", report.mismatched),
            ("orphan (gc removes)", report.orphans),
        ):
            for sha256 in items:
                print(f"  {label} blob {sha256}")
        for problem in report.audit.problems:
            print(f"  audit: {problem}")
        print("ok" if report.ok else "PROBLEMS FOUND")
    return 0 if report.ok else EXIT_PROBLEMS


def _gc(args: argparse.Namespace) -> None:
    with _open(args) as library:
        report = library.gc(min_age_seconds=args.min_age, api_key=_key(args))
    if args.json:
        return _print_json(report)
    print(f"removed {len(report.removed)} orphan blobs; kept {len(report.kept_young)} younger than {args.min_age:g} s")


def _export(args: argparse.Namespace) -> None:
    name, number = parse_reference(args.reference)
    output = args.output or f"{name}-{number}.tar"
    with _open(args) as library:
        path = library.export(args.reference, output, signing_key=args.sign, api_key=_key(args))
    _print_json({"bundle": str(path), "signed": bool(args.sign)}) if args.json else print(f"wrote {path}")


def _import(args: argparse.Namespace) -> None:
    with _open(args) as library:
        version = library.import_bundle(
            args.bundle, name=args.name, allow_unsigned=args.allow_unsigned, api_key=_key(args)
        )
    _print_json(version) if args.json else print(f"imported {version.reference} ({version.status})")


def _trust(args: argparse.Namespace) -> None:
    with _open(args) as library:
        signer = library.trust(args.name, args.public_key, api_key=_key(args))
    _print_json(signer) if args.json else print(f"trusting bundles signed by {signer.name} ({signer.public_key[:16]}…)")


def _signing_key(args: argparse.Namespace) -> None:
    private, public = generate_key_pair(args.path)
    if args.json:
        return _print_json({"private_key": str(private), "public_key": str(public)})
    print(f"wrote {private} (keep it secret) and {public} (give it to libraries that import your bundles)")


# ---------------------------------------------------------------------------------------
# Parser.


def add_library_parser(verbs: argparse._SubParsersAction, debug_help: str = "print the traceback of an error") -> None:
    """Add ``library`` and its verbs to the main ``keylocked`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    common.add_argument("--library", help="library folder or database URL (default $KEYLOCKED_LIBRARY, else per-user)")
    common.add_argument(
        "--blobs", help="blob folder (needed for a PostgreSQL library; default $KEYLOCKED_LIBRARY_BLOBS)"
    )
    common.add_argument("--api_key", help=f"API key (default ${API_KEY_ENV}; none: the owner of a local library)")
    common.add_argument("--json", action="store_true", help="print JSON for scripts")

    library = verbs.add_parser("library", help="the concept library: versions, approvals, projects, keys, audit")
    sub = library.add_subparsers(dest="verb_library", required=True, metavar="VERB")

    def verb(name: str, handler, help: str, parent=sub) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help, parents=[common])
        parser.set_defaults(handler=handler)
        return parser

    verb("init", _init, "create a library (or bring one up to date)")
    verb("upgrade", _upgrade, "migrate the schema to this keylocked's revision")
    add = verb("add", _add, "register a concept file as a new draft version")
    add.add_argument("file")
    add.add_argument("--name", required=True, help="concept name, e.g. acme-mug")
    add.add_argument("--notes", default="", help="why this version exists")
    add.add_argument("--base_model_name", default="", help="human name of the base model (first time it is seen)")
    add.add_argument("--project", help="the project it was trained for (checked against the key, audited)")
    verb("list", _list, "list concepts and their versions")
    show = verb("show", _show, "show one concept: versions, grants")
    show.add_argument("name")
    for name, help in (("approve", "draft -> approved"), ("retire", "-> retired (never served again)")):
        verb(name, _status, help).add_argument("reference", metavar="NAME@VERSION")
    grant = verb("grant", _grant, "let a project use a concept (NAME: any approved version; NAME@N: pinned)")
    grant.add_argument("project")
    grant.add_argument("concept", metavar="NAME[@VERSION]")
    revoke = verb("revoke", _revoke, "remove a project's grant")
    revoke.add_argument("project")
    revoke.add_argument("concept", metavar="NAME")
    verb("grants", _grants, "list grants").add_argument("--project")

    keys = sub.add_parser("keys", help="API keys: create, revoke, list")
    keys_sub = keys.add_subparsers(dest="verb_keys", required=True, metavar="VERB")
    create = verb("create", _keys_create, "create a key (printed once)", keys_sub)
    create.add_argument("--principal", required=True, help="who holds the key (a person or a service)")
    create.add_argument("--scopes", required=True, help="comma-separated: use,publish,approve,admin")
    create.add_argument("--project", action="append", help="restrict the key to this project (repeatable)")
    verb("revoke", _keys_revoke, "revoke a key by its prefix", keys_sub).add_argument("prefix")
    verb("list", _keys_list, "list keys (prefixes only)", keys_sub)

    audit = verb("audit", _audit, "show the audit log; --verify checks its hash chain")
    audit.add_argument("--verify", action="store_true", help="check the hash chain (nonzero exit on problems)")
    audit.add_argument("--limit", type=int, help="only the last N rows")
    audit.add_argument("--concept")
    audit.add_argument("--project")
    audit_sub = audit.add_subparsers(dest="verb_audit", required=False, metavar="VERB")
    prune = verb("prune", _audit_prune, "delete rows older than a date (the rest still verifies)", audit_sub)
    prune.add_argument("--before", required=True, help="ISO date, UTC (e.g. 2026-01-31)")
    export_audit = verb("export", _audit_export, "write the log as CSV or JSON Lines", audit_sub)
    export_audit.add_argument("output", help="file.csv or file.jsonl")
    export_audit.add_argument("--format", choices=["csv", "jsonl"], help="default: from the file suffix")

    verb("verify", _verify, "check every blob's sha256, orphans, and the audit chain")
    gc = verb("gc", _gc, "remove orphan blobs (no version refers to them)")
    gc.add_argument("--min_age", type=float, default=GC_MIN_AGE_SECONDS, help="seconds; younger orphans are kept")

    export = verb("export", _export, "write NAME@VERSION as a signed bundle (folder, .tar or .zip)")
    export.add_argument("reference", metavar="NAME@VERSION")
    export.add_argument("--sign", metavar="KEYFILE", help="ed25519 private key (see `library signing-key`)")
    export.add_argument("--output", "-o", help="bundle path (default NAME-VERSION.tar)")
    imp = verb("import", _import, "check a bundle's signature and sha256s, then add it as a draft")
    imp.add_argument("bundle")
    imp.add_argument("--name", help="register under this concept name (default: the bundle's)")
    imp.add_argument(
        "--allow-unsigned",
        "--allow_unsigned",
        dest="allow_unsigned",
        action="store_true",
        help="accept an unsigned or untrusted-signer bundle (audited)",
    )
    trust = verb("trust", _trust, "trust an ed25519 public key for bundle imports")
    trust.add_argument("name")
    trust.add_argument("public_key", help="PEM file, PEM text or 64 hex digits")
    verb("signing-key", _signing_key, "create an ed25519 key pair for signing bundles").add_argument("path")
