"""Per-row concept sets, the concept pool and the batched generation engine, on the tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny_pipeline

import keylocked
from keylocked.base_model import cross_attention_layers
from keylocked.concept import Concept
from keylocked.covariance import Covariance
from keylocked.layers import KeyLockedLinear
from keylocked.rows import ConceptOptions, RowConcepts, RowPlan, pipeline_rows, row_concepts, use_row_plan
from keylocked.serving import ConceptCache, ConceptPool, ConceptRef, EngineConfig, GenerationEngine, GenerationRequest
from keylocked.serving.pool import CachedConcept

STEPS = 2


def make_concept(pipe, token: str, superclass: str, seed: int) -> Concept:
    """Random concept with a low β: its gate fires on most tokens, so the edit is strong and visible."""
    generator = torch.Generator().manual_seed(seed)
    d_embed = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    d_text = pipe.text_encoder.config.hidden_size
    layers = cross_attention_layers(pipe.unet)
    return Concept(
        placeholder_token=token,
        superclass_token=superclass,
        token_embedding=torch.randn(d_embed, generator=generator),
        concept_input=torch.randn(d_text, generator=generator),
        superclass_input=torch.randn(d_text, generator=generator),
        value_targets={
            name: 3 * torch.randn(getattr(layer.to_v, "base_layer", layer.to_v).out_features, generator=generator)
            for name, layer in layers.items()
        },
        beta=-1.0,
        temperature=1.0,
    )


def identity_covariance(pipe) -> Covariance:
    return Covariance(torch.eye(pipe.text_encoder.config.hidden_size), "", {"corpus": "identity (test)"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("concepts")
    pipe = build_tiny_pipeline()
    specs = [("<teddy>", "bear", 1), ("<mug>", "cup", 2), ("<pup>", "dog", 3)]
    return [str(make_concept(pipe, t, s, seed).save(root / f"{t[1:-1]}.safetensors")) for t, s, seed in specs]


@pytest.fixture(scope="module")
def pool():
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pool = ConceptPool(pipe, covariance=identity_covariance(pipe), max_resident=3, strict=False)
    yield pool
    pool.close()


def images(pool, requests, **config) -> list:
    """Serve ``requests`` through one engine (queued first, so they can share batches)."""
    engine = GenerationEngine(pool, EngineConfig(output_type="np", **config), start=False)
    futures = [engine.submit(request) for request in requests]
    engine.start()
    engine.close()
    return [future.result() for future in futures], engine.metrics


def request(prompt, concepts=(), **options) -> GenerationRequest:
    return GenerationRequest(prompt, list(concepts), **{"num_inference_steps": STEPS, **options})


# ---------------------------------------------------------------------------------------
# Rows: order, per-row edits, the cache.


def test_pipeline_rows_follow_diffusers_row_order(tiny_pipe):
    """num_images_per_prompt repeats in place; guidance puts the negative half first."""
    assert pipeline_rows(["a", "b"], 2, guidance=True) == ["a", "a", "b", "b", "a", "a", "b", "b"]
    assert pipeline_rows(["a", "b"], 2, guidance=False) == ["a", "a", "b", "b"]
    seen = []
    layer = next(iter(cross_attention_layers(tiny_pipe.unet).values()))
    layer.to_k.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    with torch.no_grad():
        tiny_pipe(["a bear", "a red cup"], num_images_per_prompt=2, num_inference_steps=1, output_type="latent")
        bear, cup, empty = (tiny_pipe.encode_prompt(p, "cpu", 1, False)[0][0] for p in ("a bear", "a red cup", ""))
    expected = [empty, empty, empty, empty, bear, bear, cup, cup]  # as pipeline_rows lays them out
    assert all(torch.equal(row, want) for row, want in zip(seen[0], expected))


def test_rows_are_edited_with_their_own_concepts_only(tiny_pipe):
    """A row plan over two requests gives each request what it gets alone with its concept active."""
    first, second = make_concept(tiny_pipe, "<a>", "bear", 1), make_concept(tiny_pipe, "<b>", "cup", 2)
    keylocked.load_concepts(tiny_pipe, [first, second], covariance=identity_covariance(tiny_pipe))
    prompts = ["a <a> on the table", "a red <b>"]

    def run(prompt, count, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return tiny_pipe(
            prompt, num_images_per_prompt=count, num_inference_steps=1, generator=generators, output_type="np"
        ).images

    keylocked.set_concept_options(tiny_pipe, active={"<a>"})
    alone_a = run(prompts[0], 2, [0, 1])
    keylocked.set_concept_options(tiny_pipe, active={"<b>"})
    alone_b = run(prompts[1], 2, [2, 3])
    keylocked.set_concept_options(tiny_pipe, active={"<a>", "<b>"})
    union = run(prompts, 2, [0, 1, 2, 3])
    with row_concepts(tiny_pipe, pipeline_rows([["<a>"], ["<b>"]], 2)):
        mixed = run(prompts, 2, [0, 1, 2, 3])
    with row_concepts(tiny_pipe, pipeline_rows([["<b>"], ["<a>"]], 2)):
        swapped = run(prompts, 2, [0, 1, 2, 3])
    # the UNet's own batch-size numerics (BLAS kernels) stay below 1e-5; a wrong row assignment does not
    np.testing.assert_allclose(mixed, np.concatenate([alone_a, alone_b]), atol=1e-5)
    assert np.abs(union - mixed).max() > 1e-3  # the union of the batch is another edit (100x the tolerance)
    assert np.abs(swapped - mixed).max() > 1e-3
    with pytest.raises(keylocked.KeylockedError, match="row plan has 3 rows"):
        with row_concepts(tiny_pipe, [["<a>"], None, ["<b>"]]):
            tiny_pipe("a <a>", num_inference_steps=1, guidance_scale=1.0, num_images_per_prompt=2)
    with pytest.raises(keylocked.KeylockedError, match="unknown concept"):
        with row_concepts(tiny_pipe, [["<zzz>"]]):
            pass
    keylocked.unload_concepts(tiny_pipe)


def test_global_lock_is_per_row(tiny_pipe):
    """A global row's keys see its prompt with its own concept swapped for the super-category word."""
    concept = make_concept(tiny_pipe, "<a>", "bear", 1)
    keylocked.load_concepts(tiny_pipe, concept, covariance=identity_covariance(tiny_pipe))
    options = (ConceptOptions("<a>", -1.0, 1.0),)
    rows = [RowConcepts(options, "global"), RowConcepts(options, "local"), None]
    layer = next(iter(cross_attention_layers(tiny_pipe.unet).values()))
    with row_concepts(tiny_pipe, rows) as plan, torch.no_grad():
        encodings = tiny_pipe.encode_prompt("a <a> on the table", "cpu", 1, False)[0].repeat(3, 1, 1)
        superclass = tiny_pipe.encode_prompt("a bear on the table", "cpu", 1, False)[0]
        assert len(plan.twins) == 1 and torch.allclose(plan.twins[0][2], superclass)
        keys, values = layer.to_k(encodings), layer.to_v(encodings)
        local_keys = layer.to_k._edit(superclass, options)
    assert torch.equal(values[0], values[1])  # the value path sees the concept prompt in both rows
    assert torch.allclose(keys[0], local_keys[0]) and not torch.allclose(keys[0], keys[1])
    assert torch.equal(keys[2], layer.to_k.base_layer(encodings[2]))  # no concepts: the stock projection
    keylocked.unload_concepts(tiny_pipe)


def test_row_cache_never_serves_one_plan_to_another(tiny_pipe):
    """Same input tensor, other concept sets / β / lock: recomputed; same plan: served from cache."""
    concept = make_concept(tiny_pipe, "<a>", "bear", 1)
    keylocked.load_concepts(tiny_pipe, concept, covariance=identity_covariance(tiny_pipe))
    layer = next(iter(cross_attention_layers(tiny_pipe.unet).values())).to_k
    encodings = torch.randn(2, 16, tiny_pipe.text_encoder.config.hidden_size)
    plans = [
        [RowConcepts((ConceptOptions("<a>", -1.0, 1.0),)), None],
        [RowConcepts((ConceptOptions("<a>", 0.5, 1.0),)), None],
        [None, RowConcepts((ConceptOptions("<a>", -1.0, 1.0),))],
        [RowConcepts((ConceptOptions("<a>", -1.0, 1.0),), "global")] * 2,
        [None, None],
    ]

    def fresh(rows):
        layer.clear_cache()
        with use_row_plan(tiny_pipe, RowPlan(tuple(rows))), torch.no_grad():
            return layer(encodings)

    expected = [fresh(rows) for rows in plans]
    with torch.no_grad():
        for rows, want in zip(plans + plans, expected + expected):  # cache warm from the previous plan
            plan = RowPlan(tuple(rows))
            with use_row_plan(tiny_pipe, plan):
                assert torch.equal(layer(encodings), want)
                if any(rows):  # within one plan: served from the cache (all-None rows: the base layer)
                    assert layer(encodings) is layer(encodings)
    assert not torch.equal(expected[0], expected[1]) and not torch.equal(expected[0], expected[2])
    assert torch.equal(expected[4], layer.base_layer(encodings))
    keylocked.unload_concepts(tiny_pipe)


# ---------------------------------------------------------------------------------------
# The engine: the invariant, batching, failures.


def mixed_requests(files):
    teddy, mug, pup = files
    return [
        request("a photo of a <teddy> on the table", [ConceptRef(teddy, beta=-0.5)], seed=1),
        request("a <mug> and a <pup>", [ConceptRef(mug), ConceptRef(pup, tau=2.0)], num_images=2, seed=7),
        request("a <teddy> on the table", [ConceptRef(teddy)], lock="global", num_images=3, seed=1),
        request("a red cup", seed=3, negative_prompt="a dog"),
        request("a photo of a <teddy> on the table", [ConceptRef(teddy, beta=0.5)], seed=1),
    ]


@pytest.fixture()
def two_threads():
    """The invariant is measured at 2 threads: with 1, oneDNN switches the 1x1 proj_in convolution's
    algorithm at 16 rows (docs/serving.md); other tests may leave 1 thread set."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_request_gets_the_same_images_alone_or_in_a_mixed_batch(pool, files, two_threads):
    requests = mixed_requests(files)
    batched, metrics = images(pool, requests, max_batch_size=8, max_wait_ms=1000)
    assert metrics.batch_images == {8: 1} and metrics.completed == 5  # one UNet call for all
    alone, _ = images(pool, requests, max_batch_size=1, max_wait_ms=0)
    for one, many, req in zip(alone, batched, requests):
        assert len(one) == len(many) == req.num_images
        for a, b in zip(one, many):
            assert np.array_equal(a, b)  # bit-identical (CPU float32)
    # the concepts did act, per request: other β, other lock, no concept all give other images
    assert not np.array_equal(batched[0][0], batched[4][0])
    assert not np.array_equal(batched[0][0], batched[2][0])
    # image i uses seed + i, as `keylocked generate`
    assert not np.array_equal(batched[2][0], batched[2][1])


def test_engine_matches_load_concepts_path(pool, files, tiny_pipe):
    """The engine's edit equals the library's: load_concepts + one pipeline call, seeds seed + i."""
    concept = Concept.load(files[0])
    (served,), _ = images(pool, [request("a <teddy> on the table", [ConceptRef(files[0])], num_images=2, seed=4)])
    keylocked.load_concepts(tiny_pipe, concept, covariance=identity_covariance(tiny_pipe))
    generators = [torch.Generator("cpu").manual_seed(4 + i) for i in range(2)]
    direct = tiny_pipe(
        "a <teddy> on the table",
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        generator=generators,
        output_type="np",
    ).images
    keylocked.unload_concepts(tiny_pipe)
    np.testing.assert_allclose(np.stack(served), direct, atol=1e-5)


def test_dynamic_batching_groups_by_settings_and_size(pool, files):
    requests = [
        request("a bear", num_images=2),
        request("a cup", num_images=2, num_inference_steps=1),  # another batch key
        request("a dog", num_images=1),
        request("a red bear", num_images=2),  # would exceed max_batch_size=4 with the first two
    ]
    seen = []
    engine = GenerationEngine(pool, EngineConfig(max_batch_size=4, max_wait_ms=1000, output_type="np"), start=False)
    engine.metrics.listeners.append(lambda event, value: seen.append((event, value)))
    futures = [engine.submit(r) for r in requests]
    assert engine.metrics.queue_depth == 4
    engine.start()
    engine.close()
    assert [len(f.result()) for f in futures] == [2, 2, 1, 2]
    assert engine.metrics.batch_images == {3: 1, 2: 2} and engine.metrics.batches == 3
    assert ("batch_images", 3) in seen and engine.metrics.queue_depth == 0


def test_a_failing_or_cancelled_request_does_not_break_the_others(pool, files, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a concept")
    engine = GenerationEngine(pool, EngineConfig(max_batch_size=8, max_wait_ms=1000, output_type="np"), start=False)
    good = engine.submit(request("a <teddy>", [ConceptRef(files[0])]))
    bad = engine.submit(request("a <teddy>", [ConceptRef(str(broken))]))
    missing = engine.submit(request("a <teddy>", [ConceptRef(str(tmp_path / "gone.safetensors"))]))
    cancelled = engine.submit(request("a bear"))
    assert cancelled.cancel()
    twice = engine.submit(request("a <teddy>", [ConceptRef(files[0]), ConceptRef(files[0])]))
    twin = str(make_concept(pool.pipe, "<twin>", "bear", 1).save(tmp_path / "twin.safetensors"))  # teddy's i*
    inseparable = engine.submit(request("a <teddy> <twin>", [ConceptRef(files[0]), ConceptRef(twin)]))
    engine.start()
    engine.close()
    assert len(good.result()) == 1
    for future in (bad, missing, twice, inseparable):
        with pytest.raises(keylocked.KeylockedError):
            future.result()
    assert (engine.metrics.completed, engine.metrics.failed, engine.metrics.cancelled) == (1, 4, 1)
    with pytest.raises(keylocked.KeylockedError, match="shut down"):
        engine.submit(request("a bear"))


def test_a_batch_that_fails_is_served_one_request_at_a_time(pool, monkeypatch):
    original = GenerationEngine.generate

    def generate(self, group):
        if any("boom" in item.job.request.prompt for item in group):
            raise RuntimeError("boom")
        return original(self, group)

    monkeypatch.setattr(GenerationEngine, "generate", generate)
    engine = GenerationEngine(pool, EngineConfig(max_batch_size=8, max_wait_ms=1000, output_type="np"), start=False)
    fine = engine.submit(request("a bear", num_inference_steps=1))
    boom = engine.submit(request("boom", num_inference_steps=1))
    engine.start()
    engine.close()
    assert len(fine.result()) == 1
    with pytest.raises(RuntimeError, match="boom"):
        boom.result()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompt=" "), "prompt"),
        (dict(num_images=0), "num_images"),
        (dict(num_inference_steps=1.5), "num_inference_steps"),
        (dict(seed=-1), "seed"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(height=12), "height"),
        (dict(lock="both"), "lock"),
        (dict(concepts=[dict(source="x", tau=0.0)]), "tau"),
        (dict(concepts=[dict(source="x", beta=float("inf"))]), "beta"),
    ],
)
def test_bad_requests_are_refused_before_queueing(options, message):
    values = {"prompt": "a bear", **options}
    with pytest.raises(keylocked.KeylockedError, match=message):
        concepts = [ConceptRef(**ref) for ref in values.pop("concepts", [])]
        GenerationRequest(**values, concepts=concepts)


# ---------------------------------------------------------------------------------------
# The pool: residency, the LRU cache, privacy of slots, restoring the pipeline.


def test_switching_concepts_through_slots_gives_the_same_images(pool, files):
    teddy, mug, pup = files
    first, _ = images(pool, [request("a <teddy> and a bear", [ConceptRef(teddy)], seed=2)])
    # cycle more concepts than slots through the pool, then serve the first again (another slot)
    for source in (mug, pup, mug, pup):
        images(pool, [request("a <pup> <mug>", [ConceptRef(source)])])
    again, _ = images(pool, [request("a <teddy> and a bear", [ConceptRef(teddy)], seed=2)])
    assert np.array_equal(first[0][0], again[0][0])
    assert len(pool.resident) <= len(pool.slots)
    with pytest.raises(keylocked.KeylockedError, match="reserved"):
        pool.rewrite("a <KEYLOCKED-slot-0>", {})


def test_concept_cache_is_bounded_by_bytes():
    cache = ConceptCache(max_bytes=100)
    entries = [CachedConcept(f"k{i}", None, 0, 40) for i in range(3)]
    for entry in entries[:2]:
        cache.put(entry)
    assert cache.get("k0") is entries[0]  # k0 now most recent
    cache.put(entries[2])
    assert list(cache.entries) == ["k0", "k2"] and cache.nbytes == 80
    cache.put(CachedConcept("big", None, 0, 500))  # larger than the bound: kept alone
    assert list(cache.entries) == ["big"]


def test_pool_reads_each_file_once_and_close_restores_the_pipeline(files):
    pipe = build_tiny_pipeline()
    vocab = len(pipe.tokenizer)
    pool = ConceptPool(pipe, covariance=identity_covariance(pipe), max_resident=2, strict=True)
    assert pool.read(files[0]) is pool.read(files[0])
    assert (pool.cache.misses, pool.cache.hits) == (1, 1)
    with pytest.raises(keylocked.KeylockedError, match="already has keylocked"):
        ConceptPool(pipe)
    pool.close()
    assert len(pipe.tokenizer) == vocab
    assert not any(isinstance(m, KeyLockedLinear) for m in pipe.unet.modules())
