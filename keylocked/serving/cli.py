"""The ``keylocked serve`` verb: argv -> ServeConfig -> serve()."""

from __future__ import annotations

import argparse

from .config import ServeConfig

SERVE_HELP = {
    "library": "concept library folder or database URL (default: $KEYLOCKED_LIBRARY, else the per-user library)",
    "max_batch_size": "images per batched UNet call (requests with different concepts share it)",
    "max_wait_ms": "how long a request waits for others to share its batch",
    "training_workers": "training jobs run at once on this replica (0: accept none)",
    "replica_id": "stable, unique name of this replica (default: HOST:PORT); its unfinished jobs fail on restart",
    "device": "torch device (default: cuda when available, else cpu)",
}


def add_serve_parser(verbs) -> None:
    """Register ``serve`` on the ``keylocked`` sub-command parsers."""
    from ..cli import add_dataclass_arguments

    parser = verbs.add_parser(
        "serve", help="HTTP service: library concepts on one base model, mixed-concept batches (docs at /docs)"
    )
    add_dataclass_arguments(parser, ServeConfig, help=SERVE_HELP)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> None:
    from ..cli import dataclass_from_args
    from .app import serve

    serve(dataclass_from_args(ServeConfig, args))
