"""Settings of one `keylocked serve` replica (argv -> this dataclass -> create_app)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from ..base_model import KeylockedError
from ..validation import check_non_negative, check_positive

MiB = 1024 * 1024


@dataclass
class ServeConfig:
    pretrained_model_name_or_path: str = "emoji-64"
    library: str | None = None  # folder or database URL; None: $KEYLOCKED_LIBRARY, else the per-user default
    library_blobs: str | None = None  # the shared concept-file folder of a database-URL library
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8  # images per UNet call (rows before classifier-free guidance doubles them)
    max_wait_ms: float = 20.0  # how long the first request of a batch waits for company
    concept_cache_mb: float = 64.0  # resident concept files, LRU by bytes
    # Limits: checked before the model is touched.
    max_prompt_chars: int = 1000
    max_images: int = 8  # per request
    max_steps: int = 100
    max_concepts: int = 8  # per request
    max_json_kb: int = 256  # body of a JSON request
    max_concept_file_mb: float = 4.0  # an SD 1.5 concept is ~32 KB in fp16
    max_upload_mb: float = 32.0  # all training images of one job together
    max_training_steps: int = 2000
    thumbnail_steps: int = 20  # denoising steps of a concept version's sample image
    # Trainings: how many run at once in this replica (0: this replica only accepts and reports jobs).
    training_workers: int = 1
    work_dir: str | None = None  # training inputs/outputs; None: a folder under the system temp dir
    # Names this replica's training jobs; must be stable across restarts and unique among replicas.
    replica_id: str = field(default_factory=lambda: os.environ.get("KEYLOCKED_REPLICA_ID", ""))
    device: str | None = None  # None: cuda when available, else cpu

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prompt_chars", "max_images", "max_steps", "max_concepts", "max_json_kb"):
            if int(getattr(self, name)) < 1:
                raise KeylockedError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        check_non_negative("max_wait_ms", self.max_wait_ms)
        for name in ("concept_cache_mb", "max_concept_file_mb", "max_upload_mb"):
            check_positive(name, getattr(self, name))
        if not 0 <= int(self.port) <= 65535:
            raise KeylockedError(f"port must be in 0..65535, got {self.port!r}")
        if int(self.training_workers) < 0:
            raise KeylockedError(f"training_workers must be non-negative, got {self.training_workers!r}")
        if not self.replica_id.strip():
            self.replica_id = f"{socket.gethostname()}:{self.port}"

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_kb * 1024)

    @property
    def max_concept_file_bytes(self) -> int:
        return int(self.max_concept_file_mb * MiB)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MiB)
