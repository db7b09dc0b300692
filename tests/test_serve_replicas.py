"""`keylocked serve` as deployed: a real server process on a loopback port (a client that goes away
mid-request, a replica killed during a training job), and two replicas on two ports sharing one
PostgreSQL library."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from library_support import postgres_cluster  # noqa: F401  (the session's PostgreSQL cluster)
from serve_support import Setup, bearer, generate, model_folder

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("serve-model") / "model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(setup: Setup, port: int, log: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "keylocked.cli", "serve", "--pretrained_model_name_or_path", str(setup.model_dir)]
    command += ["--library", setup.location, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--work_dir", setup.config.work_dir, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KEYLOCKED_TEST_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_until_up(base: str, server: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    pytest.fail(f"server did not come up in {timeout:.0f} s:\n{log.read_text()[-2000:]}")


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_real_server_survives_a_disconnect_and_a_kill_during_training(tmp_path, model_dir):
    setup = Setup(tmp_path, model_dir)
    designer, publisher = setup.keys["designer"], setup.keys["publisher"]
    port, log = free_port(), tmp_path / "server.log"
    # A batch of two images fires when both requests are in (or after 30 s).
    server = start_server(setup, port, log, "--replica_id", "node-1", "--max_batch_size", "2", "--max_wait_ms", "30000")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, server, log)
        # -- a client that hangs up while its request waits for a batch partner -----------------
        hung_up = []

        def impatient() -> None:
            with httpx.Client(base_url=base, timeout=0.5) as client:
                try:
                    generate(client, designer, seed=1)
                except httpx.TimeoutException:
                    hung_up.append(True)

        impatient()  # alone, its request waits in the queue for a partner; the client gives up
        assert hung_up == [True]
        with httpx.Client(base_url=base, timeout=60) as client:
            response = generate(client, designer, seed=2, prompt="a red <alpha>")  # the partner
            assert response.status_code == 200, response.text
            assert response.json()["images"][0]["seed"] == 2
            metrics = client.get("/metrics").text
            assert metric(metrics, "keylocked_batch_requests_sum") == 2.0  # both requests, one UNet batch
            assert metric(metrics, "keylocked_batch_requests_count") == 1.0
            assert 'status="500"' not in metrics
            again = generate(client, designer, seed=3, num_images=2)  # the server serves on
            assert again.status_code == 200 and len(again.json()["images"]) == 2
            # -- a job running when the process is killed --------------------------------------
            job = client.post(
                "/v1/trainings",
                files=[("images", (f"{i}.png", _square(i))) for i in range(2)],
                data={"name": "killed", "token": "<killed>", "super_category": "bear", "steps": "1000"}
                | {"train_batch_size": "1", "gradient_accumulation_steps": "1", "mask": "none"},
                headers=bearer(publisher),
            ).json()
            deadline = time.monotonic() + 120
            while client.get(f"/v1/trainings/{job['id']}", headers=bearer(publisher)).json()["step"] < 1:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
        server.kill()  # SIGKILL: no shutdown code runs
        server.wait(30)
        assert (Path(setup.config.work_dir) / job["id"] / "images").is_dir()  # left behind by the killed process
    finally:
        if server.poll() is None:
            server.kill()
    # -- the replica restarts: the job is failed, nothing was registered --------------------------
    with TestClient(setup.app(replica_id="node-1")) as client:
        restarted = client.get(f"/v1/trainings/{job['id']}", headers=bearer(publisher)).json()
    assert restarted["status"] == "failed" and "restarted" in restarted["error"], restarted
    assert not (Path(setup.config.work_dir) / job["id"]).exists()  # its working files are gone too
    assert "killed" not in [concept.name for concept in setup.library.list()]
    report = setup.library.verify()
    assert report.ok and not report.orphans


def _square(index: int) -> bytes:
    from serve_support import png_bytes

    return png_bytes(colour=(200, 40 + 60 * index, 40))


class Replica:
    """A real uvicorn serving one app on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "replica did not start"
            time.sleep(0.05)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)


def test_two_replicas_share_one_postgres_library(postgres_cluster, tmp_path, model_dir):  # noqa: F811
    setup = Setup(tmp_path, model_dir, location=postgres_cluster.database(), blobs=tmp_path / "blobs")
    designer, publisher, reviewer, admin = (setup.keys[k] for k in ("designer", "publisher", "reviewer", "admin"))
    with Replica(setup.app(replica_id="replica-a")) as a, Replica(setup.app(replica_id="replica-b")) as b:
        assert a.base_url.port != b.base_url.port
        first = generate(a, designer)
        assert first.status_code == 200 and first.json()["concepts"][0]["version"] == 1
        # a new version, uploaded and approved through replica B ...
        upload = b.post(
            "/v1/concepts",
            files={"file": ("alpha-2.safetensors", _new_alpha(setup))},
            data={"name": "alpha"},
            headers=bearer(publisher),
        )
        assert upload.status_code == 201, upload.text
        assert b.post("/v1/concepts/alpha/versions/2/approve", headers=bearer(reviewer)).status_code == 200
        # ... is what replica A serves at once
        assert a.get("/v1/concepts/alpha", headers=bearer(designer)).json()["usable_versions"] == [1, 2]
        second = generate(a, designer)
        assert second.status_code == 200 and second.json()["concepts"][0]["version"] == 2
        assert generate(b, designer, concepts=["alpha@1"]).status_code == 200
        rows = b.get("/v1/audit", params={"limit": 1000}, headers=bearer(admin)).json()["rows"]
    generated = [row for row in rows if row["action"] == "generate"]
    assert {row["details"]["replica"] for row in generated} == {"replica-a", "replica-b"}
    assert {row["id"] for row in generated} >= {first.json()["audit_id"], second.json()["audit_id"]}
    assert any(row["action"] == "version.approve" and row["actor"] == "reviewer" for row in rows)
    assert setup.library.verify(api_key=admin).audit.ok  # one hash chain, written by both


def _new_alpha(setup: Setup) -> bytes:
    from serve_support import make_concept

    from keylocked.models import load_pipeline

    path = make_concept(load_pipeline(setup.model_dir), "<alpha>", "bear", seed=21).save(setup.root / "alpha-2.st")
    return path.read_bytes()
