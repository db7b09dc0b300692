"""Request and response bodies of the HTTP API (pydantic; they are also the OpenAPI schema at /docs)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..validation import check_beta, check_tau

REFERENCE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<version>[1-9][0-9]{0,8}))?$")


def parse_reference(reference: str) -> tuple[str, int | None]:
    """'acme-mug' -> ('acme-mug', None) (latest approved), 'acme-mug@3' -> ('acme-mug', 3)."""
    match = REFERENCE.match(reference)
    if match is None:
        raise ValueError(f"concept reference must be NAME or NAME@VERSION, got {reference[:80]!r}")
    version = match.group("version")
    return match.group("name"), int(version) if version else None


class ConceptChoice(BaseModel):
    """One concept of a generation: a library reference and, optionally, its gate settings."""

    model_config = ConfigDict(extra="forbid")
    ref: str = Field(description="NAME (latest approved version) or NAME@VERSION", max_length=140)
    beta: float | None = Field(None, description="gate bias; lower = stronger concept (default: the file's)")
    tau: float | None = Field(None, description="gate temperature > 0 (default: the file's)")

    @field_validator("ref")
    @classmethod
    def _reference(cls, value: str) -> str:
        parse_reference(value)
        return value

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | None) -> float | None:
        return None if value is None else check_beta(value)

    @field_validator("tau")
    @classmethod
    def _tau(cls, value: float | None) -> float | None:
        return None if value is None else check_tau(value)


class ImageRequest(BaseModel):
    """POST /v1/images. Limits beyond these types (prompt length, images, steps) are the server's settings."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="use each concept's placeholder token, e.g. 'a <acme-mug> on a desk'")
    negative_prompt: str | None = None
    concepts: list[str | ConceptChoice] = Field(default_factory=list, description="'NAME', 'NAME@VERSION' or objects")
    lock: Literal["local", "global"] = "local"
    seed: int | None = Field(None, ge=0, lt=2**63, description="image i uses seed + i; default: random")
    steps: int = Field(25, ge=1, description="denoising steps")
    guidance_scale: float = Field(7.5, ge=0.0, le=100.0, allow_inf_nan=False)
    num_images: int = Field(1, ge=1)
    project: str | None = Field(None, max_length=200, description="the project to act in (default: the key's only one)")

    @field_validator("concepts")
    @classmethod
    def _concepts(cls, value: list[str | ConceptChoice]) -> list[str | ConceptChoice]:
        for item in value:
            if isinstance(item, str):
                parse_reference(item)
        return value

    def choices(self) -> list[ConceptChoice]:
        return [ConceptChoice(ref=item) if isinstance(item, str) else item for item in self.concepts]


class ResolvedConcept(BaseModel):
    name: str
    version: int
    sha256: str
    token: str
    super_category: str
    beta: float
    tau: float


class GeneratedImage(BaseModel):
    seed: int
    pixel_sha256: str = Field(description="sha256 of the decoded RGB pixels (what the audit row records)")
    png_sha256: str
    b64_png: str


class ImageResponse(BaseModel):
    request_id: str
    audit_id: int | str | None = Field(description="the audit row of this generation")
    concepts: list[ResolvedConcept]
    images: list[GeneratedImage]
    lock: str
    steps: int
    guidance_scale: float
    seconds: float


class ConceptVersionInfo(BaseModel):
    version: int
    status: str
    sha256: str
    bytes: int | None = None
    created_by: str | None = None
    created_at: datetime | str | None = None
    notes: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)


class ConceptInfo(BaseModel):
    name: str
    token: str
    super_category: str
    base_model_fingerprint: str
    usable_versions: list[int] = Field(default_factory=list, description="versions this key's project may use")
    versions: list[ConceptVersionInfo] = Field(default_factory=list)
    thumbnails: list[str] = Field(default_factory=list, description="URLs of sample images, when any were made")


class ConceptList(BaseModel):
    concepts: list[ConceptInfo]


class Grant(BaseModel):
    project: str
    concept: str
    pinned_version: int | None = Field(None, description="the only version the project may use; null: any approved")


class Me(BaseModel):
    """GET /v1/me: who the key is and what it may use (never the secret)."""

    principal: str = Field(description="the person or service the key belongs to")
    key_prefix: str = Field(description="kl_<prefix>: the key's public part")
    role: str = Field(description="'admin', else the key's scopes joined with '+', e.g. 'use+publish'")
    scopes: list[str]
    projects: list[str] = Field(description="the projects the key may act in; empty: any project")
    project: str | None = Field(None, description="the project requests act in (named, or the key's only one)")
    grants: list[Grant] = Field(
        default_factory=list, description="concepts granted to those projects (needs the 'use' scope)"
    )


class TrainingJob(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    concept: str
    token: str
    super_category: str
    project: str | None = None
    step: int = 0
    total_steps: int
    version: int | None = Field(None, description="the draft version made from the result")
    error: str | None = None
    replica: str
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime


class AuditRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int | str


class AuditPage(BaseModel):
    rows: list[dict[str, Any]]


class Health(BaseModel):
    status: Literal["ok", "starting", "unhealthy"]
    replica: str
    model: str
    base_model_fingerprint: str
    queue_depth: int
    training_jobs_running: int
    version: str


class Problem(BaseModel):
    """Every error: one line a person can act on."""

    detail: str | list[dict[str, Any]]
