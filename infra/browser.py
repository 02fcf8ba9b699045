"""Headless Chromium for the report: one driver set-up and one full-page capture.

Used by the report test (tests/tasks/reporting/test_report.py) and the README screenshot script
(docs/make_screenshot.py). Needs the Debian ``chromium`` and ``chromium-driver`` packages
(``infra/install_system_deps.sh --with-browser``) and selenium (the ``dev`` extra), imported
only when a driver is started.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

#: Flags for a headless, offline, sandbox-free Chromium (containers, CI).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def chromium_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) executables found on this machine, None where missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    return browser, driver


def start_chromium(
    browser: str, driver_path: str, profile: Path, height: int, console_log: bool = False
) -> Any:
    """A selenium driver of headless Chromium, 1280 px wide.

    Args:
        browser: the chromium executable.
        driver_path: the chromedriver executable.
        profile: a fresh user-data folder (not shared between drivers).
        height: window height in pixels.
        console_log: keep the page's console messages (``driver.get_log("browser")``).

    Returns:
        The driver; the caller quits it.
    """
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size=1280,{height}"):
        options.add_argument(flag)
    if console_log:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))


def full_page_png(driver: Any) -> bytes:
    """A PNG of the whole loaded page (beyond the window), at scale 1."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    return base64.b64decode(shot["data"])
