"""`keylocked serve`: the HTTP API on the tiny pipeline with a temporary SQLite concept library."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_support import Setup, bearer, generate, make_concept, model_folder, png_bytes

from keylocked.serving.provenance import pixel_sha256, read_provenance


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return Setup(root, model_folder(root / "model"))


@pytest.fixture(scope="module")
def client(setup):
    with TestClient(setup.app()) as client:
        yield client


def audit_rows(client, setup, limit=200):
    response = client.get("/v1/audit", params={"limit": limit}, headers=bearer(setup.keys["admin"]))
    assert response.status_code == 200, response.text
    return response.json()["rows"]


# ---------------------------------------------------------------------------------------------


def test_docs_health_and_metrics(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/concepts", "/v1/concepts/{name}", "/v1/images", "/v1/trainings", "/v1/audit", "/metrics"):
        assert path in paths
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["replica"] == "test-replica"
    assert len(health["base_model_fingerprint"]) == 64


@pytest.mark.parametrize(
    "who, method, path, status",
    [
        (None, "get", "/v1/concepts", 401),
        ("kl_000000000000_notasecret", "get", "/v1/concepts", 401),
        ("not-a-key", "get", "/v1/concepts", 401),
        ("revoked", "get", "/v1/concepts", 401),
        ("designer", "get", "/v1/audit", 403),
        ("publisher", "get", "/v1/audit", 403),
        ("designer", "post", "/v1/concepts/alpha/versions/1/approve", 403),
        ("designer", "get", "/v1/concepts/gamma", 403),
        ("designer", "get", "/v1/concepts/nope", 404),
    ],
)
def test_keys_scopes_and_grants(client, setup, who, method, path, status):
    before = audit_rows(client, setup)[-1]["id"]
    key = setup.keys.get(who, who)
    response = getattr(client, method)(path, headers=bearer(key) if key else {})
    assert response.status_code == status, response.text
    assert isinstance(response.json()["detail"], str) and "\n" not in response.json()["detail"]
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    rows = [row for row in audit_rows(client, setup) if before < row["id"]]
    assert any(row["outcome"] == "denied" for row in rows), rows  # every refusal leaves a row


def test_me_says_who_the_key_is_and_what_it_may_use(client, setup):
    acme = [{"project": "acme", "concept": c, "pinned_version": None} for c in ("alpha", "beta")]
    me = client.get("/v1/me", headers=bearer(setup.keys["publisher"])).json()
    assert me == {
        "principal": "publisher",
        "key_prefix": "kl_" + setup.keys["publisher"].split("_")[1],  # never the secret
        "role": "use+publish",
        "scopes": ["publish", "use"],
        "projects": ["acme"],
        "project": "acme",
        "grants": acme,
    }
    admin = client.get("/v1/me", headers=bearer(setup.keys["admin"])).json()
    assert (admin["role"], admin["projects"], admin["project"], admin["grants"]) == ("admin", [], None, acme)
    agency = setup.new_key("agency", ["use"], ["acme", "solo"])
    both = client.get("/v1/me", headers=bearer(agency)).json()
    assert (both["projects"], both["project"], both["grants"]) == (["acme", "solo"], None, acme)
    assert client.get("/v1/me", params={"project": "solo"}, headers=bearer(agency)).json()["grants"] == []
    reviewer_only = setup.new_key("checker", ["approve"], ["acme"])
    before = audit_rows(client, setup)[-1]["id"]
    refused = client.get("/v1/me", params={"project": "other"}, headers=bearer(agency))
    assert refused.status_code == 403 and "may not act in project 'other'" in refused.json()["detail"]
    # A key without the 'use' scope learns who it is, not what is granted; the request is audited.
    me = client.get("/v1/me", headers=bearer(reviewer_only)).json()
    assert (me["principal"], me["role"], me["grants"]) == ("checker", "approve", [])
    rows = [row for row in audit_rows(client, setup) if before < row["id"]]
    assert [(r["action"], r["outcome"], r["actor"]) for r in rows if r["action"] != "audit.read"] == [
        ("http.project", "denied", "agency"),
        ("http GET /v1/me", "allowed", "checker"),
    ]


@pytest.mark.parametrize("who", [None, "revoked", "kl_000000000000_notasecret"])
def test_me_refuses_a_missing_or_revoked_key(client, setup, who):
    before = audit_rows(client, setup)[-1]["id"]
    key = setup.keys.get(who, who)
    response = client.get("/v1/me", headers=bearer(key) if key else {})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert not key or key.split("_")[2] not in response.text  # a key's secret is never echoed
    [row] = [row for row in audit_rows(client, setup) if before < row["id"] and row["action"] != "audit.read"]
    assert (row["action"], row["outcome"], row["details"]["request"]) == ("http.auth", "denied", "GET /v1/me")
    assert row["details"]["replica"] == "test-replica"


def test_a_revoked_key_stops_working_at_once(client, setup):
    key = setup.new_key("temp", ["use"], ["acme"])
    assert client.get("/v1/concepts", headers=bearer(key)).status_code == 200  # verified (and remembered)
    setup.library.revoke_key(key.split("_")[1])
    response = client.get("/v1/concepts", headers=bearer(key))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]


def test_a_key_sees_only_its_projects_concepts(client, setup):
    listed = client.get("/v1/concepts", headers=bearer(setup.keys["designer"])).json()["concepts"]
    assert sorted(c["name"] for c in listed) == ["alpha", "beta"]
    alpha = client.get("/v1/concepts/alpha", headers=bearer(setup.keys["designer"])).json()
    assert alpha["token"] == "<alpha>" and alpha["usable_versions"] == [1]
    assert alpha["versions"][0]["status"] == "approved" and len(alpha["versions"][0]["sha256"]) == 64
    assert alpha["thumbnails"] == ["/v1/concepts/alpha/versions/1/thumbnail.png"]
    first = client.get(alpha["thumbnails"][0], headers=bearer(setup.keys["designer"]))
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert read_provenance(first.content)["concepts"] == ["alpha@1"]
    assert client.get(alpha["thumbnails"][0], headers=bearer(setup.keys["designer"])).content == first.content
    gamma = "/v1/concepts/gamma/versions/1/thumbnail.png"
    assert client.get(gamma, headers=bearer(setup.keys["designer"])).status_code == 403  # no grant


def test_images_carry_provenance_and_match_the_audit_row(client, setup):
    response = generate(
        client, setup.keys["designer"], seed=5, num_images=2, concepts=[{"ref": "alpha@1", "beta": 0.6}]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["name"] for c in body["concepts"]] == ["alpha"] and body["concepts"][0]["version"] == 1
    assert body["concepts"][0]["beta"] == 0.6 and body["concepts"][0]["tau"] == pytest.approx(0.15)
    rows = {row["id"]: row for row in audit_rows(client, setup)}
    row = rows[body["audit_id"]]
    assert row["action"] == "generate" and row["outcome"] == "allowed" and row["actor"] == "designer"
    hashes = []
    for index, image in enumerate(body["images"]):
        png = base64.b64decode(image["b64_png"])
        provenance = read_provenance(png)
        assert provenance["seed"] == 5 + index == image["seed"]
        assert provenance["audit_id"] == body["audit_id"]
        assert provenance["concepts"][0]["version"] == 1 and provenance["concepts"][0]["beta"] == 0.6
        assert provenance["prompt"] == "a <alpha> on a table"
        decoded = Image.open(io.BytesIO(png))
        assert pixel_sha256(decoded) == image["pixel_sha256"]
        hashes.append(image["pixel_sha256"])
    assert row["details"]["images"] == hashes and row["details"]["prompt"] == "a <alpha> on a table"
    assert row["details"]["concepts"] == ["alpha@1"]


def test_a_request_is_the_same_alone_and_in_a_mixed_batch(client, setup):
    """Concurrent requests with different concepts share one UNet call, and each gets the
    images it gets alone (bit-identical pixels on CPU float32)."""
    requests = [
        dict(prompt="a <alpha> on a table", concepts=["alpha"], seed=1),
        dict(prompt="a red <beta>", concepts=["beta"], seed=2, num_images=2),
        dict(prompt="a <alpha> and a <beta>", concepts=["alpha", {"ref": "beta", "beta": 0.5}], seed=3),
        dict(prompt="a photo of a bear", concepts=[], seed=4),
    ]
    alone = []
    for request in requests:
        response = generate(client, setup.keys["designer"], **request)
        assert response.status_code == 200, response.text
        alone.append([image["pixel_sha256"] for image in response.json()["images"]])
    # Another replica whose batch fires only when all five images are there: one UNet call.
    images = sum(request.get("num_images", 1) for request in requests)
    with TestClient(setup.app(max_batch_size=images, max_wait_ms=20_000)) as batched:
        together = [None] * len(requests)

        def send(index):
            response = generate(batched, setup.keys["designer"], **requests[index])
            together[index] = (response.status_code, response.json())

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        metrics = batched.get("/metrics").text
    assert [status for status, _ in together] == [200] * len(requests), together
    assert [[image["pixel_sha256"] for image in body["images"]] for _, body in together] == alone
    assert "keylocked_batch_requests_count 1.0" in metrics and "keylocked_batch_requests_sum 4.0" in metrics
    assert f"keylocked_batch_images_sum {float(images)}" in metrics


def test_metrics_are_prometheus_text(client, setup):
    generate(client, setup.keys["designer"])
    text = client.get("/metrics").text
    for name in (
        "keylocked_http_requests_total",
        "keylocked_http_request_seconds_bucket",
        "keylocked_batch_images_bucket",
        "keylocked_queue_depth",
        "keylocked_images_total",
    ):
        assert name in text
    assert 'route="/v1/images"' in text


class ModelCalls:
    """Counts every forward of the text encoder, UNet and VAE decoder of an app's pipeline."""

    def __init__(self, pipe):
        self.count = 0
        modules = (pipe.text_encoder, pipe.unet, pipe.vae)
        self.hooks = [m.register_forward_pre_hook(lambda *a: self._hit()) for m in modules]

    def _hit(self):
        self.count += 1

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def test_bad_requests_get_4xx_without_touching_the_model(client, setup):
    calls = ModelCalls(client.app.state.service.pipe)
    designer, publisher = bearer(setup.keys["designer"]), bearer(setup.keys["publisher"])
    try:
        cases = {
            "malformed json": client.post(
                "/v1/images",
                content=b'{"prompt": "a <alpha>", ',
                headers={**designer, "Content-Type": "application/json"},
            ),
            "1 MB prompt": generate(client, setup.keys["designer"], prompt="a " * 500_000),
            "unknown concept": generate(client, setup.keys["designer"], concepts=["no-such-concept"]),
            "bad reference": generate(client, setup.keys["designer"], concepts=["alpha@@1"]),
            "10^6 images": generate(client, setup.keys["designer"], num_images=10**6),
            "10^6 steps": generate(client, setup.keys["designer"], steps=10**6),
            "nan beta": client.post(
                "/v1/images",
                content=b'{"prompt": "a", "concepts": [{"ref": "alpha", "beta": NaN}]}',
                headers={**designer, "Content-Type": "application/json"},
            ),
            "not granted": generate(client, setup.keys["designer"], concepts=["gamma"]),
            "50 MB upload": client.post(
                "/v1/concepts",
                files={"file": ("big.safetensors", b"\0" * (50 * 2**20))},
                data={"name": "big"},
                headers=publisher,
            ),
            "not a concept file": client.post(
                "/v1/concepts", files={"file": ("x.safetensors", b"hello")}, data={"name": "x"}, headers=publisher
            ),
            "non-image training upload": client.post(
                "/v1/trainings",
                files=[("images", ("a.png", b"not an image at all"))],
                data={"name": "n", "token": "<n>", "super_category": "bear", "steps": "2"},
                headers=publisher,
            ),
            "50 MB training upload": client.post(
                "/v1/trainings",
                files=[("images", ("a.png", b"\0" * (50 * 2**20)))],
                data={"name": "n", "token": "<n>", "super_category": "bear"},
                headers=publisher,
            ),
            "11 training images": client.post(
                "/v1/trainings",
                files=[("images", (f"{i}.png", png_bytes())) for i in range(11)],
                data={"name": "n", "token": "<n>", "super_category": "bear", "steps": "2"},
                headers=publisher,
            ),
        }
    finally:
        calls.remove()
    statuses = {case: response.status_code for case, response in cases.items()}
    assert statuses == {
        "malformed json": 422,
        "1 MB prompt": 413,
        "unknown concept": 404,
        "bad reference": 422,
        "10^6 images": 422,
        "10^6 steps": 422,
        "nan beta": 422,
        "not granted": 403,
        "50 MB upload": 413,
        "not a concept file": 422,
        "non-image training upload": 422,
        "50 MB training upload": 413,
        "11 training images": 422,
    }
    assert calls.count == 0
    for response in cases.values():
        assert response.json()["detail"]


def test_upload_approve_and_use_a_new_version(client, setup):
    pipe = client.app.state.service.pipe
    new = make_concept(pipe, "<alpha>", "bear", seed=11).save(setup.root / "alpha-2.safetensors")
    publisher, reviewer, designer = (bearer(setup.keys[k]) for k in ("publisher", "reviewer", "designer"))
    upload = client.post(
        "/v1/concepts",
        files={"file": ("alpha-2.safetensors", new.read_bytes())},
        data={"name": "alpha", "notes": "sharper"},
        headers=publisher,
    )
    assert upload.status_code == 201, upload.text
    assert upload.json()["version"] == 2 and upload.json()["status"] == "draft"
    assert generate(client, setup.keys["designer"], concepts=["alpha@2"]).status_code == 403  # a draft
    assert client.post("/v1/concepts/alpha/versions/2/approve", headers=publisher).status_code == 403
    approved = client.post("/v1/concepts/alpha/versions/2/approve", headers=reviewer)
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    response = generate(client, setup.keys["designer"], concepts=["alpha"])
    assert response.status_code == 200 and response.json()["concepts"][0]["version"] == 2
    assert client.get("/v1/concepts/alpha", headers=designer).json()["usable_versions"] == [1, 2]


def test_a_training_job_reports_progress_and_becomes_a_draft(client, setup):
    publisher = bearer(setup.keys["publisher"])
    response = client.post(
        "/v1/trainings",
        files=[("images", (f"{i}.png", png_bytes(colour=(200, 40 + 60 * i, 40)))) for i in range(2)],
        data={
            "name": "delta",
            "token": "<delta>",
            "super_category": "bear",
            "steps": "2",
            "train_batch_size": "1",
            "gradient_accumulation_steps": "1",
            "mask": "none",
        },
        headers=publisher,
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and job["total_steps"] == 2
    events = []
    with client.stream("GET", f"/v1/trainings/{job['id']}/events", headers=publisher) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[len("event: ") :])
            if line.startswith("data: ") and events[-1] == "done":
                final = json.loads(line[len("data: ") :])
                break
    assert events[-1] == "done" and final["status"] == "succeeded", final
    assert final["version"] == 1 and final["step"] == 2
    polled = client.get(f"/v1/trainings/{job['id']}", headers=publisher).json()
    assert polled["status"] == "succeeded"
    assert client.get(f"/v1/trainings/{job['id']}", headers=bearer(setup.keys["reviewer"])).status_code == 403
    version = setup.library.show("delta").versions[0]
    assert version.status == "draft" and job["id"] in version.notes and version.created_by == "publisher"


def test_serve_verb_refuses_a_missing_library_in_one_line(tmp_path, capsys):
    from keylocked.cli import main

    code = main(["serve", "--pretrained_model_name_or_path", "emoji-64", "--library", str(tmp_path / "nowhere")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and error.startswith("error: ") and "no concept library" in error and "\n" not in error
