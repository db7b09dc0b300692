"""Load test of `keylocked serve` over loopback: batched vs one-at-a-time, in the same run.

    python benchmarks/serve.py                                  # emoji-64, 16 clients, 2 x 30 s
    python benchmarks/serve.py --clients 32 --seconds 30 --max_batch_size 16

For each mode a real server (`keylocked serve`, its own process) serves a temporary SQLite
library holding ``--concepts`` concepts (variants of the shipped demo concept, so they fit
emoji-64), while ``--clients`` threads send requests back to back for ``--seconds`` (or until
``--max_requests``), each with a random mix of 0-2 concepts, β and seed. Modes:

- one-at-a-time: ``--max_batch_size 1 --max_wait_ms 0`` (every request its own UNet call);
- batched: ``--max_batch_size B --max_wait_ms W`` (concurrent requests share UNet calls).

Reports per mode: requests, errors, lost requests (sent but never answered), p50/p95 latency,
images/s, and the batch sizes the server saw (its Prometheus histogram). JSON to ``--output``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keylocked.concept import Concept  # noqa: E402
from keylocked.library import Library  # noqa: E402

DEMO_CONCEPT = ROOT / "docs" / "demo" / "concept.safetensors"
PROMPTS = (
    "a {} on a red background",
    "a small {} in the top left corner on a green background",
    "a {} next to an apple",
    "a {} on a blue background",
)


def concept_variants(folder: Path, count: int) -> list[tuple[str, str, Path]]:
    """(name, token, file) of ``count`` concepts for emoji-64: the demo concept with its vectors
    perturbed (a load test needs distinct concepts of the right shapes, not good ones)."""
    base = Concept.load(DEMO_CONCEPT)
    variants = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)

        def jitter(t: torch.Tensor, scale: float = 0.05, generator: torch.Generator = generator) -> torch.Tensor:
            return t + scale * t.std() * torch.randn(t.shape, generator=generator)

        token = f"<bench-{index}>"
        concept = Concept(
            **{
                **base.__dict__,
                "placeholder_token": token,
                "token_embeddings": {key: jitter(t) for key, t in base.token_embeddings.items()},
                "concept_input": jitter(base.concept_input, 0.3),  # distinct i*: two concepts, a regular Gram
                "value_targets": {name: jitter(t) for name, t in base.value_targets.items()},
            }
        )
        variants.append((f"bench-{index}", token, concept.save(folder / f"bench-{index}.safetensors")))
    return variants


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, library: Path, port: int, batch: int, wait_ms: float, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "keylocked.cli", "serve", "--pretrained_model_name_or_path", args.model]
    command += ["--library", str(library), "--host", "127.0.0.1", "--port", str(port), "--training_workers", "0"]
    command += ["--max_batch_size", str(batch), "--max_wait_ms", str(wait_ms), "--replica_id", f"bench-{port}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("server did not start in 300 s")


def request_body(rng: random.Random, tokens: list[tuple[str, str]], steps: int) -> dict:
    chosen = rng.sample(tokens, k=rng.choice((0, 1, 1, 2)))
    if chosen:
        prompt = rng.choice(PROMPTS).format(" and a ".join(token for _, token in chosen))
    else:
        prompt = rng.choice(PROMPTS).format("bear")
    concepts = [{"ref": name, "beta": rng.choice((0.6, 0.7, 0.8))} for name, _ in chosen]
    return {"prompt": prompt, "concepts": concepts, "seed": rng.randrange(2**31), "steps": steps, "num_images": 1}


def load(args, port: int, key: str, tokens: list[tuple[str, str]]) -> dict:
    """``args.clients`` threads, back to back, for ``args.seconds`` or ``args.max_requests``."""
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    latencies, errors, lock = [], [], threading.Lock()
    sent = [0]
    stop_at = time.monotonic() + args.seconds

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=base, timeout=600) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if sent[0] >= args.max_requests:
                        return
                    sent[0] += 1
                body = request_body(rng, tokens, args.steps)
                started = time.perf_counter()
                try:
                    response = http.post("/v1/images", json=body, headers=headers)
                    ok = response.status_code == 200 and len(response.json()["images"]) == 1
                    failure = None if ok else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as error:
                    failure = f"{type(error).__name__}: {error}"
                with lock:
                    if failure:
                        errors.append(failure)
                    else:
                        latencies.append(time.perf_counter() - started)

    before = httpx.get(f"{base}/metrics", timeout=30).text  # the warm-up's batches are not the load's
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    batches = _histogram(metrics, "keylocked_batch_images", before)
    requests_per_batch = _histogram(metrics, "keylocked_batch_requests", before)
    answered = len(latencies) + len(errors)
    return {
        "requests_sent": sent[0],
        "requests_answered": answered,
        "lost": sent[0] - answered,
        "errors": len(errors),
        "error_samples": errors[:5],
        "wall_s": round(wall, 2),
        "images": len(latencies),
        "images_per_s": round(len(latencies) / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(_percentile(latencies, 0.95), 3) if latencies else None,
        "latency_max_s": round(max(latencies), 3) if latencies else None,
        "unet_batches": int(batches["count"]),
        "mean_images_per_batch": round(batches["sum"] / batches["count"], 2) if batches["count"] else None,
        "mean_requests_per_batch": (
            round(requests_per_batch["sum"] / requests_per_batch["count"], 2) if requests_per_batch["count"] else None
        ),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _histogram(metrics: str, name: str, before: str = "") -> dict[str, float]:
    """Sum and count of a Prometheus histogram, minus those in ``before``."""
    out = {"sum": 0.0, "count": 0.0}
    for text, sign in ((metrics, 1.0), (before, -1.0)):
        for line in text.splitlines():
            for part in ("sum", "count"):
                if line.startswith(f"{name}_{part} "):
                    out[part] += sign * float(line.rsplit(" ", 1)[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="emoji-64")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (8-32)")
    parser.add_argument("--seconds", type=float, default=30.0, help="load per mode")
    parser.add_argument("--max_requests", type=int, default=2000, help="per mode, whichever comes first")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--max_wait_ms", type=float, default=50.0)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve-emoji-64-cpu.json"))
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or args.seconds <= 0 or args.max_requests < 1:
        raise SystemExit("--clients must be 1..64, --seconds and --max_requests positive")

    with tempfile.TemporaryDirectory(prefix="keylocked-serve-bench-") as folder:
        folder = Path(folder)
        library = Library.init(folder / "library")
        tokens = []
        for name, token, path in concept_variants(folder, args.concepts):
            library.add(path, name)
            library.approve(f"{name}@1")
            library.grant("bench", name)
            tokens.append((name, token))
        key = library.create_key("load-test", ["use"], projects=["bench"]).key
        library.close()
        modes = {"one_at_a_time": (1, 0.0), "batched": (args.max_batch_size, args.max_wait_ms)}
        results = {}
        for mode, (batch, wait_ms) in modes.items():
            port, log = free_port(), folder / f"{mode}.log"
            server = start_server(args, folder / "library", port, batch, wait_ms, log)
            try:
                warm = {"prompt": "a bear", "steps": args.steps, "seed": 0}
                for _ in range(2):  # first calls pay one-time costs (allocations, kernels)
                    httpx.post(
                        f"http://127.0.0.1:{port}/v1/images",
                        json=warm,
                        headers={"Authorization": f"Bearer {key}"},
                        timeout=600,
                    )
                print(
                    f"{mode}: max_batch_size={batch} max_wait_ms={wait_ms}, {args.clients} clients, {args.seconds:.0f} s"
                )
                results[mode] = {"max_batch_size": batch, "max_wait_ms": wait_ms, **load(args, port, key, tokens)}
                print(json.dumps(results[mode], indent=2))
            finally:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    server.kill()
    one, batched = results["one_at_a_time"], results["batched"]
    summary = {
        "images_per_s_ratio_batched_vs_one": round(batched["images_per_s"] / one["images_per_s"], 2)
        if one["images_per_s"]
        else None,
        "p50_ratio_batched_vs_one": round(batched["latency_p50_s"] / one["latency_p50_s"], 2)
        if one["latency_p50_s"]
        else None,
    }
    report = {
        "benchmark": "serve",
        "model": args.model,
        "clients": args.clients,
        "seconds_per_mode": args.seconds,
        "steps": args.steps,
        "concepts": args.concepts,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "load_average_at_end": os.getloadavg(),
        "modes": results,
        "summary": summary,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
