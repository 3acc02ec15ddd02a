"""The playground page in a real headless Chromium: load, submit a prompt, wait, check, screenshot.

Needs Debian's chromium (`apt-get install chromium`) and Python playwright (the `browser` extra;
its own browser download is not used). Skipped, saying which is missing, when either is absent.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("starlette")
playwright = pytest.importorskip(
    "playwright.sync_api", reason="python playwright not installed (pip install 'difflm[browser]')"
)

from difflm.serve.app import build_app, serve_in_thread  # noqa: E402
from difflm.serve.models import load_served  # noqa: E402

from .serve_fixtures import tiny_checkpoint  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTINGS = {"max_tokens": 24, "steps": 12, "block_length": 8, "temperature": 0.8, "seed": 5}


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: apt-get install chromium")
def test_playground_fills_both_models_and_matches_the_api(tmp_path: Path) -> None:
    diffusion = load_served(tiny_checkpoint(tmp_path / "diffusion"), dtype="float64")
    ar = load_served(tiny_checkpoint(tmp_path / "ar", causal=True, seed=1), dtype="float64", name="ar")
    running = serve_in_thread(build_app([diffusion, ar]))
    try:
        with playwright.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                str(tmp_path / "profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1000, "height": 320},
            )
            page = context.new_page()
            query = "&".join(f"{k}={v}" for k, v in {**SETTINGS, "delay": 0}.items())
            page.goto(f"{running.url}/?{query}", timeout=30_000)
            page.wait_for_selector('.column[data-model="ar"]', timeout=30_000)
            page.fill("#prompt", "hello")
            page.click("#generate")
            page.wait_for_selector('.column[data-model="ar"][data-done="1"]', timeout=30_000)
            page.wait_for_selector(f'.column[data-model="{diffusion.name}"][data-done="1"]', timeout=30_000)
            shown = page.eval_on_selector_all(
                ".column",
                "els => els.map(e => [e.dataset.model, e.dataset.text, e.querySelector('.canvas').textContent])",
            )
            page.screenshot(path=str(tmp_path / "playground.png"))
            context.close()
    finally:
        running.stop()
    for model, text, canvas in shown:
        assert canvas == "hello" + text and len(text) == SETTINGS["max_tokens"]  # no masked slot left
        body = {**SETTINGS, "model": model, "prompt": "hello"}
        assert text == _api_text(diffusion if model == diffusion.name else ar, body)
    assert (tmp_path / "playground.png").read_bytes()[:4] == b"\x89PNG"
    print(f"screenshot: {tmp_path / 'playground.png'}")


def _api_text(served, body: dict) -> str:
    """The same request through a fresh server's API (the page's server is stopped by now)."""
    running = serve_in_thread(build_app([served]))
    try:
        req = urllib.request.Request(running.url + "/v1/completions", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["choices"][0]["text"]
    finally:
        running.stop()
