"""The console's browser tests: Debian's chromium driven by Selenium through Debian's
chromedriver (scripts/setup.sh installs both), headless, against a real region."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def artefacts_dir() -> str:
    """Where screenshots go: $CELLCLOUD_ARTEFACTS/console, else a folder under the temp dir."""
    base = os.environ.get("CELLCLOUD_ARTEFACTS") or os.path.join(tempfile.gettempdir(),
                                                                "cellcloud-artefacts")
    path = os.path.join(base, "console")
    os.makedirs(path, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.exists(path) or shutil.which(os.path.basename(path))):
            pytest.fail(f"{path} is missing: run scripts/setup.sh (apt: chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
