"""Screenshots of the web page on the embedded emoji-64 model, for docs/page/ and the README.

    python docs/page/screenshots.py        # about two minutes on a 2-core CPU

A throwaway library holds the README's demo concept (docs/demo/concept.safetensors, the held-out
teddy bear as ``<my-emoji>``), granted to project "studio"; the real app runs under uvicorn on a
loopback port and Debian's chromium (driven by Playwright) takes the pictures at 1280x800 and 390x844.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from keylocked.library import Library
from keylocked.serving.app import create_app
from keylocked.serving.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PROMPT = "a <my-emoji> on a blue background"


def until(page, expression: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(expression)
        time.sleep(0.1)


def library(folder: Path) -> dict[str, str]:
    lib = Library.init(folder / "library")
    lib.add(ROOT / "docs/demo/concept.safetensors", "teddy", notes="the README's demo concept")
    lib.approve("teddy@1")
    lib.grant("studio", "teddy")
    return {
        "designer": lib.create_key("dana", ["use", "publish"], projects=["studio"]).key,
        "admin": lib.create_key("ops", ["admin"]).key,
    }


def generate(page, url: str, key: str) -> None:
    page.goto(url)
    page.fill("#api-key", key)
    page.click("#sign-in-form button[type=submit]")
    page.wait_for_selector("#tabs:not([hidden])")
    page.select_option("#concept-picker", "teddy")
    page.fill("#prompt", PROMPT)
    page.fill("#seed", "1")
    page.fill("#num-images", "4")
    page.click("#generate-button")
    until(page, "document.querySelectorAll('#strip .frame img').length === 4")
    until(page, "document.querySelectorAll('#gallery .shot').length === 4")


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        keys = library(Path(folder))
        config = ServeConfig(pretrained_model_name_or_path="emoji-64", library=str(Path(folder) / "library"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                desktop = browser.new_page(viewport={"width": 1280, "height": 800})
                generate(desktop, url, keys["designer"])
                desktop.screenshot(path=OUT / "generate-1280x800.png")
                desktop.click("#tabs button[data-tab=concepts]")
                desktop.wait_for_selector(".concept .thumb img", timeout=300_000)
                desktop.screenshot(path=OUT / "concepts-1280x800.png")
                desktop.click("#tabs button[data-tab=audit]")  # refused: the designer's key is not admin
                desktop.wait_for_selector("#audit-rows[hidden]", state="attached")

                phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
                generate(phone, url, keys["designer"])
                phone.evaluate("document.querySelector('.preview').scrollIntoView()")
                phone.screenshot(path=OUT / "generate-390x844.png")

                admin = browser.new_page(viewport={"width": 1280, "height": 800})
                admin.goto(url)
                admin.fill("#api-key", keys["admin"])
                admin.click("#sign-in-form button[type=submit]")
                admin.wait_for_selector("#tabs:not([hidden])")
                admin.click("#tabs button[data-tab=audit]")
                admin.wait_for_selector("#audit-table tbody tr.entry")
                admin.screenshot(path=OUT / "audit-1280x800.png")
                browser.close()
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    for name in sorted(OUT.glob("*.png")):
        print(name.relative_to(ROOT))


if __name__ == "__main__":
    main()
