"""Resident concepts for a long-running pipeline: switching a concept in costs small tensor copies.

Per pipeline, once (``ConceptPool.__init__``): the base-model fingerprint, the covariance, the
wrapped layers, and ``max_resident`` slot tokens added to the tokenizer (one resize of the
embedding table). Per concept, once while it stays in the byte-bounded LRU cache: reading and
validating its file. Making a concept resident then copies its token embedding into a free slot's
embedding row and its vectors into that slot's per-layer buffers: no model-wide pass, no
tokenizer change, no allocation.

A request's prompt names a concept by its placeholder token; ``ConceptPool.rewrite`` swaps it for
the slot's token, so one tokenizer serves any number of concepts. A slot token is private: a
prompt that spells one is refused (it would read whatever concept is resident there).
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..base_model import KeylockedError, single_token_id
from ..concept import Concept
from ..covariance import Covariance, pipeline_folder, resolve_covariance
from ..loading import (
    check_concept_fits,
    check_concepts_separable,
    concept_dims,
    install_keylocked_layers,
    pipeline_fingerprint,
    uninstall_keylocked_layers,
)
from ..tokens import TokenizerSnapshot, add_tokens, restore_vocabulary
from ..validation import check_covariance_inverse

SLOT_PREFIX = "<keylocked-slot-"
_SLOT_PATTERN = re.compile(re.escape(SLOT_PREFIX), re.IGNORECASE)


@dataclass(frozen=True)
class CachedConcept:
    """A concept file read and checked against this pipeline once."""

    key: str
    concept: Concept
    superclass_id: int
    nbytes: int


class ConceptCache:
    """LRU of ``CachedConcept`` bounded by the bytes of their tensors (at least one entry kept)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 1:
            raise KeylockedError(f"cache_bytes must be positive, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, CachedConcept] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> CachedConcept | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry

    def put(self, entry: CachedConcept) -> None:
        if entry.key in self.entries:
            self.nbytes -= self.entries.pop(entry.key).nbytes
        self.entries[entry.key] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes and len(self.entries) > 1:
            _, evicted = self.entries.popitem(last=False)
            self.nbytes -= evicted.nbytes


def concept_key(source: str | os.PathLike) -> str:
    """Cache key of a concept file: its resolved path, size and modification time (new bytes, new key)."""
    path = Path(source)
    try:
        stat = path.stat()
    except OSError as error:
        raise KeylockedError(f"{path}: cannot read concept file ({error.strerror})") from None
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


class ConceptPool:
    """Owns a pipeline's keylocked state in serving mode: slots, resident concepts, the file cache.

    Not thread-safe by design: the engine's worker thread is its only caller while requests run.
    """

    def __init__(
        self,
        pipe,
        covariance: str | os.PathLike | Covariance | None = None,
        max_resident: int = 16,
        cache_bytes: int = 256 * 2**20,
        strict: bool = True,
    ):
        if getattr(pipe.unet, "_keylocked_context", None) is not None:
            raise KeylockedError("this pipeline already has keylocked concepts loaded; unload_concepts() first")
        if max_resident < 1:
            raise KeylockedError(f"max_resident must be at least 1, got {max_resident!r}")
        self.pipe = pipe
        self.cache = ConceptCache(cache_bytes)
        self.lock = threading.Lock()  # guards the cache for readers on other threads (prefetch)
        # -- per pipeline, once ---------------------------------------------------------------
        self.fingerprint = pipeline_fingerprint(pipe) if strict else None
        if isinstance(covariance, Covariance):
            self.covariance = covariance
        else:
            self.covariance = resolve_covariance(
                pipe.text_encoder, pipe.tokenizer, covariance, model_dir=pipeline_folder(pipe)
            )
        self.dims = concept_dims(pipe)
        if self.covariance.inverse.shape != (self.dims.text_dim, self.dims.text_dim):
            shape = tuple(self.covariance.inverse.shape)
            raise KeylockedError(f"covariance is {shape}, the text encoder is {self.dims.text_dim}-dimensional")
        check_covariance_inverse("covariance inverse", self.covariance.inverse)
        self._snapshot = TokenizerSnapshot(pipe.tokenizer)
        embed_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
        self.slots = [f"{SLOT_PREFIX}{i}>" for i in range(max_resident)]
        self.slot_ids = add_tokens(pipe.tokenizer, pipe.text_encoder, {s: torch.zeros(embed_dim) for s in self.slots})
        self.context = install_keylocked_layers(pipe.unet, self.covariance.inverse)
        device, dtype = pipe.unet.device, pipe.unet.dtype
        self.context.input_covariance_inv = self.context.input_covariance_inv.to(device)
        self._value_layers = self.context.value_layers  # cross-attention layer path -> wrapped to_v
        text_dim = self.context.input_covariance_inv.shape[0]
        for slot in self.slots:  # one buffer per slot and layer, refilled in place by _install
            self.context.add_concept(
                slot,
                torch.zeros(text_dim, device=device),
                torch.zeros(text_dim, device=device),
                beta=0.0,
                tau=1.0,
                value_targets_by_layer={
                    name: torch.zeros(layer.out_features, device=device, dtype=dtype)
                    for name, layer in self._value_layers.items()
                },
                active=False,
            )
        self.resident: OrderedDict[str, str] = OrderedDict()  # concept key -> slot, least recent first
        self.superclass_ids: dict[str, int] = {}  # slot -> super-category token id (global lock)
        self._hook = pipe.text_encoder.register_forward_hook(self._twin_hook, with_kwargs=True)
        self._busy = False
        self.switches = 0

    # -- per concept, once -----------------------------------------------------------------------
    def read(self, source: str | os.PathLike) -> CachedConcept:
        """The concept file at ``source``, read and checked once (then served from the LRU cache)."""
        key = concept_key(source)
        with self.lock:
            entry = self.cache.get(key)
        if entry is not None:
            return entry
        concept = Concept.load(source, self.dims)
        check_concept_fits(concept, self.pipe, self.fingerprint, source=str(source))
        if concept.covariance_sha256 and concept.covariance_sha256 != self.covariance.sha256:
            raise KeylockedError(
                f"{source}: concept was trained with another covariance (sha256 {concept.covariance_sha256[:12]}…, "
                f"this server's is {self.covariance.sha256[:12]}…)"
            )
        if _SLOT_PATTERN.search(concept.placeholder_token):
            raise KeylockedError(f"{source}: placeholder token {concept.placeholder_token!r} is reserved")
        superclass_id = single_token_id(self.pipe.tokenizer, concept.superclass_token)
        nbytes = sum(t.numel() * t.element_size() for t in concept.tensors().values())
        entry = CachedConcept(key, concept, superclass_id, nbytes)
        with self.lock:
            self.cache.put(entry)
        return entry

    # -- per request ---------------------------------------------------------------------------
    def check_together(self, entries: Iterable[CachedConcept]) -> None:
        """Concepts one row uses together must be separable (a well-conditioned Gram matrix)."""
        concepts = [entry.concept for entry in entries]
        if len(concepts) > 1:
            check_concepts_separable(concepts, self.covariance)

    def make_resident(self, entries: Iterable[CachedConcept]) -> dict[str, str]:
        """Concept key -> slot token for ``entries``, all resident together (least recently used
        other concepts are evicted). Small tensor copies per concept not yet resident."""
        entries = list({entry.key: entry for entry in entries}.values())
        if len(entries) > len(self.slots):
            raise KeylockedError(f"{len(entries)} concepts at once exceed max_resident={len(self.slots)}")
        wanted = {entry.key for entry in entries}
        for entry in entries:
            if entry.key in self.resident:
                self.resident.move_to_end(entry.key)
        changed = False
        for entry in entries:
            if entry.key in self.resident:
                continue
            self._install(entry, self._free_slot(wanted))
            changed = True
        if changed:
            self.context.touch()  # invalidates every layer's per-prompt cache
        return {entry.key: self.resident[entry.key] for entry in entries}

    def _free_slot(self, keep: set[str]) -> str:
        used = set(self.resident.values())
        for slot in self.slots:
            if slot not in used:
                return slot
        victim = next(key for key in self.resident if key not in keep)  # least recently used
        return self.resident.pop(victim)

    @torch.no_grad()
    def _install(self, entry: CachedConcept, slot: str) -> None:
        concept = entry.concept
        # the wrapped layer's weight, not ``unet.device``: diffusers walks every module for that
        device = next(iter(self._value_layers.values())).base_layer.weight.device
        table = self.pipe.text_encoder.get_input_embeddings().weight
        table[self.slot_ids[slot]] = concept.token_embedding.to(table.device, table.dtype)
        self.context.overwrite_concept(
            slot,
            concept.concept_input.to(device, torch.float32),
            concept.superclass_input.to(device, torch.float32),
            beta=concept.beta,
            tau=concept.temperature,
            value_targets_by_layer=concept.value_targets,
        )
        self.superclass_ids[slot] = entry.superclass_id
        self.resident[entry.key] = slot
        self.switches += 1

    def rewrite(self, prompt: str, tokens_to_slots: Mapping[str, str]) -> str:
        """``prompt`` with each requested concept's placeholder token replaced by its slot token."""
        if _SLOT_PATTERN.search(prompt):
            raise KeylockedError(f"prompt must not contain the reserved token prefix {SLOT_PREFIX!r}")
        for token in sorted(tokens_to_slots, key=len, reverse=True):
            prompt = prompt.replace(token, tokens_to_slots[token])
        return prompt

    def _twin_hook(self, module, args, kwargs, output):
        plan = self.context.row_plan
        if plan is None or self._busy:
            return None
        self._busy = True
        try:
            plan.register_twins(module, args, kwargs, output, self.slot_ids, self.superclass_ids)
        finally:
            self._busy = False
        return None

    def close(self) -> None:
        """Give the pipeline back as it was: no wrappers, no slot tokens, no hook."""
        self._hook.remove()
        uninstall_keylocked_layers(self.pipe.unet)
        restore_vocabulary(self.pipe.tokenizer, self.pipe.text_encoder, self._snapshot)
        self.resident.clear()
