"""The Stable Diffusion 1.x text stack (CLIPTextModel + CLIPTokenizer, padding with <|endoftext|>)."""

from __future__ import annotations

from conftest import build_tiny_clip_pipeline
from test_keylocking import config, generate

import keylocked
from keylocked.covariance import estimate_covariance
from keylocked.training import train_concept


def test_clip_pipeline_train_load_generate_unload(tmp_path, instance_dir):
    pipe = build_tiny_clip_pipeline(tmp_path / "tok")
    stock = generate(pipe, "a red bear on the table")
    path = train_concept(
        config(instance_dir, tmp_path / "out", placeholder_token="<my-bear>", superclass_token="bear"), pipe=pipe
    )
    assert (generate(pipe, "a red bear on the table") == stock).all()  # training hands the pipeline back stock
    keylocked.load_concepts(pipe, path, lock="global")
    ids = pipe.tokenizer("a <my-bear> on the table").input_ids
    assert len(ids) == 7 and ids[2] == len(pipe.tokenizer) - 1  # one new token, not split into pieces
    edited = generate(pipe, "a red <my-bear> on the table")
    keylocked.set_concept_options(pipe, active=set())  # same tokens and embedding, no key-locked edit
    unedited = generate(pipe, "a red <my-bear> on the table")
    keylocked.set_concept_options(pipe, active={"<my-bear>"})
    assert (generate(pipe, "a red <my-bear> on the table") == edited).all()  # deterministic: the edit is the change
    assert edited.shape == stock.shape
    assert abs(edited - unedited).mean() > 1e-3  # the concept's edit changes the image
    assert abs(edited - stock).mean() > 1e-3
    keylocked.unload_concepts(pipe)
    assert (generate(pipe, "a red bear on the table") == stock).all()  # unload restores it bit-identically


def test_clip_covariance_skips_eos_padding(tmp_path):
    pipe = build_tiny_clip_pipeline(tmp_path / "tok")
    covariance = estimate_covariance(
        pipe.text_encoder, pipe.tokenizer, ["a bear", "the red cup on the table"], progress=False
    )
    # <|startoftext|> + words + <|endoftext|>; the <|endoftext|> padding after it is not counted
    assert int(covariance.info["count"]) == (2 + 2) + (6 + 2)
