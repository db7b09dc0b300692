"""The ``keylocked`` command: argv -> config dataclass -> library function, nothing else.

Verbs: covariance, train, generate, inspect, evaluate, demo, tune-beta. Flags are spelled as in
diffusers' training scripts (``--pretrained_model_name_or_path``, ``--train_batch_size``); those of
``train``, ``generate``, ``evaluate`` and ``demo`` are generated from their config dataclasses'
fields, so they cannot drift from them. Every failure is one ``error:`` line and an
:class:`ExitCode` (docs/cli.md); ``--debug`` adds the traceback.

"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import os
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .base_model import KeylockedError
from .demo import DemoConfig
from .generate import GenerateConfig
from .training.config import TrainConfig


class ExitCode(enum.IntEnum):
    """What ``keylocked`` returns; documented in docs/cli.md (a test keeps the two in step)."""

    OK = 0
    INTERNAL_ERROR = 1  # a bug in keylocked or a library under it: the message says to rerun with --debug
    USAGE_ERROR = 2  # bad flags, values or input files (argparse's own code for usage errors)
    SYSTEM_ERROR = 3  # the operating system refused: disk full, permission denied, out of memory
    BROKEN_PIPE = 141  # the reader of stdout went away (`keylocked inspect f | head`), as 128 + SIGPIPE
    INTERRUPTED = 130  # Ctrl-C, as 128 + SIGINT


EXIT_USER_ERROR = ExitCode.USAGE_ERROR
# Errors of the user's own input files and folders (the rest of OSError is the system's).
INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)
TRAIN_METHODS = ("perfusion", "textual-inversion", "custom-diffusion", "lora")  # keylocked.training.METHODS

TRAIN_HELP = {
    "instance_data_dir": "folder of images of the concept (or one image file)",
    "placeholder_token": "the new word for the concept, e.g. '<my-teddy>' (must not be in the vocabulary)",
    "superclass_token": "the super-category word whose keys are locked, e.g. 'teddy' (one token)",
    "resolution": "training image size (default: the model's native size)",
    "mask": "loss mask: 'attention' (the UNet's own map of the concept), 'none', or a folder of mask images",
    "resume_from_checkpoint": "a checkpoint folder or 'latest'",
    "overwrite": "replace another run's outputs and checkpoints in --output_dir (removed first)",
    "covariance": "covariance file from `keylocked covariance` (default: the cached vocabulary covariance)",
    "inference_beta": "recommended inference beta written into the concept file",
    "inference_tau": "recommended inference tau written into the concept file",
    "gradient_checkpointing": "recompute UNet activations in the backward pass: less GPU memory, slower steps",
    "edit": "edit form: 'paper' (W e⊥ + σ·o*) or 'gated_residual' (W e + σ·(o* − W i*)); see docs/method.md",
    "key_lock": "key lock: 'paper' (as Eq. 3 gives) or 'exact' (the concept token's key is the super-category's)",
    "covariance_positions": "positions of the default covariance: 'text' (start, words, end) or 'all' (+ padding)",
}
GENERATE_FLAGS: dict[str, dict[str, Any]] = {
    "concepts": dict(
        flags=["--concept"],
        action="append",
        nargs=None,
        required=True,
        metavar="FILE",
        help="a concept file; repeat for several concepts",
    ),
    "beta": dict(
        nargs="+",
        type=float,
        metavar="BETA",
        help="gate bias: one value for all concepts or one per concept (default: each file's "
        "recommendation); lower = stronger concept, higher = closer to the prompt",
    ),
    "tau": dict(nargs="+", type=float, metavar="TAU", help="gate temperature: one value or one per concept"),
    "lock": dict(help="key locking: 'local' (default) or 'global' (use a lower beta)"),
    "covariance": dict(help=TRAIN_HELP["covariance"]),
    "allow_other_base_model": dict(help="load concepts whose base-model fingerprint differs from this model's"),
}


# ---------------------------------------------------------------------------------------
# Flags from dataclass fields.


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    overrides: dict[str, dict[str, Any]] | None = None,
    help: dict[str, str] | None = None,
) -> None:
    """One ``--field_name`` flag per dataclass field (required when the field has no default)."""
    overrides, help = overrides or {}, help or {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"dest": field.name}
        annotation = _unwrap_optional(hints[field.name])
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(annotation))
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
        elif typing.get_origin(annotation) in (list, tuple) and typing.get_args(annotation)[0] in (int, float, str):
            kwargs.update(nargs="+", type=typing.get_args(annotation)[0])
        elif field.name not in overrides:
            raise TypeError(
                f"{cls.__name__}.{field.name}: no command-line flag for type {annotation!r}; add an override"
            )
        notes = [help[field.name]] if field.name in help else []
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS  # the dataclass's own default applies
            if not any("default" in note for note in notes):
                notes.append(f"(default: {field.default!r})")
        if notes:
            kwargs["help"] = " ".join(notes)
        kwargs.update(overrides.get(field.name, {}))
        flags = kwargs.pop("flags", [f"--{field.name}"])
        parser.add_argument(*flags, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in vars(args).items() if name in names})


# ---------------------------------------------------------------------------------------
# Verbs.


def _covariance(args: argparse.Namespace) -> None:
    from .covariance import estimate_covariance, read_captions
    from .models import load_pipeline
    from .text_stack import text_stack

    captions = read_captions(args.captions) if args.captions else None
    output = Path(args.output)
    if output.is_dir():
        raise KeylockedError(f"--output {output} is a folder; give a file name")
    pipe = load_pipeline(args.pretrained_model_name_or_path)
    covariance = estimate_covariance(
        text_stack(pipe),
        prompts=captions,
        corpus_name=str(args.captions) if args.captions else None,
        positions=args.positions,
    )
    covariance.save(output)
    for label in ("count", "condition_number", "ridge", "corpus"):
        print(f"{label:<17} {covariance.info[label]}")
    print(f"{'sha256':<17} {covariance.sha256}")
    print(f"saved {output}")


def _train(args: argparse.Namespace) -> None:
    from .training import train

    config = dataclass_from_args(TrainConfig, args)
    if args.beta == "auto" and args.method != "perfusion":
        raise KeylockedError("--beta auto applies to --method perfusion only")
    if args.register:
        _check_register(args)
    path = train(config, method=args.method)
    print(path)
    if args.beta == "auto":  # before registering: the library stores the file with its chosen β
        _print_beta_choice(
            _auto_beta(config.pretrained_model_name_or_path, path, config.instance_data_dir, args, config.covariance)
        )
    if args.register:
        from .library.resolve import register_version

        version = register_version(path, args.register, project=args.project, api_key=args.api_key)
        print(f"registered {version.reference} ({version.status})")


def _auto_beta(model: str, concept: str, references: str, args: argparse.Namespace, covariance: str | None):
    from .autobeta import BetaSearch, tune_concept_file

    search = BetaSearch(
        betas=tuple(args.betas), num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale
    )
    return tune_concept_file(model, concept, references, args.embedder, search, covariance)


def _print_beta_choice(choice) -> None:
    for beta in sorted(choice.harmonic_means):
        print(
            f"beta {beta:<5g} image {choice.image_alignment[beta]:.4f} text {choice.text_alignment[beta]:.4f} "
            f"harmonic mean {choice.harmonic_means[beta]:.4f}{'  <- chosen' if beta == choice.beta else ''}"
        )
    print(f"recommended beta {choice.beta:g} written into the concept file")


def _tune_beta(args: argparse.Namespace) -> None:
    _print_beta_choice(
        _auto_beta(args.pretrained_model_name_or_path, args.concept, args.instance_data_dir, args, args.covariance)
    )


def _add_beta_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--betas", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8, 0.9], help="β grid searched")
    parser.add_argument(
        "--embedder", default="emoji", help="scorer: 'emoji' (the shipped emoji evaluator) or a local CLIP folder"
    )


def _check_register(args: argparse.Namespace) -> None:
    """Before hours of training: the library exists and the name is usable."""
    from .library import Library, parse_reference

    if args.method != "perfusion":
        raise KeylockedError("--register takes Perfusion concepts only (--method perfusion)")
    if parse_reference(args.register)[1] is not None:
        raise KeylockedError(f"--register takes a concept name without @VERSION, got {args.register!r}")
    Library.open().close()


def _generate(args: argparse.Namespace) -> None:
    from .generate import generate

    for path in generate(dataclass_from_args(GenerateConfig, args), api_key=args.api_key):
        print(path)


def _inspect(args: argparse.Namespace) -> None:
    from .describe import describe, format_description

    description = describe(args.file)
    print(json.dumps(description, indent=2) if args.json else format_description(description))


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.__main__ import EvaluateInputs, run
    from .evaluation.evaluate import EvalConfig

    run(dataclass_from_args(EvaluateInputs, args), dataclass_from_args(EvalConfig, args), api_key=args.api_key)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    result = run_demo(dataclass_from_args(DemoConfig, args))
    for key, value in result.numbers.items():
        print(f"{key:<40} {value}")
    print(f"\nwrote {result.grid}\n      {result.report}\n      {result.concept}")


def _add_library_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--project", help="concept library project (docs/library.md)")
    parser.add_argument("--api_key", help="concept library key (default $KEYLOCKED_API_KEY; none: the local owner)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``error:`` line (not the whole usage block) and exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(ExitCode.USAGE_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


DEBUG_HELP = "on an error, print the full traceback (for bug reports)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keylocked", description="Perfusion (key-locked rank-one editing) for diffusers pipelines.")
    parser.add_argument("--version", action="version", version=f"keylocked {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    covariance = verbs.add_parser("covariance", help="estimate a text encoder's input covariance C⁻¹ and save it")
    covariance.add_argument("--pretrained_model_name_or_path", required=True)
    covariance.add_argument(
        "--captions", help="text file, one caption per line (default: prompts built from the tokenizer's vocabulary)"
    )
    covariance.add_argument("--output", required=True, help="covariance file to write (.safetensors)")
    covariance.add_argument(
        "--positions", default="text", choices=("text", "all"), help="'text' (start, words, end) or 'all' (+ padding)"
    )
    covariance.set_defaults(handler=_covariance)

    train = verbs.add_parser("train", help="train one concept")
    add_dataclass_arguments(train, TrainConfig, help=TRAIN_HELP)
    train.add_argument(
        "--method",
        default="perfusion",
        choices=TRAIN_METHODS,
        help="perfusion (default) or a baseline in the same data pipeline (keylocked.training.methods)",
    )
    train.add_argument(
        "--beta",
        choices=("auto",),
        default=None,
        help="auto: after training, choose the recommended beta by the harmonic mean of image and text alignment",
    )
    _add_beta_search_arguments(train)
    train.add_argument(
        "--register", metavar="NAME", help="add the result to the concept library as a new draft version"
    )
    _add_library_flags(train)
    train.set_defaults(handler=_train)

    generate = verbs.add_parser("generate", help="generate images with one or more concepts")
    add_dataclass_arguments(generate, GenerateConfig, overrides=GENERATE_FLAGS)
    generate.add_argument(
        "--api_key", help="concept library key for NAME[@VERSION] concepts (default $KEYLOCKED_API_KEY)"
    )
    generate.set_defaults(handler=_generate)

    inspect = verbs.add_parser("inspect", help="show what a concept or covariance file holds")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of aligned text")
    inspect.set_defaults(handler=_inspect)

    from .evaluation.__main__ import add_arguments as add_evaluate_arguments

    evaluate = verbs.add_parser("evaluate", help="score concepts of any method: image vs text alignment, Pareto plot")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    demo = verbs.add_parser("demo", help="personalize the embedded emoji-64 model end to end (CPU, minutes)")
    add_dataclass_arguments(demo, DemoConfig)
    demo.set_defaults(handler=_demo)

    tune = verbs.add_parser(
        "tune-beta", help="choose a concept's recommended beta on validation prompts and write it into the file"
    )
    tune.add_argument("--pretrained_model_name_or_path", required=True)
    tune.add_argument("--concept", required=True, help="the concept file to tune (rewritten in place)")
    tune.add_argument("--instance_data_dir", required=True, help="the concept's training images (image alignment)")
    tune.add_argument("--covariance", default=None)
    tune.add_argument("--num_inference_steps", type=int, default=25)
    tune.add_argument("--guidance_scale", type=float, default=7.5)
    _add_beta_search_arguments(tune)
    tune.set_defaults(handler=_tune_beta)
    from .library.cli import add_library_parser
    from .serving.cli import add_serve_parser

    add_library_parser(verbs, debug_help=DEBUG_HELP)
    add_serve_parser(verbs)
    for verb in verbs.choices.values():  # `keylocked train ... --debug` works too (SUPPRESS: keeps a global --debug)
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


class _StderrHandler(logging.Handler):
    """'warning: ...' lines on the current ``sys.stderr``."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _setup_logging() -> None:
    logger = logging.getLogger("keylocked")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler(logging.INFO))
        logger.setLevel(logging.INFO)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one ``warning:`` line, like keylocked's own (no source line, no path)."""
    print(f"warning: {_one_line(Warning(str(message)))} ({category.__name__})", file=file or sys.stderr)


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if lines else type(error).__name__


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one verb; every failure is one ``error:`` line on stderr and an :class:`ExitCode`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        _error("interrupted")
        return ExitCode.INTERRUPTED
    _setup_logging()
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():  # restores the caller's warning display when main() returns
            if not debug:
                warnings.showwarning = _warning_line
            return args.handler(args) or ExitCode.OK
    except BrokenPipeError:  # `keylocked inspect f | head`: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.BROKEN_PIPE
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        _error("interrupted")
        return ExitCode.INTERRUPTED
    except (KeylockedError, *INPUT_OS_ERRORS) as error:
        if debug:
            traceback.print_exc()
        _error(_one_line(error))
        return ExitCode.USAGE_ERROR
    except (OSError, MemoryError) as error:
        if debug:
            traceback.print_exc()
        _error(_one_line(error))
        return ExitCode.SYSTEM_ERROR
    except Exception as error:  # a bug: one line for the user, the traceback on request
        if debug:
            traceback.print_exc()
        message = f"{type(error).__name__}: {_one_line(error)}" if str(error).strip() else type(error).__name__
        _error(f"internal error: {message}" + ("" if debug else " (rerun with --debug for the traceback)"))
        return ExitCode.INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
