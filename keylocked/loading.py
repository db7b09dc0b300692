"""Install Perfusion concepts into a diffusers pipeline, and remove them exactly.

Everything is checked before anything is changed: a failed load leaves the pipeline as it was.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base_model import KeylockedError, cross_attention_layers
from .concept import Concept, ConceptDims, check_concept_shapes
from .covariance import Covariance, pipeline_folder, resolve_covariance
from .edit_options import EDITS, KEY_LOCKS, track_concept_positions
from .layers import KeyLockedContext, KeyLockedLinear, Lock, WrappedLinear
from .perfusion import concept_correlation
from .text_stack import StackSnapshot, TextStack, text_stack
from .validation import (
    check_beta,
    check_choice,
    check_concept_inputs,
    check_covariance_inverse,
    check_finite_tensor,
    check_nonzero_vector,
    check_per_concept,
    check_tau,
)

logger = logging.getLogger(__name__)
PerConcept = float | Mapping[str, float] | None


# ---------------------------------------------------------------------------------------
# Wrapping the UNet's cross-attention projections (used by training and inference).


def install_keylocked_layers(
    unet: nn.Module, input_covariance_inv: Tensor, encoder_widths: list[int] | None = None
) -> KeyLockedContext:
    """Wrap every cross-attention ``to_k``/``to_v`` in a ``KeyLockedLinear`` sharing one context.

    ``encoder_widths``: the text stack's per-encoder widths (global locking matches each part).
    Over an existing installation this stacks: the existing context is returned (concepts are then
    added to it), provided it uses the same C⁻¹; a different one is refused, never replaced.
    """
    existing = getattr(unet, "_keylocked_context", None)
    if existing is not None:
        current = existing.input_covariance_inv
        if not torch.equal(current.cpu(), input_covariance_inv.detach().float().cpu()):
            raise KeylockedError(
                "concepts are already loaded with another covariance; unload_concepts() first, or use theirs"
            )
        return existing
    layers = cross_attention_layers(unet)
    context = KeyLockedContext(
        input_covariance_inv=input_covariance_inv.detach().float(), encoder_widths=list(encoder_widths or [])
    )
    for name, layer in layers.items():
        layer.to_k = KeyLockedLinear(layer.to_k, "key", context)
        layer.to_v = KeyLockedLinear(layer.to_v, "value", context)
        context.value_layers[name] = layer.to_v
    unet._keylocked_context = context
    for verb in PEFT_VERBS:
        if hasattr(type(unet), verb):  # a diffusers model with the PEFT mixin
            setattr(unet, verb, types.MethodType(_with_plain_projections(getattr(type(unet), verb)), unet))
    return context


def unwrap_projections(unet: nn.Module, wrapper_type: type[WrappedLinear]) -> None:
    """Put the original ``to_k``/``to_v`` back wherever a ``wrapper_type`` stands in for them."""
    for layer in cross_attention_layers(unet).values():
        for projection in ("to_k", "to_v"):
            module = getattr(layer, projection)
            if isinstance(module, wrapper_type):
                setattr(layer, projection, module.base_layer)


def uninstall_keylocked_layers(unet: nn.Module) -> None:
    """Put the original ``to_k``/``to_v`` modules back."""
    unwrap_projections(unet, KeyLockedLinear)
    for verb in PEFT_VERBS:
        unet.__dict__.pop(verb, None)
    if hasattr(unet, "_keylocked_context"):
        del unet._keylocked_context


# diffusers' PeftAdapterMixin verbs that change which module stands at to_k/to_v. peft refuses to
# wrap a module it does not know (a KeyLockedLinear), and diffusers' unload takes any module with a
# ``base_layer`` for one of peft's (and calls its ``get_base_layer``): either would leave the UNet
# half-changed. Around these calls the wrappers step aside, so a LoRA loaded after the concepts
# ends up exactly where loading it first puts it (under the edit, in the locked key o*_K).
PEFT_VERBS = ("load_lora_adapter", "add_adapter", "unload_lora")


@contextlib.contextmanager
def plain_projections(unet: nn.Module) -> Iterator[None]:
    """For the block, the projections keylocked wraps stand bare at ``to_k``/``to_v``; afterwards each
    wrapper wraps whatever stands there then (the projection, or peft's LoRA layer around it)."""
    stepped_aside = []
    for layer in cross_attention_layers(unet).values():
        for projection in ("to_k", "to_v"):
            module = getattr(layer, projection)
            if isinstance(module, KeyLockedLinear):
                setattr(layer, projection, module.base_layer)
                stepped_aside.append((layer, projection, module))
    try:
        yield
    finally:
        for layer, projection, module in stepped_aside:
            module.base_layer = getattr(layer, projection)
            setattr(layer, projection, module)
            module.clear_cache()
        if stepped_aside:
            stepped_aside[0][2].context.touch()  # the effective weights may have changed


def _with_plain_projections(method):
    """``method`` (a diffusers model verb), called with the projections bare; bound per UNet."""

    @functools.wraps(method)
    def call(unet, *args, **kwargs):
        with plain_projections(unet):
            return method(unet, *args, **kwargs)

    return call


# ---------------------------------------------------------------------------------------
# Pipeline-level state.


@dataclass
class _Installation:
    context: KeyLockedContext
    covariance: Covariance
    stack: TextStack
    snapshot: StackSnapshot
    concepts: dict[str, Concept] = field(default_factory=dict)
    token_ids: dict[str, list[int]] = field(default_factory=dict)  # token -> id in each tokenizer
    superclass_ids: dict[str, list[int]] = field(default_factory=dict)
    hooks: list = field(default_factory=list)

    def swaps(self, encoder: int) -> dict[int, int]:
        """Global locking, encoder ``encoder``: active concept token id -> its super-category's id."""
        context = self.context
        if context.row_plan is not None or context.lock != "global" or not context.active:
            return {}  # per-row concept sets register their own twins (_row_plan_hook)
        return {self.token_ids[t][encoder]: self.superclass_ids[t][encoder] for t in context.active}


def _installation(pipe) -> _Installation | None:
    return getattr(pipe.unet, "_keylocked_installation", None)


def concept_dims(pipe) -> ConceptDims:
    """The widths a concept needs to fit this pipeline (read from the modules, not their names)."""
    stack = text_stack(pipe)
    return ConceptDims(
        embed_dims=stack.embedding_dims(),
        text_dim=stack.d_text,
        value_widths={
            name: int(getattr(layer.to_v, "base_layer", layer.to_v).out_features)
            for name, layer in cross_attention_layers(pipe.unet).items()
        },
    )


def check_concept_fits(concept: Concept, pipe, fingerprint: str | None, source: str = "") -> None:
    """Raise a clear error if ``concept`` was not made for this pipeline's base model."""
    where = f"{source}: " if source else ""
    shapes = {name: tuple(t.shape) for name, t in concept.tensors().items()}
    check_concept_shapes(shapes, concept_dims(pipe), source)
    for name, tensor in concept.tensors().items():
        check_finite_tensor(f"{where}{name}", tensor)
    check_nonzero_vector(f"{where}concept_input (i*) of {concept.placeholder_token!r}", concept.concept_input)
    if fingerprint and concept.base_model_fingerprint and concept.base_model_fingerprint != fingerprint:
        raise KeylockedError(
            f"{where}concept was trained on another base model (fingerprint "
            f"{concept.base_model_fingerprint[:12]} != {fingerprint[:12]}); pass strict=False "
            "(--allow_other_base_model) to load it anyway"
        )


def check_concepts_separable(concepts: list[Concept], covariance: Covariance) -> None:
    """The Gram matrix of concepts that may be active together must be well-conditioned (no
    singular solve at generation): refuse (nearly) identical or zero concept inputs, naming them."""
    inputs = torch.stack([c.concept_input.double() for c in concepts])  # (n, d)
    correlation = concept_correlation(inputs, covariance.inverse)  # (n, n)
    check_concept_inputs([c.placeholder_token for c in concepts], correlation)


def pipeline_fingerprint(pipe) -> str:
    installation = _installation(pipe)
    stack = text_stack(pipe)
    vocab_sizes = installation.snapshot.vocab_sizes if installation else stack.base_vocabulary_sizes()
    return stack.base_model_fingerprint(pipe.unet, vocab_sizes)


def _per_concept(value: PerConcept, token: str, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, Mapping):
        return float(value.get(token, default))
    return float(value)


def load_concepts(
    pipe,
    concepts: Iterable[str | os.PathLike | Concept] | str | os.PathLike | Concept,
    beta: PerConcept = None,
    tau: PerConcept = None,
    lock: Lock = "local",
    covariance: str | os.PathLike | Covariance | None = None,
    strict: bool = True,
    edit: str | None = None,
    key_lock: str | None = None,
    project: str | None = None,
    api_key: str | None = None,
) -> list[str]:
    """Load concept files into a Stable Diffusion-style pipeline; returns their tokens.

    ``beta``/``tau`` are a float for all concepts, a {token: value} mapping, or None for
    each concept's recommended values. Lower beta = stronger concept; higher = closer to the
    prompt. ``lock`` is "local" (default) or "global". Call ``unload_concepts`` to restore
    the stock pipeline. ``edit`` ("paper" | "gated_residual") and ``key_lock`` ("paper" |
    "exact") select the edit's variant (docs/method.md); None: the form the concepts were trained with.
    A concept may also be a library reference (``acme-mug``, ``acme-mug@3``),
    checked for ``project`` with ``api_key`` (default ``$KEYLOCKED_API_KEY``).
    """
    if isinstance(concepts, (str, os.PathLike, Concept)):
        concepts = [concepts]
    concepts = list(concepts)
    from .library.resolve import looks_like_reference, resolve_concept_sources

    if any(
        looks_like_reference(c) for c in concepts
    ):  # `acme-mug[@3]`: key, grant, base model, audit (docs/library.md)
        fingerprint = pipeline_fingerprint(pipe) if strict else None
        concepts, _ = resolve_concept_sources(
            concepts, project=project, api_key=api_key, base_model_fingerprint=fingerprint
        )
    if lock not in ("local", "global"):
        raise KeylockedError(f"lock must be 'local' or 'global', got {lock!r}")
    # -- validate everything first ---------------------------------------------------------
    dims = concept_dims(pipe)
    loaded: list[Concept] = [item if isinstance(item, Concept) else Concept.load(item, dims) for item in concepts]
    if not loaded:
        raise KeylockedError("no concepts given")
    installation = _installation(pipe)
    edit = _edit_option("edit", edit, [c.edit for c in loaded], EDITS, installation)
    key_lock = _edit_option("key_lock", key_lock, [c.key_lock for c in loaded], KEY_LOCKS, installation)
    known = [c.placeholder_token for c in loaded] + list(installation.concepts if installation else ())
    beta = check_per_concept("beta", beta, known, check_beta)
    tau = check_per_concept("tau", tau, known, check_tau)
    tokens = [c.placeholder_token for c in loaded]
    duplicates = {t for t in tokens if tokens.count(t) > 1} | (
        set(tokens) & set(installation.concepts if installation else ())
    )
    if duplicates:
        raise KeylockedError(f"concept token(s) {sorted(duplicates)} loaded twice")
    stack = installation.stack if installation else text_stack(pipe)
    for token in tokens:
        stack.check_new_token(token)
    fingerprint = pipeline_fingerprint(pipe) if strict else None
    superclass_ids = {}
    for concept, item in zip(loaded, concepts):
        check_concept_fits(concept, pipe, fingerprint, source=str(item) if not isinstance(item, Concept) else "")
        superclass_ids[concept.placeholder_token] = stack.single_token_ids(concept.superclass_token)
    if installation is not None:
        if covariance is not None:
            raise KeylockedError("concepts are already loaded with a covariance; unload_concepts() first to change it")
        resolved = installation.covariance
    elif isinstance(covariance, Covariance):
        resolved = covariance
    else:
        resolved = resolve_covariance(stack, path=covariance, model_dir=pipeline_folder(pipe))
    if isinstance(covariance, Covariance):
        if covariance.inverse.shape != (dims.text_dim, dims.text_dim):
            shape = tuple(covariance.inverse.shape)
            raise KeylockedError(f"covariance is {shape}, the text encoder is {dims.text_dim}-dimensional")
        check_covariance_inverse("covariance inverse", covariance.inverse)
    check_concepts_separable(list(installation.concepts.values() if installation else ()) + loaded, resolved)
    for concept in loaded:
        if concept.covariance_sha256 and concept.covariance_sha256 != resolved.sha256:
            logger.warning(
                "%s was trained with another covariance (sha256 %s…, now %s…); its gate may fire differently",
                concept.placeholder_token,
                concept.covariance_sha256[:12],
                resolved.sha256[:12],
            )
    # -- then mutate -----------------------------------------------------------------------
    if installation is None:
        snapshot = stack.snapshot()
        context = install_keylocked_layers(pipe.unet, resolved.inverse, stack.widths)
        installation = _Installation(context=context, covariance=resolved, stack=stack, snapshot=snapshot)
        pipe.unet._keylocked_installation = installation
        installation.hooks = stack.register_twin_hooks(installation.swaps, context.register_global_pair)
        installation.hooks.append(
            stack.text_encoders[0].register_forward_hook(_row_plan_hook(installation), with_kwargs=True)
        )
        installation.hooks.append(track_concept_positions(stack.text_encoders[0], context.positions))
    token_ids = stack.add_tokens({c.placeholder_token: c.token_embeddings for c in loaded})
    installation.token_ids.update(token_ids)
    installation.context.positions.token_ids.update(
        {token: ids[0] for token, ids in token_ids.items()}
    )  # encoder 1 ids
    installation.superclass_ids.update(superclass_ids)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    context = installation.context
    context.input_covariance_inv = context.input_covariance_inv.to(device)
    for concept in loaded:
        token = concept.placeholder_token
        installation.concepts[token] = concept
        context.add_concept(
            token,
            concept.concept_input.to(device, torch.float32),
            concept.superclass_input.to(device, torch.float32),
            beta=_per_concept(beta, token, concept.beta),
            tau=_per_concept(tau, token, concept.temperature),
            value_targets_by_layer={name: t.to(device, dtype) for name, t in concept.value_targets.items()},
        )
    context.set_options(lock=lock, edit=edit, key_lock=key_lock)
    return tokens


def _edit_option(name: str, value: str | None, trained: list[str], choices, installation) -> str:
    """An explicit choice, else what is in force, else the form every concept was trained with."""
    if value is not None:
        return check_choice(name, value, choices)
    if installation is not None:
        return getattr(installation.context, name)
    if len(set(trained)) > 1:
        raise KeylockedError(
            f"the concepts were trained with different {name} forms {sorted(set(trained))}; pass {name}="
        )
    return trained[0]


def set_concept_options(
    pipe,
    beta: PerConcept = None,
    tau: PerConcept = None,
    lock: Lock | None = None,
    active: Iterable[str] | None = None,
    edit: str | None = None,
    key_lock: str | None = None,
) -> None:
    """Change β, τ, the lock mode, the edit form, the key lock or the active set, without reloading."""
    installation = _installation(pipe)
    if installation is None:
        raise KeylockedError("no keylocked concepts are loaded in this pipeline")
    context = installation.context
    beta = check_per_concept("beta", beta, list(context.concepts), check_beta)
    tau = check_per_concept("tau", tau, list(context.concepts), check_tau)
    if lock is not None and lock not in ("local", "global"):
        raise KeylockedError(f"lock must be 'local' or 'global', got {lock!r}")
    if active is not None:
        active = set(active)
        unknown = active - set(context.concepts)
        if unknown:
            raise KeylockedError(f"unknown concept token(s) {sorted(unknown)}; loaded: {sorted(context.concepts)}")
    context.set_options(
        beta={token: _per_concept(beta, token, slot.beta) for token, slot in context.concepts.items()},
        tau={token: _per_concept(tau, token, slot.temperature) for token, slot in context.concepts.items()},
        lock=lock,
        active=active,
        edit=None if edit is None else check_choice("edit", edit, EDITS),
        key_lock=None if key_lock is None else check_choice("key_lock", key_lock, KEY_LOCKS),
    )


def loaded_concepts(pipe) -> dict[str, Concept]:
    installation = _installation(pipe)
    return dict(installation.concepts) if installation else {}


def unload_concepts(pipe) -> None:
    """Remove every keylocked concept: tokens, embeddings, wrappers and hooks."""
    installation = _installation(pipe)
    if installation is None:
        return
    for hook in installation.hooks:
        hook.remove()
    uninstall_keylocked_layers(pipe.unet)
    installation.stack.restore(installation.snapshot)
    del pipe.unet._keylocked_installation


def _row_plan_hook(installation: _Installation):
    """Text-encoder hook (first encoder) for per-row concept sets (``keylocked.rows``): twins per
    global set. Per-row global locking is single-encoder for now; the stack's twin hooks serve the
    pipeline-wide lock (every encoder, SDXL included)."""
    busy = [False]

    def hook(module, args, kwargs, output):
        context = installation.context
        if busy[0] or context.row_plan is None:
            return None
        busy[0] = True
        try:
            context.row_plan.register_twins(
                module,
                args,
                kwargs,
                output,
                {t: ids[0] for t, ids in installation.token_ids.items()},
                {t: ids[0] for t, ids in installation.superclass_ids.items()},
            )
        finally:
            busy[0] = False
        return None

    return hook
