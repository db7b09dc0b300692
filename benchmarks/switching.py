"""Concept switching on a warm SD 1.5-shaped pipeline: ``ConceptPool`` vs ``load_concepts``/``unload_concepts``.

    nice -n 5 python benchmarks/switching.py --threads 2

Random weights built from SD 1.5's configs (``shapes.build_pipeline``): only shapes matter here.
Measured in one run on one machine:
1. the library path a new user takes: ``load_concepts(pipe, file)`` then ``unload_concepts(pipe)``
   (fingerprint, covariance, wrappers, tokenizer: all redone at every load);
2. ``ConceptPool``: the once-per-pipeline setup; per concept once, reading + validating its file
   (``read``, cold); and a switch: making a concept that is not resident usable (``read`` from
   the LRU cache + ``make_resident`` with an eviction + ``rewrite`` of the prompt), cycling more
   concepts than slots so that every switch evicts.
Prints a report and writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="load/unload rounds of the library path")
    parser.add_argument("--concepts", type=int, default=8, help="concept files cycled through the pool")
    parser.add_argument(
        "--slots", type=int, default=4, help="ConceptPool max_resident (< --concepts: every switch evicts)"
    )
    parser.add_argument("--switches", type=int, default=64)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "switching-sd15-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from shapes import build_pipeline, identity_covariance, random_concepts

    from keylocked import load_concepts, unload_concepts
    from keylocked.serving import ConceptPool

    started = time.perf_counter()
    pipe = build_pipeline("sd15", resolution=512)
    build_s = time.perf_counter() - started
    covariance = identity_covariance(pipe)
    folder = Path(tempfile.mkdtemp(prefix="keylocked-switching-"))
    paths = [str(c.save(folder / f"c{i}.safetensors")) for i, c in enumerate(random_concepts(pipe, args.concepts))]

    # -- 1. the library path: load_concepts + unload_concepts -------------------------------------
    load_s, unload_s = [], []
    for round_ in range(args.rounds):
        seconds, _ = timed(load_concepts, pipe, paths[round_ % len(paths)], covariance=covariance)
        load_s.append(seconds)
        seconds, _ = timed(unload_concepts, pipe)
        unload_s.append(seconds)

    # -- 2. the pool ---------------------------------------------------------------------------------
    setup_s, pool = timed(ConceptPool, pipe, covariance=covariance, max_resident=args.slots)
    read_cold_s = []
    for path in paths:
        seconds, _ = timed(pool.read, path)
        read_cold_s.append(seconds)
    switch_s, resident_only_s = [], []
    for index in range(args.switches):
        path = paths[index % len(paths)]  # cycles through more concepts than slots: each one evicts

        def switch(path=path):
            entry = pool.read(path)
            slots = pool.make_resident([entry])
            return pool.rewrite(
                f"a photo of a {entry.concept.placeholder_token}", {entry.concept.placeholder_token: slots[entry.key]}
            )

        before = pool.switches
        seconds, _ = timed(switch)
        assert pool.switches == before + 1, "every measured switch must install a concept that was not resident"
        switch_s.append(seconds)
        entry = pool.read(path)
        del pool.resident[entry.key]  # measure the copy alone: force the same concept in again
        seconds, _ = timed(pool.make_resident, [entry])
        resident_only_s.append(seconds)
    pool.close()

    ms = lambda values: round(1000 * statistics.median(values), 3)  # noqa: E731
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads},
        "torch": torch.__version__,
        "pipeline": "SD 1.5 shapes, random weights (16 cross-attention layers, d_text 768)",
        "build_pipeline_s": round(build_s, 2),
        "library_path": {
            "load_concepts_ms": ms(load_s),
            "unload_concepts_ms": ms(unload_s),
            "rounds": args.rounds,
            "load_all_ms": [round(1000 * s, 1) for s in load_s],
            "unload_all_ms": [round(1000 * s, 1) for s in unload_s],
        },
        "pool": {
            "setup_once_ms": round(1000 * setup_s, 1),
            "read_and_validate_cold_ms": ms(read_cold_s),
            "switch_not_resident_ms": ms(switch_s),
            "switch_not_resident_p95_ms": round(1000 * sorted(switch_s)[int(0.95 * (len(switch_s) - 1))], 3),
            "make_resident_copy_only_ms": ms(resident_only_s),
            "cold_file_plus_switch_ms": round(ms(read_cold_s) + ms(switch_s), 3),
            "slots": args.slots,
            "concepts": args.concepts,
            "switches": args.switches,
        },
    }
    library = results["library_path"]["load_concepts_ms"] + results["library_path"]["unload_concepts_ms"]
    results["speedup_vs_load_unload"] = round(library / results["pool"]["switch_not_resident_ms"], 1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
