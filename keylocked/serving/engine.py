"""Batched generation: concurrent requests with different concepts share one UNet call.

``GenerationEngine.submit`` queues a ``GenerationRequest`` and returns a ``Future``; one worker
thread owns the pipeline. It waits up to ``max_wait_ms`` for requests that can share a UNet call
(same steps, guidance, size and scheduler; at most ``max_batch_size`` images), makes their
concepts resident in the ``ConceptPool``, and runs one pipeline call in which every row is edited
with exactly its own request's concepts (``keylocked.rows``). Images come back per request.

A request's images do not depend on what it was batched with (docs/serving.md): prompts are
encoded one at a time, each image has its own generator (seed + i, as ``keylocked generate``),
images are decoded one at a time, and with ``batch_invariant`` the UNet's vector-input linears
(time embedding) run row by row, because BLAS picks batch-size-dependent kernels for them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base_model import KeylockedError
from ..rows import LOCKS, ConceptOptions, RowConcepts, RowPlan, use_row_plan
from ..validation import check_beta, check_non_negative, check_tau
from .pool import CachedConcept, ConceptPool

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConceptRef:
    """A concept file a request uses, with optional β/τ (None: the file's recommendation)."""

    source: str
    beta: float | None = None
    tau: float | None = None

    def __post_init__(self) -> None:
        if self.beta is not None:
            object.__setattr__(self, "beta", check_beta(self.beta))
        if self.tau is not None:
            object.__setattr__(self, "tau", check_tau(self.tau))


@dataclass
class GenerationRequest:
    """One client's generation: ``num_images`` images of ``prompt`` with its concepts."""

    prompt: str
    concepts: list[ConceptRef] = field(default_factory=list)
    negative_prompt: str | None = None
    lock: str = "local"
    seed: int = 0  # image i uses seed + i
    num_images: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None
    scheduler: str = "default"

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise KeylockedError("prompt must be a non-empty string")
        self.concepts = [c if isinstance(c, ConceptRef) else ConceptRef(str(c)) for c in self.concepts]
        if self.lock not in LOCKS:
            raise KeylockedError(f"lock must be 'local' or 'global', got {self.lock!r}")
        for name in ("num_images", "num_inference_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KeylockedError(f"{name} must be an integer of at least 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise KeylockedError(f"seed must be a non-negative integer, got {self.seed!r}")
        self.guidance_scale = check_non_negative("guidance_scale", self.guidance_scale)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8):
                raise KeylockedError(f"{name} must be a positive multiple of 8, got {value!r}")

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a UNet call."""
        return (self.num_inference_steps, self.guidance_scale, self.height, self.width, self.scheduler)


@dataclass
class EngineConfig:
    max_batch_size: int = 8  # images per UNet call (classifier-free guidance doubles the rows)
    max_wait_ms: float = 20.0  # how long the oldest request waits for others to join its batch
    batch_invariant: bool = True  # a request's images do not depend on its batch (docs/serving.md)
    output_type: str = "pil"  # "pil" or "np", as diffusers

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise KeylockedError(f"max_batch_size must be an integer of at least 1, got {self.max_batch_size!r}")
        self.max_wait_ms = check_non_negative("max_wait_ms", self.max_wait_ms)
        if self.output_type not in ("pil", "np"):
            raise KeylockedError(f"output_type must be 'pil' or 'np', got {self.output_type!r}")


@dataclass
class EngineMetrics:
    """Plain counters and a listener list; the service wires them to Prometheus.

    Listeners get ``(event, value)``: "queue_depth" (requests waiting), "batch_images" (images
    per UNet call), "batch_requests", "batch_seconds", "request_seconds" (submit to result).
    """

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    batches: int = 0
    images: int = 0
    queue_depth: int = 0
    batch_images: Counter = field(default_factory=Counter)  # images per UNet call -> how many calls
    listeners: list[Callable[[str, float], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def emit(self, event: str, value: float) -> None:
        if event == "queue_depth":
            self.queue_depth = int(value)
        for listener in list(self.listeners):
            try:
                listener(event, value)
            except Exception:  # a broken metrics sink must not break generation
                logger.exception("metrics listener failed on %s", event)


@dataclass
class _Job:
    request: GenerationRequest
    future: Future
    enqueued: float


@dataclass
class _Prepared:
    """A request with its concept files read and checked."""

    job: _Job
    entries: list[tuple[CachedConcept, ConceptRef]]


class GenerationEngine:
    """Dynamic batching over one pipeline + ``ConceptPool``; one worker thread owns both."""

    def __init__(
        self,
        pool: ConceptPool,
        config: EngineConfig | None = None,
        metrics: EngineMetrics | None = None,
        schedulers: Mapping[str, object] | None = None,
        start: bool = True,
    ):
        self.pool = pool
        self.pipe = pool.pipe
        self.config = config or EngineConfig()
        self.metrics = metrics or EngineMetrics()
        self.schedulers = dict(schedulers or {"default": self.pipe.scheduler})
        self._pending: list[_Job] = []
        self._condition = threading.Condition()
        self._closing = False
        self._worker: threading.Thread | None = None
        if start:
            self.start()

    # -- queue ----------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> Future:
        """Queue ``request``; the future's result is its list of images (or the error it raised)."""
        if request.scheduler not in self.schedulers:
            raise KeylockedError(f"unknown scheduler {request.scheduler!r}; available: {sorted(self.schedulers)}")
        future: Future = Future()
        with self._condition:
            if self._closing:
                raise KeylockedError("the generation engine is shut down")
            self._pending.append(_Job(request, future, time.monotonic()))
            depth = len(self._pending)
            self._condition.notify_all()
        self.metrics.count("submitted")
        self.metrics.emit("queue_depth", depth)
        return future

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="keylocked-engine", daemon=True)
            self._worker.start()

    def close(self, wait: bool = True) -> None:
        """Stop taking requests; the queued ones are still served."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if wait and self._worker is not None:
            self._worker.join()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_batch(self) -> list[_Job] | None:
        """The oldest request and those that can join it, once full or after ``max_wait_ms``."""
        limit, wait = self.config.max_batch_size, self.config.max_wait_ms / 1000
        with self._condition:
            while not self._pending:
                if self._closing:
                    return None
                self._condition.wait()
            key = self._pending[0].request.batch_key()
            deadline = self._pending[0].enqueued + wait
            while not self._closing:
                waiting = sum(j.request.num_images for j in self._pending if j.request.batch_key() == key)
                remaining = deadline - time.monotonic()
                if waiting >= limit or remaining <= 0:
                    break
                self._condition.wait(remaining)
            batch, images = [], 0
            for job in list(self._pending):
                if job.request.batch_key() != key:
                    continue
                if batch and images + job.request.num_images > limit:
                    continue
                batch.append(job)
                images += job.request.num_images
                self._pending.remove(job)
            depth = len(self._pending)
        self.metrics.emit("queue_depth", depth)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            running = []
            for job in batch:
                if job.future.set_running_or_notify_cancel():
                    running.append(job)
                else:
                    self.metrics.count("cancelled")
            if not running:
                continue
            try:
                self._serve(running)
            except Exception as error:  # a bug here must not leave futures waiting forever
                logger.exception("the engine failed serving a batch")
                for job in running:
                    if not job.future.done():
                        self._finish(job, error=error)

    # -- one batch --------------------------------------------------------------------------------
    def _serve(self, jobs: list[_Job]) -> None:
        prepared = []
        for job in jobs:
            try:
                prepared.append(self._prepare(job))
            except Exception as error:  # this request's files or options: only it fails
                self._finish(job, error=error)
        for group in self._fit_slots(prepared):
            self._serve_group(group)

    def _prepare(self, job: _Job) -> _Prepared:
        entries = [(self.pool.read(ref.source), ref) for ref in job.request.concepts]
        tokens = [entry.concept.placeholder_token for entry, _ in entries]
        if len(set(tokens)) != len(tokens):
            raise KeylockedError(f"two of the request's concepts use the same token: {sorted(tokens)}")
        self.pool.check_together(entry for entry, _ in entries)
        return _Prepared(job, entries)

    def _fit_slots(self, prepared: list[_Prepared]) -> Iterator[list[_Prepared]]:
        """Split so that each group's distinct concepts fit in the pool's slots at once."""
        group: list[_Prepared] = []
        keys: set[str] = set()
        for item in prepared:
            item_keys = {entry.key for entry, _ in item.entries}
            if group and len(keys | item_keys) > len(self.pool.slots):
                yield group
                group, keys = [], set()
            group.append(item)
            keys |= item_keys
        if group:
            yield group

    def _serve_group(self, group: list[_Prepared]) -> None:
        started = time.monotonic()
        try:
            results = self.generate(group)
        except Exception as error:
            if len(group) == 1:
                self._finish(group[0].job, error=error)
                return
            logger.warning("a batch of %d requests failed (%s); serving them one at a time", len(group), error)
            for item in group:
                self._serve_group([item])
            return
        images = sum(item.job.request.num_images for item in group)
        self.metrics.count("batches")
        self.metrics.count("images", images)
        with self.metrics._lock:
            self.metrics.batch_images[images] += 1
        self.metrics.emit("batch_images", images)
        self.metrics.emit("batch_requests", len(group))
        self.metrics.emit("batch_seconds", time.monotonic() - started)
        for item, result in zip(group, results):
            self._finish(item.job, result=result)

    def _finish(self, job: _Job, result: list | None = None, error: BaseException | None = None) -> None:
        if error is not None:
            self.metrics.count("failed")
            job.future.set_exception(error)
        else:
            self.metrics.count("completed")
            job.future.set_result(result)
        self.metrics.emit("request_seconds", time.monotonic() - job.enqueued)

    @torch.no_grad()
    def generate(self, group: list[_Prepared]) -> list[list]:
        """One pipeline call for requests of one batch key; images per request, in order."""
        pipe, pool = self.pipe, self.pool
        first = group[0].job.request
        guidance = first.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        slots = pool.make_resident(entry for item in group for entry, _ in item.entries)
        prompts, negatives, per_request_rows, generators = [], [], [], []
        for item in group:
            request = item.job.request
            token_slots = {entry.concept.placeholder_token: slots[entry.key] for entry, _ in item.entries}
            prompts.append(pool.rewrite(request.prompt, token_slots))
            negative = request.negative_prompt
            negatives.append(pool.rewrite(negative, token_slots) if negative is not None else None)
            options = tuple(
                ConceptOptions(
                    slots[entry.key],
                    entry.concept.beta if ref.beta is None else ref.beta,
                    entry.concept.temperature if ref.tau is None else ref.tau,
                )
                for entry, ref in item.entries
            )
            row = RowConcepts(options, request.lock) if options else None
            per_request_rows += [row] * request.num_images
            generators += [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)]
        # A lone row takes other BLAS/oneDNN kernels than two or more: pad with a throw-away copy.
        padded = self.config.batch_invariant and len(per_request_rows) == 1 and not guidance
        if padded:
            per_request_rows *= 2
            generators.append(torch.Generator("cpu").manual_seed(first.seed))
        plan = RowPlan(tuple(per_request_rows + per_request_rows if guidance else per_request_rows))
        device = pipe._execution_device
        scheduler = pipe.scheduler
        pipe.scheduler = self.schedulers[first.scheduler]
        invariant = rowwise_vector_linears(pipe.unet) if self.config.batch_invariant else nullcontext()
        try:
            with use_row_plan(pipe, plan), invariant:
                positive_rows, negative_rows = [], []
                for item, prompt, negative in zip(group, prompts, negatives):
                    # one prompt at a time: the text encoder's numerics then do not depend on the batch
                    embeds, negative_embeds = pipe.encode_prompt(prompt, device, 1, guidance, negative)
                    positive_rows += [embeds] * item.job.request.num_images
                    negative_rows += [negative_embeds] * item.job.request.num_images
                if padded:
                    positive_rows.append(positive_rows[0])
                    negative_rows.append(negative_rows[0])
                latents = pipe(
                    prompt_embeds=torch.cat(positive_rows),
                    negative_prompt_embeds=torch.cat(negative_rows) if guidance else None,
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    height=first.height,
                    width=first.width,
                    generator=generators,
                    output_type="latent",
                ).images  # (rows, c, h, w)
        finally:
            pipe.scheduler = scheduler
        images = self._decode(latents[: len(generators) - int(padded)])
        results, start = [], 0
        for item in group:
            count = item.job.request.num_images
            results.append(images[start : start + count])
            start += count
        return results

    def _decode(self, latents: Tensor) -> list:
        """Latents -> images as the pipeline decodes them (one at a time when batch-invariant)."""
        pipe = self.pipe
        chunks = latents.split(1) if self.config.batch_invariant else [latents]
        images = []
        for chunk in chunks:
            decoded = pipe.vae.decode(chunk / pipe.vae.config.scaling_factor, return_dict=False)[0]
            flagged = None
            if getattr(pipe, "safety_checker", None) is not None:  # as the pipeline: flagged images stay black
                decoded, flagged = pipe.run_safety_checker(decoded, decoded.device, decoded.dtype)
            denormalize = [True] * decoded.shape[0] if flagged is None else [not f for f in flagged]
            out = pipe.image_processor.postprocess(
                decoded, output_type=self.config.output_type, do_denormalize=denormalize
            )
            images.extend(list(out))
        return images


@contextmanager
def rowwise_vector_linears(module: nn.Module) -> Iterator[None]:
    """Run every ``nn.Linear`` of ``module`` row by row on 2-D (batch, features) inputs.

    Those are the UNet's time-embedding MLP and the resnets' time projections: a few small
    matrix-vector products, where BLAS chooses a kernel (and so a summation order) by the
    number of rows. Row by row, a row's result no longer depends on its batch. Inputs of other
    shapes (tokens, pixels) take the stock path.
    """
    patched = [m for m in module.modules() if type(m) is nn.Linear]
    for linear in patched:
        linear.forward = _RowwiseForward(linear)  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        for linear in patched:
            del linear.forward


class _RowwiseForward:
    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def __call__(self, x: Tensor) -> Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        if x.dim() != 2 or x.shape[0] == 1:
            return F.linear(x, weight, bias)
        return torch.cat([F.linear(row, weight, bias) for row in x.split(1)])  # (B, out)
