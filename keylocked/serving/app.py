"""The HTTP service: ``create_app(ServeConfig)`` -> a FastAPI application (``keylocked serve``).

Thin by design: access decisions and audit rows belong to the concept library
(``keylocked.library``, through ``access.LibraryAccess``), batching and concept residency to the
engine (``keylocked.serving``, through ``generation.Generator``), training to
``trainings.TrainingJobs``. This module checks inputs, maps errors to status codes and encodes
the results.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoint annotations at runtime.
import asyncio
import base64
import hashlib
import io
import logging
import secrets
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError

from .. import __version__
from ..base_model import KeylockedError
from ..concept import read_metadata
from .access import AccessError, LibraryAccess, Principal
from .config import ServeConfig
from .generation import ConceptRef, GenerationRequest, Generator
from .metrics import ServiceMetrics
from .provenance import pixel_sha256, png_with_provenance
from .schemas import (
    AuditPage,
    ConceptInfo,
    ConceptList,
    GeneratedImage,
    Health,
    ImageRequest,
    ImageResponse,
    Me,
    Problem,
    ResolvedConcept,
    TrainingJob,
    parse_reference,
)
from .trainings import TrainingJobs, TrainingRequest

logger = logging.getLogger(__name__)

ERRORS = {401: {"model": Problem}, 403: {"model": Problem}, 404: {"model": Problem}, 422: {"model": Problem}}
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and fields around the files
MAX_IMAGE_PIXELS = 4096 * 4096  # a decompression bomb is refused before it is decoded
THUMBNAILS_KEPT = 256  # PNGs of a few KB each, by version sha256 (oldest first out)
PAGE_DIR = Path(__file__).parent / "static"
# The page loads nothing from elsewhere; the policy makes the browser refuse it if it ever tried.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class ServiceState:
    """What one replica holds: the pipeline (through the generator), library access, jobs, metrics."""

    def __init__(self, config: ServeConfig, pipe=None, library=None) -> None:
        from ..library import Library

        self.config = config
        self.metrics = ServiceMetrics()
        # The library first: a wrong location is a one-line error before minutes of model loading.
        if not isinstance(library, Library):
            library = Library.open(library if library is not None else config.library, blobs=config.library_blobs)
        if pipe is None:
            from ..models import load_pipeline

            pipe = load_pipeline(config.pretrained_model_name_or_path, device=_device(config))
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.generator = Generator(
            pipe,
            max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_wait_ms,
            cache_bytes=int(config.concept_cache_mb * 1024 * 1024),
            metrics=self.metrics,
        )
        self.access = LibraryAccess(library, self.generator.fingerprint, config.replica_id)
        self.resolution = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
        self.jobs = TrainingJobs(
            library,
            replica=config.replica_id,
            train=self._train,
            register=self._register_training,
            workers=config.training_workers,
            work_dir=config.work_dir,
            on_change=self._count_jobs,
        )
        self.thumbnails: dict[str, bytes] = {}
        self._count_jobs()

    # -- training glue -------------------------------------------------------------------------
    def _train(self, request: TrainingRequest, images_dir: Path, output_dir: Path, on_step) -> Path:
        from .training_run import train_for_service

        return train_for_service(self.config.pretrained_model_name_or_path, request, images_dir, output_dir, on_step)

    def _register_training(self, request: TrainingRequest, concept_file: Path, job_id: str) -> int:
        return self.access.register_training(request.principal, request.concept, concept_file, job_id)

    def _count_jobs(self) -> None:
        counts = self.jobs.counts() if hasattr(self, "jobs") else {}
        for status in ("queued", "running", "succeeded", "failed"):
            self.metrics.trainings.labels(status).set(counts.get(status, 0))

    def close(self) -> None:
        self.jobs.close(wait=False)
        self.generator.close()


def _device(config: ServeConfig) -> str | None:
    if config.device:
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# The application.


def create_app(config: ServeConfig | None = None, pipe=None, library=None) -> FastAPI:
    """A FastAPI app serving one base model (``pipe``, else loaded from the config) from one library."""
    config = config or ServeConfig()
    state = ServiceState(config, pipe=pipe, library=library)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.generator.start()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="keylocked",
        version=__version__,
        summary="Perfusion concepts from a concept library on one base model, with mixed-concept batches.",
        lifespan=lifespan,
        responses=ERRORS,
    )
    app.state.service = state
    app.add_middleware(_RequestObserver, state=state)
    bearer = HTTPBearer(auto_error=False, description="an API key of the concept library: `kl_<prefix>_<secret>`")

    # -- errors: one line a person can act on ---------------------------------------------------
    @app.exception_handler(AccessError)
    async def _access_error(request: Request, error: AccessError) -> JSONResponse:
        request.state.audited = getattr(request.state, "audited", False) or error.audited
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse({"detail": error.detail}, status_code=error.status, headers=headers)

    @app.exception_handler(KeylockedError)
    async def _user_error(request: Request, error: KeylockedError) -> JSONResponse:
        return JSONResponse({"detail": str(error).splitlines()[0]}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))[:300], "type": e.get("type")}
            for e in error.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    # -- authentication -------------------------------------------------------------------------
    async def principal(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        key = credentials.credentials if credentials is not None else None
        found = await asyncio.to_thread(state.access.authenticate, key, _describe(request))
        request.state.principal = found
        return found

    def scoped(scope: str) -> Callable:
        async def dependency(request: Request, who: Annotated[Principal, Depends(principal)]) -> Principal:
            await asyncio.to_thread(state.access.require, who, scope, _describe(request))
            return who

        return dependency

    User = Annotated[Principal, Depends(scoped("use"))]
    Publisher = Annotated[Principal, Depends(scoped("publish"))]
    Approver = Annotated[Principal, Depends(scoped("approve"))]
    Admin = Annotated[Principal, Depends(scoped("admin"))]

    # -- unauthenticated: probes and scrapes (not audited: a load balancer polls them) -----------
    @app.get("/healthz", response_model=Health, tags=["operations"], responses={503: {"model": Health}})
    async def healthz():
        """200 while the engine's worker runs, else 503 (a load balancer takes the replica out)."""
        healthy = state.generator.healthy()
        health = Health(
            status="ok" if healthy else "unhealthy",
            replica=config.replica_id,
            model=config.pretrained_model_name_or_path,
            base_model_fingerprint=state.generator.fingerprint,
            queue_depth=state.generator.queue_depth(),
            training_jobs_running=(await asyncio.to_thread(state.jobs.counts)).get("running", 0),
            version=__version__,
        )
        return health if healthy else JSONResponse(health.model_dump(), status_code=503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        state.metrics.queue_depth.set(state.generator.queue_depth())
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    # -- who am I -------------------------------------------------------------------------------
    @app.get("/v1/me", response_model=Me, tags=["keys"])
    async def me(request: Request, who: Annotated[Principal, Depends(principal)], project: str | None = None) -> Me:
        """Who this key is: principal, role (scopes), projects, and the concepts granted to them."""
        row = await asyncio.to_thread(state.access.whoami, who, project)
        request.state.audited = who.has("use")  # grant.list left its rows; else the middleware writes one
        return Me(**row)

    # -- concepts -------------------------------------------------------------------------------
    @app.get("/v1/concepts", response_model=ConceptList, tags=["concepts"])
    async def list_concepts(request: Request, who: User, project: str | None = None) -> ConceptList:
        """The concepts this key's project may use (approved versions, or the pinned one)."""
        rows = await asyncio.to_thread(state.access.usable_concepts, who, project)
        request.state.audited = True
        return ConceptList(concepts=[ConceptInfo(**row) for row in rows])

    @app.get("/v1/concepts/{name}", response_model=ConceptInfo, tags=["concepts"])
    async def show_concept(request: Request, name: str, who: User, project: str | None = None) -> ConceptInfo:
        """Versions, status and metadata of one concept this key's project may use, with thumbnail URLs."""
        row = await asyncio.to_thread(state.access.concept, who, project, name)
        request.state.audited = True
        suffix = f"?project={project}" if project else ""
        row["thumbnails"] = [f"/v1/concepts/{name}/versions/{v}/thumbnail.png{suffix}" for v in row["usable_versions"]]
        return ConceptInfo(**row)

    @app.get(
        "/v1/concepts/{name}/versions/{version}/thumbnail.png",
        tags=["concepts"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def thumbnail(request: Request, name: str, version: int, who: User, project: str | None = None) -> Response:
        """A sample image of a version ("a photo of a <token>", seed 0), made once per replica and
        version and kept in memory; access is checked (and audited) on every call."""
        [item] = await asyncio.to_thread(state.access.resolve_all, who, project, [(name, version)])
        request.state.audited = True
        png = state.thumbnails.get(item.sha256)
        if png is None:
            job = GenerationRequest(
                prompt=f"a photo of a {item.token}",
                concepts=[ConceptRef(str(item.path))],
                seed=0,
                num_inference_steps=config.thumbnail_steps,
            )
            [image] = await asyncio.shield(asyncio.wrap_future(state.generator.submit(job)))
            provenance = {"prompt": job.prompt, "concepts": [item.reference], "seed": 0, "thumbnail": True}
            png = png_with_provenance(image, provenance)
            state.thumbnails[item.sha256] = png
            while len(state.thumbnails) > THUMBNAILS_KEPT:
                state.thumbnails.pop(next(iter(state.thumbnails)))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.post(
        "/v1/concepts",
        status_code=201,
        tags=["concepts"],
        max_body_size=config.max_concept_file_bytes + MULTIPART_OVERHEAD,
    )
    async def upload_concept(
        request: Request,
        who: Publisher,
        file: Annotated[UploadFile, File(description="a keylocked concept file (.safetensors)")],
        name: Annotated[str, Form(max_length=128)],
        notes: Annotated[str | None, Form(max_length=2000)] = None,
    ) -> dict[str, Any]:
        """Add a concept file as a new draft version (``publish`` scope); a reviewer approves it."""
        data = await file.read()
        row = await asyncio.to_thread(state.access.add_version, who, name, data, notes)
        request.state.audited = True
        return row

    # Body limits per route (not app-wide: Starlette answers an app-wide one in plain text, outside
    # the middleware that makes every error JSON).
    @app.post("/v1/concepts/{name}/versions/{version}/approve", tags=["concepts"], max_body_size=config.max_json_bytes)
    async def approve_version(request: Request, name: str, version: int, who: Approver) -> dict[str, Any]:
        """Approve a draft version (``approve`` scope): projects granted the concept may use it at once."""
        row = await asyncio.to_thread(state.access.approve, who, name, version)
        request.state.audited = True
        return row

    # -- images ---------------------------------------------------------------------------------
    @app.post("/v1/images", response_model=ImageResponse, tags=["images"], max_body_size=config.max_json_bytes)
    async def create_images(request: Request, body: ImageRequest, who: User):
        """Generate images with library concepts: PNGs with provenance, the versions used, the audit id."""
        started = time.perf_counter()
        _check_limits(body, config)
        choices = body.choices()
        names = [parse_reference(choice.ref)[0] for choice in choices]
        if len(set(names)) != len(names):
            raise KeylockedError(f"each concept may appear once per request, got {names}")
        resolved = await asyncio.to_thread(
            state.access.resolve_all, who, body.project, [parse_reference(choice.ref) for choice in choices]
        )
        request.state.audited = True  # each resolution left its row (allowed or denied)
        tokens = [item.token for item in resolved]
        if len(set(tokens)) != len(tokens):
            raise KeylockedError(f"two concepts of this request use the same placeholder token: {tokens}")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        used = [
            ResolvedConcept(
                name=item.name,
                version=item.version,
                sha256=item.sha256,
                token=item.token,
                super_category=item.super_category,
                beta=choice.beta if choice.beta is not None else defaults[0],
                tau=choice.tau if choice.tau is not None else defaults[1],
            )
            for item, choice in zip(resolved, choices)
            for defaults in [_recommended(item.path)]
        ]
        job = GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            concepts=[ConceptRef(str(item.path), u.beta, u.tau) for item, u in zip(resolved, used)],
            lock=body.lock,
            seed=seed,
            num_images=body.num_images,
            num_inference_steps=body.steps,
            guidance_scale=body.guidance_scale,
        )
        # Shielded: a client that goes away does not cancel its rows in a batch shared with others.
        try:
            images = await asyncio.shield(asyncio.wrap_future(state.generator.submit(job)))
        except KeylockedError:
            raise  # this request's input: 422
        except Exception as error:  # the engine already isolated it to this request; say so in one line
            logger.exception("generation failed")
            detail = f"generation failed ({type(error).__name__}); other requests are unaffected"
            raise HTTPException(500, detail) from None
        pixel_hashes = [pixel_sha256(image) for image in images]
        request_id = str(uuid.uuid4())
        audit_id = await asyncio.to_thread(
            state.access.record_generation,
            who,
            body.project,
            body.prompt,
            resolved,
            pixel_hashes,
            {
                "request_id": request_id,
                "seed": seed,
                "steps": body.steps,
                "guidance_scale": body.guidance_scale,
                "lock": body.lock,
                "beta_tau": {u.name: [u.beta, u.tau] for u in used},
            },
        )
        request.state.audited = True
        state.metrics.images.inc(len(images))
        out = []
        for index, (image, pixels) in enumerate(zip(images, pixel_hashes)):
            provenance = {
                "prompt": body.prompt,
                "negative_prompt": body.negative_prompt,
                "concepts": [u.model_dump() for u in used],
                "seed": seed + index,
                "steps": body.steps,
                "guidance_scale": body.guidance_scale,
                "lock": body.lock,
                "audit_id": audit_id,
                "request_id": request_id,
                "pixel_sha256": pixels,
                "base_model_fingerprint": state.generator.fingerprint,
                "keylocked": __version__,
            }
            png = png_with_provenance(image, provenance)
            out.append(
                GeneratedImage(
                    seed=seed + index,
                    pixel_sha256=pixels,
                    png_sha256=hashlib.sha256(png).hexdigest(),
                    b64_png=base64.b64encode(png).decode("ascii"),
                )
            )
        return ImageResponse(
            request_id=request_id,
            audit_id=audit_id,
            concepts=used,
            images=out,
            lock=body.lock,
            steps=body.steps,
            guidance_scale=body.guidance_scale,
            seconds=round(time.perf_counter() - started, 4),
        )

    # -- trainings ------------------------------------------------------------------------------
    @app.post(
        "/v1/trainings",
        status_code=202,
        response_model=TrainingJob,
        tags=["trainings"],
        max_body_size=config.max_upload_bytes + MULTIPART_OVERHEAD,
    )
    async def create_training(
        request: Request,
        who: Publisher,
        images: Annotated[list[UploadFile], File(description="1-10 photos of the concept")],
        name: Annotated[str, Form(max_length=128, description="library concept name of the result")],
        token: Annotated[str, Form(max_length=64, description="the new word, e.g. <acme-mug>")],
        super_category: Annotated[str, Form(max_length=64, description="one-token word, e.g. mug")],
        steps: Annotated[int, Form(ge=1)] = 400,
        train_batch_size: Annotated[int, Form(ge=1, le=16)] = 4,
        gradient_accumulation_steps: Annotated[int, Form(ge=1, le=16)] = 4,
        mask: Annotated[str, Form(pattern="^(attention|none)$")] = "attention",
        project: Annotated[str | None, Form(max_length=128)] = None,
    ) -> TrainingJob:
        """Train a concept from 1-10 images; the result becomes a draft version of ``name``."""
        if not state.jobs.workers:
            raise HTTPException(
                503, "this replica runs no training jobs (--training_workers 0); use a training replica"
            )
        if steps > config.max_training_steps:
            raise KeylockedError(f"steps must be at most {config.max_training_steps}, got {steps}")
        if not 1 <= len(images) <= 10:
            raise KeylockedError(f"give 1 to 10 images, got {len(images)}")
        encoded = [await _checked_image(upload, state.resolution // 2) for upload in images]
        job = await asyncio.to_thread(
            state.jobs.submit,
            TrainingRequest(
                concept=name,
                token=token,
                super_category=super_category,
                images=encoded,
                steps=steps,
                project=project,
                created_by=who.name,
                train_batch_size=train_batch_size,
                gradient_accumulation_steps=gradient_accumulation_steps,
                mask=mask,
                principal=who,
            ),
        )
        await asyncio.to_thread(state.access.audit_request, who, "training.submit", True, f"job {job['id']}", name)
        request.state.audited = True
        return TrainingJob(**job)

    async def _visible_job(job_id: str, who: Principal) -> dict[str, Any]:
        job = await asyncio.to_thread(state.jobs.get, job_id)
        if job is None or not (who.is_admin or job["created_by"] == who.name):
            raise HTTPException(404, f"training job {job_id} not found")
        return job

    @app.get("/v1/trainings/{job_id}", response_model=TrainingJob, tags=["trainings"])
    async def get_training(job_id: str, who: Publisher) -> TrainingJob:
        """A job's status and progress (any replica answers: the state is in the library database)."""
        return TrainingJob(**await _visible_job(job_id, who))

    @app.get("/v1/trainings/{job_id}/events", tags=["trainings"], response_class=StreamingResponse)
    async def training_events(job_id: str, who: Publisher) -> StreamingResponse:
        """Server-sent events: ``progress`` on every change, then ``done`` with the final state."""
        await _visible_job(job_id, who)
        return StreamingResponse(
            state.jobs.events(job_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # -- audit ----------------------------------------------------------------------------------
    @app.get("/v1/audit", response_model=AuditPage, tags=["audit"])
    async def audit(
        request: Request,
        who: Admin,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        concept: Annotated[str | None, Query(max_length=200)] = None,
        project: Annotated[str | None, Query(max_length=200)] = None,
    ) -> AuditPage:
        """The last ``limit`` audit rows, oldest first (``admin`` scope), optionally of one concept or project."""
        rows = await asyncio.to_thread(state.access.audit_rows, who, limit, concept, project)
        request.state.audited = True
        return AuditPage(rows=rows)

    # -- the web page (docs/page.md): static files calling the API above with the user's key ----
    app.mount("/static", StaticFiles(directory=PAGE_DIR), name="static")

    @app.get("/", include_in_schema=False, response_class=FileResponse)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", headers=PAGE_HEADERS)

    return app


# ---------------------------------------------------------------------------------------------
# Input checks (before anything touches the model).


def _check_limits(body: ImageRequest, config: ServeConfig) -> None:
    limits = {
        "prompt": (len(body.prompt), config.max_prompt_chars, "characters"),
        "negative_prompt": (len(body.negative_prompt or ""), config.max_prompt_chars, "characters"),
        "num_images": (body.num_images, config.max_images, ""),
        "steps": (body.steps, config.max_steps, ""),
        "concepts": (len(body.concepts), config.max_concepts, "concepts"),
    }
    for name, (value, limit, unit) in limits.items():
        if value > limit:
            raise KeylockedError(f"{name} must be at most {limit} {unit}".rstrip() + f" on this server, got {value}")


async def _checked_image(upload: UploadFile, min_size: int) -> bytes:
    """Decode an uploaded image (refusing non-images and decompression bombs); return it as PNG."""
    data = await upload.read()
    name = upload.filename or "image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise KeylockedError(f"{name}: {image.width}x{image.height} is too large (at most 4096x4096)")
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        if isinstance(error, KeylockedError):
            raise
        raise KeylockedError(f"{name}: not a readable image ({type(error).__name__})") from None
    if min(rgb.size) < min_size:
        raise KeylockedError(f"{name}: {rgb.width}x{rgb.height} is smaller than {min_size}px")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def _recommended(path: Path) -> tuple[float, float]:
    """The (β, τ) a concept file recommends, from its header."""
    metadata = read_metadata(path)
    return float(metadata.get("beta", 0.7)), float(metadata.get("tau", 0.15))


def _is_json(message) -> bool:
    headers = dict(message.get("headers") or [])
    return headers.get(b"content-type", b"").startswith(b"application/json")


def _describe(request: Request) -> str:
    return f"{request.method} {request.url.path}"


# ---------------------------------------------------------------------------------------------
# Metrics and the audit row of every /v1 request.


class _RequestObserver:
    """Pure ASGI middleware (no body buffering, SSE-safe): latency and status per route, and an
    audit row for every /v1 request whose handler did not write a more specific one."""

    def __init__(self, app, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        replaced = [False]

        async def observe_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if message["status"] == 413 and not _is_json(message):
                    # Starlette's body limit answers in plain text; every error here is JSON.
                    replaced[0] = True
                    limit = scope.get("starlette.max_body_size")
                    detail = "request body too large" + (f" (at most {limit} bytes here)" if limit else "")
                    response = JSONResponse({"detail": detail}, status_code=413)
                    await response(scope, receive, send)
                    return
            if replaced[0]:
                return
            await send(message)

        scope.setdefault("state", {})
        try:
            await self.app(scope, receive, observe_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.state.metrics.observe_request(method, route, status[0], time.perf_counter() - started)
            request_state = scope["state"]
            if scope.get("path", "").startswith("/v1/") and not request_state.get("audited"):
                who = request_state.get("principal")
                await asyncio.to_thread(
                    self.state.access.audit_request,
                    who,
                    f"http {method} {route}",
                    status[0] < 400,
                    f"status {status[0]}",
                    None,
                )


def serve(config: ServeConfig) -> None:
    """Load the model and library, then serve HTTP with uvicorn until interrupted."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=30)
