"""Playwright on Debian's Chromium for the dashboard tests (never `playwright install`)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"
VIEWPORT = {"width": 1366, "height": 800}  # a common laptop screen


def launch() -> Iterator[Any]:
    """A headless Chromium, or a loud skip when it truly cannot be had here."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TESTS SKIPPED: the playwright package is missing; run "
                    "scripts/bootstrap.sh (it installs the [test] extra)")  # fmt: skip
    path = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    if not path.is_file():
        pytest.skip("BROWSER TESTS SKIPPED: no /usr/bin/chromium; scripts/bootstrap.sh installs "
                    "Debian's chromium when run as root (apt-get install chromium)")  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(path), args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def shot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
