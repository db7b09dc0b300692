"""Fuzz the concept reader: every mutated file loads fine or is refused with KeylockedError, memory
stays bounded, and a refused load leaves the pipeline exactly as it was."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_validation import identity_covariance, make_concept, peak_rss_bytes, pipe_state, split_file

import keylocked
from keylocked import KeylockedError

NAMES = ["token_embedding", "concept_input", "superclass_input", "value_targets.x", "__metadata__", ""]
METADATA_KEYS = ["format", "format_version", "placeholder_token", "superclass_token", "beta", "tau", "training"]
NUMBERS = st.one_of(
    st.integers(-3, 80),
    st.sampled_from([10**9, 2**31, 2**63, 2**64 + 1, -(2**63)]),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=4),
    st.booleans(),
)
TEXT_VALUES = st.one_of(
    st.sampled_from(["nan", "inf", "-1", "0", "1.0", "2", "", "{", "[]", "null", "<my-thing>", "Dog", "bear"]),
    st.text(max_size=8),
    NUMBERS,
)


@st.composite
def mutations(draw):
    """A list of (kind, argument) edits applied to the header JSON, the tensor bytes or the prefix."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(
            st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "metadata", "bytes", "truncate", "length"])
        )
        if kind == "dtype":
            value = draw(
                st.one_of(st.sampled_from(["F16", "BF16", "F32", "F64", "I32", "BOOL", "U8", "F8_E4M3"]), NUMBERS)
            )
            edits.append((kind, draw(st.sampled_from(NAMES[:3])), value))
        elif kind == "shape":
            edits.append((kind, draw(st.sampled_from(NAMES[:3])), draw(st.lists(NUMBERS, max_size=3))))
        elif kind == "offsets":
            edits.append((kind, draw(st.sampled_from(NAMES[:3])), draw(st.lists(NUMBERS, max_size=3))))
        elif kind in ("drop", "rename"):
            edits.append((kind, draw(st.sampled_from(NAMES)), draw(st.sampled_from(NAMES))))
        elif kind == "metadata":
            edits.append((kind, draw(st.sampled_from(METADATA_KEYS)), draw(TEXT_VALUES)))
        elif kind == "bytes":
            edits.append((kind, draw(st.integers(0, 10_000)), draw(st.binary(min_size=1, max_size=4))))
        else:
            edits.append((kind, draw(st.integers(0, 10_000)), None))
    return edits


def mutate(header: dict, data: bytes, edits) -> bytes:
    header = json.loads(json.dumps(header))
    prefix_length = None
    for kind, key, value in edits:
        entry = header.get(key)
        if kind in ("dtype", "shape", "offsets") and isinstance(entry, dict):
            entry[{"dtype": "dtype", "shape": "shape", "offsets": "data_offsets"}[kind]] = value
        elif kind == "drop":
            header.pop(key, None)
        elif kind == "rename" and key in header:
            header[value] = header.pop(key)
        elif kind == "metadata" and isinstance(header.get("__metadata__"), dict):
            header["__metadata__"][key] = value
        elif kind == "bytes" and data:
            position = key % len(data)
            data = data[:position] + value + data[position + len(value) :]
        elif kind == "truncate":
            data = data[: key % (len(data) + 1)]
        elif kind == "length":
            prefix_length = key
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if prefix_length is None else prefix_length) + text + data


@pytest.fixture(scope="module")
def fuzz_setup(tmp_path_factory):
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("fuzz")
    valid = make_concept(pipe).save(folder / "valid.safetensors")
    stock = render(pipe)
    return pipe, folder, split_file(valid), stock


def render(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a bear on a table", num_inference_steps=2, generator=generator, output_type="np").images


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=mutations())
def test_mutated_concept_files_load_or_are_refused_cleanly(fuzz_setup, edits):
    pipe, folder, (header, data), _ = fuzz_setup
    path = folder / "mutated.safetensors"
    path.write_bytes(mutate(header, data, edits))
    state = pipe_state(pipe)
    before = peak_rss_bytes()
    try:
        keylocked.load_concepts(pipe, path, covariance=identity_covariance(pipe))
    except KeylockedError as error:
        event(f"refused: {str(error).split(': ', 1)[-1][:40]}")
        assert pipe_state(pipe) == state  # refused: nothing changed
    else:
        event("loaded")
        keylocked.unload_concepts(pipe)
        assert pipe_state(pipe) == state
    assert peak_rss_bytes() - before < 100 * 2**20


def test_the_pipeline_renders_bit_identically_after_fuzzing(fuzz_setup):
    """Runs after the fuzz test above (pytest keeps definition order) on the same module-scoped pipe."""
    pipe, _, _, stock = fuzz_setup
    assert np.array_equal(render(pipe), stock)
