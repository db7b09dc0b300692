"""The web page (keylocked/serving/static) in a real browser: Debian's chromium driven by Playwright,
against the real app under uvicorn on a loopback port (tiny pipeline, temporary SQLite library)."""

from __future__ import annotations

import base64
import io
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from serve_support import Setup, model_folder, png_bytes

from keylocked.serving.app import PAGE_DIR
from keylocked.serving.provenance import pixel_sha256, read_provenance

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 60_000  # generous: the machine running the suite may be busy


class LiveServer:
    """One app under a real uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    setup = Setup(root, model_folder(root / "model"))
    setup.keys["empty"] = setup.new_key("newcomer", ["use"], ["empty-project"])  # a project with no grants
    return setup


@pytest.fixture(scope="module")
def server(setup):
    with LiveServer(setup.app(max_wait_ms=50.0, thumbnail_steps=2)) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        print(f"skipping the browser tests: {CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url)
    yield page
    context.close()
    assert not errors, errors  # no uncaught exception in the page's scripts


def sign_in(page, key: str) -> None:
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")


def signed_in(page, key: str) -> None:
    sign_in(page, key)
    page.wait_for_selector("#tabs:not([hidden])")


def until(page, expression: str, timeout: float = WAIT_MS / 1000) -> None:
    """Wait until a JavaScript expression is true (polled with evaluate: the page's CSP forbids the
    string eval behind Playwright's wait_for_function, and the tests keep that policy on)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def message(page) -> str:
    page.wait_for_selector("#message:not([hidden])")
    return page.inner_text("#message")


# ---------------------------------------------------------------------------------------------


def test_the_page_is_served_self_contained(server):
    """/ is the page, with a policy that forbids loading anything from elsewhere, and none of its
    files names another origin."""
    response = httpx.get(server.url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for name in ("app.js", "api.js", "app.css"):
        assert httpx.get(server.url + f"static/{name}").status_code == 200
    for path in PAGE_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://|//cdn|@import", text), path.name
    assert "/" not in httpx.get(server.url + "openapi.json").json()["paths"]  # the page is no API route


def test_sign_in_generate_and_move_beta(page, setup, tmp_path):
    signed_in(page, setup.keys["designer"])
    prefix = "kl_" + setup.keys["designer"].split("_")[1]  # never the secret
    assert page.inner_text("#who") == f"signed in as designer (use) · {prefix} · project acme"  # GET /v1/me
    page.select_option("#concept-picker", "alpha")
    assert "<alpha>" in page.input_value("#prompt")
    page.fill("#prompt", "a <alpha> on a table")
    page.fill("#seed", "3")
    page.fill("#steps", "2")
    assert page.input_value("#beta") == "0.7"  # the concept file's recommended β
    page.click("#generate-button")

    # The preview and the gallery show the image with its provenance; the strip four other β.
    shot = page.wait_for_selector("#gallery .shot")
    assert shot.get_attribute("data-seed") == "3"
    assert "alpha@1 β 0.70 τ 0.15" in shot.inner_text() and "a <alpha> on a table" in shot.inner_text()
    audit_id = shot.get_attribute("data-audit-id")
    assert audit_id and audit_id in shot.inner_text()
    until(page, "document.querySelectorAll('#strip .frame img').length === 4")
    assert [f.get_attribute("data-beta") for f in page.query_selector_all("#strip .frame")] == [
        "0.50",
        "0.60",
        "0.80",
        "0.90",
    ]
    strip = {
        f.get_attribute("data-beta"): f.get_attribute("data-png-sha256")
        for f in page.query_selector_all("#strip .frame")
    }
    before = page.get_attribute("#preview", "data-png-sha256")

    # The downloaded PNG is the API's: its text chunk carries what the page shows.
    with page.expect_download() as download:
        shot.query_selector("a[download]").click()
    png = Path(download.value.path()).read_bytes()
    provenance = read_provenance(png)
    assert provenance["seed"] == 3 and str(provenance["audit_id"]) == audit_id
    assert provenance["prompt"] == "a <alpha> on a table"
    assert [(c["name"], c["version"], c["beta"]) for c in provenance["concepts"]] == [("alpha", 1, 0.7)]

    # Moving the slider re-draws the preview at the new β (no click): the picture changes.
    page.fill("#beta", "1.2")
    until(page, "document.querySelector('#preview').dataset.beta === '1.20'")
    assert page.get_attribute("#preview .shot", "data-seed") == "3"
    after = page.get_attribute("#preview", "data-png-sha256")
    assert after != before
    assert "alpha@1 β 1.20" in page.inner_text("#preview")
    assert page.get_attribute("#preview img", "src").startswith("blob:")
    until(page, "document.querySelectorAll('#strip .frame img').length === 4")
    assert [f.get_attribute("data-beta") for f in page.query_selector_all("#strip .frame")] == [
        "1.00",
        "1.10",
        "1.30",
        "1.40",
    ]
    # Clicking a strip frame sets β to it; the image at β 0.5 is the one the first strip showed.
    page.fill("#beta", "0.7")
    until(page, "document.querySelector('#preview').dataset.beta === '0.70'")
    assert page.get_attribute("#preview", "data-png-sha256") == before  # same request, same image
    page.wait_for_selector("#strip .frame[data-beta='0.50'] img")
    page.click("#strip .frame[data-beta='0.50']")
    until(page, "document.querySelector('#preview').dataset.beta === '0.50'")
    assert page.input_value("#beta") == "0.5"
    assert page.get_attribute("#preview", "data-png-sha256") == strip["0.50"]
    assert len(page.query_selector_all("#gallery .shot")) == 1  # previews are not kept unless generated


def test_concepts_show_thumbnails_versions_and_status(page, setup):
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    signed_in(page, setup.keys["designer"])
    page.wait_for_timeout(300)
    assert not [url for url in requested if "thumbnail" in url]  # samples are drawn only when on screen
    page.click("#tabs button[data-tab=concepts]")
    cards = page.query_selector_all("#concept-list .concept")
    assert sorted(card.get_attribute("data-name") for card in cards) == ["alpha", "beta"]  # not gamma
    alpha = page.wait_for_selector(".concept[data-name=alpha] .thumb img")
    png = httpx.get(
        page.url + "v1/concepts/alpha/versions/1/thumbnail.png",
        headers={"Authorization": f"Bearer {setup.keys['designer']}"},
    ).content
    assert read_provenance(png)["concepts"] == ["alpha@1"]
    assert alpha.get_attribute("src").startswith("blob:")
    text = page.inner_text(".concept[data-name=alpha]")
    assert "v1" in text and "approved" in text and "usable" in text and "<alpha>" in text
    page.click(".concept[data-name=beta] button.primary")  # "Use in a prompt"
    assert not page.is_hidden("#generate")
    assert "<beta>" in page.input_value("#prompt")
    assert page.query_selector("#chosen .chip[data-name=beta]")


def test_a_key_without_a_grant_sees_no_concept(page, setup):
    signed_in(page, setup.keys["empty"])
    page.click("#tabs button[data-tab=concepts]")
    assert "No concepts are available to this project" in page.inner_text("#concept-list")
    assert page.is_disabled("#concept-picker")
    assert page.query_selector_all("#concept-picker option[value]:not([value=''])") == []


def test_a_key_of_several_projects_names_one(page, setup):
    key = setup.new_key("agency", ["use"], ["acme", "solo"])
    sign_in(page, key)
    text = message(page)
    assert text.startswith("Please check what you entered") and "name the project" in text, text
    assert page.is_visible("#sign-in")
    page.fill("#project", "acme")
    signed_in(page, key)
    assert page.inner_text("#who").endswith("project acme")
    assert page.query_selector("#concept-picker option[value=alpha]")


def test_refusals_are_readable_messages(page, setup):
    # 401: an unknown key never gets past the sign-in form.
    sign_in(page, "kl_000000000000_not-a-real-secret")
    assert "not accepted" in message(page) and "sign in again" in message(page)
    assert page.is_visible("#sign-in") and page.is_hidden("#tabs")

    # 403: the grant is revoked while the page is open; the next generation says so.
    key = setup.new_key("solo", ["use"], ["solo"])
    setup.library.grant("solo", "alpha", api_key=setup.owner)
    signed_in(page, key)
    page.select_option("#concept-picker", "alpha")
    page.fill("#steps", "2")
    setup.library.revoke("solo", "alpha", api_key=setup.owner)
    page.click("#generate-button")
    text = message(page)
    assert text.startswith("This project may not use that concept") and "no grant" in text, text

    # 403: the audit log needs the admin scope.
    page.click("#tabs button[data-tab=audit]")
    until(page, "document.querySelector('#audit-status').textContent.includes('admin')")

    # 401 mid-session: the key is revoked; the page asks to sign in again.
    setup.library.revoke_key(key.split("_")[1], api_key=setup.owner)
    page.click("#tabs button[data-tab=generate]")
    page.click("#generate-button")
    page.wait_for_selector("#sign-in:not([hidden])")
    assert "sign in again" in message(page)
    assert page.evaluate("sessionStorage.getItem('keylocked.apiKey')") is None


def test_train_shows_progress_and_previews_the_result(page, setup):
    signed_in(page, setup.keys["publisher"])
    page.click("#tabs button[data-tab=train]")
    # A bad upload is a readable 422 (the API decodes every image).
    page.set_input_files("#files", [{"name": "broken.png", "mimeType": "image/png", "buffer": b"not an image"}])
    page.fill("#train-name", "alpha")
    assert page.input_value("#train-token") == "<alpha>"
    page.fill("#train-super", "bear")
    page.fill("#train-steps", "2")
    page.click("#train-button")
    text = message(page)
    assert text.startswith("Please check what you entered") and "broken.png" in text, text

    page.click("#picked button")  # remove the broken file
    # Two photos dragged from the desktop onto the drop zone.
    photos = [base64.b64encode(png_bytes(colour=(200, 40 + 60 * i, 40))).decode() for i in range(2)]
    dropped = page.evaluate_handle(
        """(photos) => {
            const transfer = new DataTransfer();
            photos.forEach((b64, i) => transfer.items.add(
                new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], `${i}.png`, {type: "image/png"})));
            return transfer;
        }""",
        photos,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    assert len(page.query_selector_all("#picked img")) == 2
    page.click("#train-button")
    job = page.wait_for_selector("#jobs .job")
    job.wait_for_selector("progress")
    page.wait_for_selector("#jobs .job[data-status=succeeded]", timeout=120_000)
    assert page.evaluate("document.querySelector('#jobs .job progress').value") == 2
    assert "alpha@2 is a new draft version" in job.inner_text()
    preview = job.wait_for_selector(".thumb img")  # the draft's sample, drawn with the publisher's key
    assert preview.get_attribute("src").startswith("blob:")
    assert setup.library.show("alpha").versions[-1].status == "draft"


def test_admin_reads_the_audit_log_with_filters(page, setup, server):
    designer = {"Authorization": f"Bearer {setup.keys['designer']}"}
    assert httpx.get(server.url + "v1/audit", headers=designer).status_code == 403  # a denied row
    body = {"prompt": "a <beta>", "concepts": ["beta"], "seed": 0, "steps": 2}
    assert httpx.post(server.url + "v1/images", json=body, headers=designer, timeout=60).status_code == 200
    signed_in(page, setup.keys["admin"])
    page.click("#tabs button[data-tab=audit]")
    page.wait_for_selector("#audit-table tbody tr.entry")
    rows = page.query_selector_all("#audit-table tbody tr.entry")
    ids = [int(row.get_attribute("data-id")) for row in rows]
    assert ids == sorted(ids, reverse=True)  # newest first
    page.select_option("#audit-outcome", "denied")
    outcomes = {row.query_selector("td:nth-child(5)").inner_text() for row in page.query_selector_all("tr.entry")}
    assert outcomes == {"denied"}
    page.select_option("#audit-outcome", "")
    page.fill("#audit-concept", "beta")
    page.click("#audit-form button[type=submit]")
    # The server filters: only rows about beta (its uses, its generations) come back.
    until(
        page,
        "[...document.querySelectorAll('tr.entry td:nth-child(6)')].every(td => td.textContent.startsWith('beta'))",
    )
    actions = {td.inner_text() for td in page.query_selector_all("tr.entry td:nth-child(4)")}
    assert {"concept.use", "generate"} <= actions, actions
    page.click("tr.entry")
    assert page.is_visible("tr.details pre")


@pytest.mark.parametrize("width, height", [(1280, 800), (390, 844)])
def test_fits_desktop_and_phone_widths(browser, server, setup, width, height):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    try:
        page.goto(server.url)
        signed_in(page, setup.keys["designer"])
        for tab in ("generate", "concepts", "train", "audit"):
            page.click(f"#tabs button[data-tab={tab}]")
            overflow = page.evaluate("document.documentElement.scrollWidth")
            assert overflow <= width, (tab, overflow)
    finally:
        context.close()


def test_generated_pixels_match_the_audit_hash(page, setup):
    """What the page downloads is what the audit row vouches for (sha256 of the decoded pixels)."""
    signed_in(page, setup.keys["designer"])
    page.select_option("#concept-picker", "beta")
    page.fill("#seed", "11")
    page.fill("#steps", "2")
    page.fill("#num-images", "2")
    page.click("#generate-button")
    until(page, "document.querySelectorAll('#gallery .shot').length === 2")
    shots = page.query_selector_all("#gallery .shot")
    assert sorted(int(s.get_attribute("data-seed")) for s in shots) == [11, 12]
    with page.expect_download() as download:
        shots[0].query_selector("a[download]").click()
    png = Path(download.value.path()).read_bytes()
    provenance = read_provenance(png)
    assert pixel_sha256(Image.open(io.BytesIO(png))) == provenance["pixel_sha256"]
    rows = setup.library.audit(limit=50)
    row = next(r for r in rows if r.id == provenance["audit_id"])
    assert provenance["pixel_sha256"] in row.details["images"]
