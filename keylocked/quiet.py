"""Silence named third-party messages that keylocked causes knowingly and that tell a user nothing.

Narrow on purpose: each message is named by its start and its logger (or warning), and only
inside the ``with`` block; every other warning still reaches the user.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

# logger name -> starts of the messages it logs that keylocked knowingly triggers.
LOADING_LOGS: dict[str, tuple[str, ...]] = {
    # emoji-64 pairs a BERT text encoder with StableDiffusionPipeline (which declares CLIP): intended.
    "diffusers.pipelines.pipeline_utils": ("Expected types for text_encoder",),
    # load_pipeline casts with .to(dtype) after loading; the list of fp32 modules is empty for SD UNets/VAEs.
    "diffusers.models.modeling_utils": ("There are modules in",),
    # importing the pipeline touches CLIPImageProcessor; keylocked's pipelines use no image processor.
    "transformers.utils.import_utils": ("`CLIPImageProcessor` requires torchvision", "`SiglipImageProcessor` requires"),
}
LORA_LOGS: dict[str, tuple[str, ...]] = {
    # a UNet-only LoRA file (what keylocked trains) has no text-encoder keys: expected, not a problem.
    "diffusers.loaders.lora_base": ("No LoRA keys associated to",),
    "diffusers.loaders.peft": ("No LoRA keys associated to",),
}
TEXTUAL_INVERSION_LOGS: dict[str, tuple[str, ...]] = {
    # diffusers' load_textual_inversion grows the table with mean_resizing and then overwrites the new rows.
    "transformers.modeling_utils": ("The new embeddings will be initialized from a multivariate normal",),
}
LORA_WARNINGS = ("Already found a `peft_config` attribute in the model",)  # several adapters at once: intended


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextmanager
def quiet(logs: dict[str, tuple[str, ...]], warning_starts: tuple[str, ...] = ()) -> Iterator[None]:
    """Drop the named log messages and Python warnings while the block runs."""
    with ExitStack() as stack:
        for name, starts in logs.items():
            logger, drop = logging.getLogger(name), _DropMessages(starts)
            logger.addFilter(drop)
            stack.callback(logger.removeFilter, drop)
        stack.enter_context(warnings.catch_warnings())
        for start in warning_starts:
            warnings.filterwarnings("ignore", message=re.escape(start))
        yield


@contextmanager
def no_loading_bars() -> Iterator[None]:
    """Hide diffusers' and transformers' "Loading ..." progress bars while the block runs, then restore them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = []
    for module in (diffusers_logging, transformers_logging):
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            restore.append(module.enable_progress_bar)
    try:
        yield
    finally:
        for enable in restore:
            enable()
