"""Take the screenshots of docs/ui.md: one per tab, of `loratune ui` on a workspace with a trained run.

    python docs/ui/screenshots.py WORKSPACE [RUN ...]   # RUN: run folders of WORKSPACE (default runs/ui)

The first run is chatted with and exported; the Runs tab compares them all.

Drives Debian's Chromium (/usr/bin/chromium) with Playwright, as tests/ui does, and writes small palette
PNGs next to this file.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
PORT = 7877
SIZE = {"width": 1280, "height": 860}


def save(page, name: str) -> None:
    path = HERE / f"{name}.png"
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(colors=96).save(path, optimize=True)
    print(path, path.stat().st_size)


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def choose(page, elem_id: str, option: str) -> None:
    field(page, elem_id).click()
    page.get_by_role("option", name=option, exact=True).click()


def tab(page, name: str) -> None:
    page.locator(f"button[role='tab']:has-text('{name}')").click()
    page.wait_for_timeout(1500)


def main(workspace: str, *compared: str) -> None:
    run = (compared or ("runs/ui",))[0]
    server = subprocess.Popen([sys.executable, "-m", "loratune.cli", "ui", "--workspace", workspace,
                               "--port", str(PORT)])
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport=SIZE)
            page.goto(f"http://127.0.0.1:{PORT}/")
            page.wait_for_timeout(6000)
            save(page, "train")
            tab(page, "Data")
            choose(page, "data-file", "data/quickstart.jsonl")
            field(page, "data-model").fill("demo://llama")
            page.locator("#data-preview").click()
            page.locator("#data-stats").filter(has_text="template").wait_for(timeout=60_000)
            save(page, "data")
            tab(page, "Chat")
            choose(page, "chat-adapters", run)
            page.locator("#chat-load").click()
            page.locator("#chat-loaded").filter(has_text="base").wait_for(timeout=60_000)
            field(page, "chat-prompt").fill("What is NF4?")
            field(page, "chat-max_tokens").fill("32")
            page.locator("#chat-send").click()
            page.wait_for_timeout(8000)
            save(page, "chat")
            tab(page, "Evaluate")
            save(page, "evaluate")
            tab(page, "Export")
            choose(page, "export-adapter", run)
            save(page, "export")
            tab(page, "Runs")
            for name in compared or (run,):
                choose(page, "runs-compare", name)
            page.keyboard.press("Escape")
            page.locator("#runs-plot").click(position={"x": 5, "y": 5})
            page.wait_for_timeout(3000)
            save(page, "runs")
            choose(page, "language", "中文")
            tab(page, "训练")
            save(page, "train-zh")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main(*sys.argv[1:])
