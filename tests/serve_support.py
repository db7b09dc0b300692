"""Helpers of the `keylocked serve` tests: concept files, a populated library, apps on the tiny model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from argon2 import PasswordHasher
from conftest import build_tiny_pipeline
from PIL import Image

from keylocked.base_model import cross_attention_layers
from keylocked.concept import Concept
from keylocked.covariance import BUNDLED_FILENAME, estimate_covariance
from keylocked.library import Library
from keylocked.library import keys as key_hashing
from keylocked.loading import pipeline_fingerprint
from keylocked.models import load_pipeline
from keylocked.serving.app import create_app
from keylocked.serving.config import ServeConfig

STEPS = 2


def make_concept(pipe, token: str, superclass: str, seed: int) -> Concept:
    """A concept file for ``pipe`` with random (but valid) vectors: the service does not care how it was trained."""
    generator = torch.Generator().manual_seed(seed)
    embed_dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    text_dim = int(pipe.text_encoder.config.hidden_size)
    return Concept(
        placeholder_token=token,
        superclass_token=superclass,
        token_embeddings=torch.randn(embed_dim, generator=generator),
        concept_input=torch.randn(text_dim, generator=generator),
        superclass_input=torch.randn(text_dim, generator=generator),
        value_targets={
            name: torch.randn(layer.to_v.out_features, generator=generator)
            for name, layer in cross_attention_layers(pipe.unet).items()
        },
        base_model_fingerprint=pipeline_fingerprint(pipe),
    )


def png_bytes(size: int = 16, colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(client, key, **body):
    """POST /v1/images (a TestClient or an httpx.Client), alpha on a table by default."""
    body = {"prompt": "a <alpha> on a table", "concepts": ["alpha"], "seed": 0, "steps": STEPS, **body}
    return client.post("/v1/images", json=body, headers=bearer(key))


class Setup:
    """A library with three concepts (alpha, beta approved and granted to project 'acme'; gamma
    approved but not granted), keys of every role, and apps on the tiny model serving it.

    ``location`` is a SQLite folder (default: ``root/library``) or a PostgreSQL URL with ``blobs``.
    """

    def __init__(self, root: Path, model_dir: Path, location: str | None = None, blobs: Path | None = None, **config):
        self.root, self.model_dir = root, model_dir
        self.location, self.blobs = location or str(root / "library"), blobs
        self.library = Library.init(self.location, blobs=blobs)
        # SQLite: the local owner is admin without a key; a server library bootstraps its first admin key.
        owner = None if self.library.is_sqlite else self.library.create_key("root", ["admin"]).key
        pipe = load_pipeline(model_dir)
        self.files = {}
        for name, token, superclass, seed in (
            ("alpha", "<alpha>", "bear", 1),
            ("beta", "<beta>", "cup", 2),
            ("gamma", "<gamma>", "dog", 3),
        ):
            path = make_concept(pipe, token, superclass, seed).save(root / f"{name}.safetensors")
            self.files[name] = path
            self.library.add(path, name, api_key=owner)
            self.library.approve(f"{name}@1", api_key=owner)
        self.library.grant("acme", "alpha", api_key=owner)
        self.library.grant("acme", "beta", api_key=owner)
        keys = {
            "designer": (["use"], ["acme"]),
            "publisher": (["use", "publish"], ["acme"]),
            "reviewer": (["use", "approve"], ["acme"]),
            "admin": (["admin"], []),
            "revoked": (["use"], ["acme"]),
        }
        self.owner = owner
        self.keys = {who: self.new_key(who, scopes, projects) for who, (scopes, projects) in keys.items()}
        self.library.revoke_key(self.keys["revoked"].split("_")[1], api_key=owner)
        self.config = ServeConfig(
            pretrained_model_name_or_path=str(model_dir),
            library=self.location,
            library_blobs=str(blobs) if blobs else None,
            max_batch_size=8,
            max_wait_ms=config.pop("max_wait_ms", 150.0),
            work_dir=str(root / "work"),
            replica_id=config.pop("replica_id", "test-replica"),
            **config,
        )

    def new_key(self, principal: str, scopes: list[str], projects: list[str]) -> str:
        with pytest.MonkeyPatch.context() as patch:  # argon2 at its smallest cost, as the library tests do
            patch.setattr(key_hashing, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))
            return self.library.create_key(principal, scopes, projects=projects, api_key=self.owner).key

    def app(self, pipe=None, **overrides):
        config = ServeConfig(**{**self.config.__dict__, **overrides})
        return create_app(config, pipe=pipe, library=Library.open(self.location, blobs=self.blobs))


def model_folder(folder: Path) -> Path:
    """The tiny pipeline saved as a model folder with its covariance bundled (as a deployment ships
    it: estimated once, offline; here from a few prompts, to keep the test fast)."""
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(folder)
    prompts = ["a bear", "a red cup", "the table", "a photo of a dog", "a small bear on the table"]
    estimate_covariance(pipe.text_encoder, pipe.tokenizer, prompts, progress=False).save(folder / BUNDLED_FILENAME)
    return folder
