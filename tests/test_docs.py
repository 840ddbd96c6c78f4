"""The documentation site builds with `mkdocs build --strict` and renders in a browser.

Why: a broken link, a page missing from the navigation, a study page that cannot be generated or a
docstring mkdocstrings cannot read fails the strict build; the browser test (slow) opens the built site
in Debian's headless Chromium and checks that the pages a user lands on show their images and raise no
console errors.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def build(site: Path) -> subprocess.CompletedProcess:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    return subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@functools.cache
def built_site(tmp: Path) -> Path:
    site = tmp / "site"
    done = build(site)
    assert done.returncode == 0, done.stdout + done.stderr
    return site


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = built_site(tmp_path)
    assert (site / "index.html").is_file()
    running = (site / "running" / "index.html").read_text()
    assert "<code>num-clients</code>" in running, "the generated settings table is missing"
    studies = sorted(p.name for p in (ROOT / "experiments" / "results").iterdir() if p.is_dir())
    for study in studies:
        assert (site / "benchmarks" / study / "index.html").is_file(), f"no page for study {study}"
    assert (site / "benchmarks" / "noniid-fmnist" / "accuracy_per_round.png").is_file()
    assert "MEKD" in (site / "reference" / "strategies" / "index.html").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="Debian's chromium and chromium-driver are missing (make test installs them when run as root)",
)
def test_site_renders_in_headless_chromium(tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    site = built_site(tmp_path)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        for path, check in (
            ("/", None),
            ("/running/", "table-rows"),
            ("/benchmarks/noniid-fmnist/", "images"),
        ):
            driver.get(base + path)
            driver.execute_script("return document.readyState")
            images = driver.execute_script(
                "return Array.from(document.images).map(i => [i.src, i.complete, i.naturalWidth])"
            )
            broken = [src for src, complete, width in images if not complete or width == 0]
            assert not broken, f"{path}: images that did not load: {broken}"
            if check == "images":
                assert images, f"{path}: no images"
            if check == "table-rows":
                rows = driver.execute_script(
                    "return Array.from(document.querySelectorAll('table tr'))"
                    ".filter(r => r.textContent.includes('num-clients')).length"
                )
                assert rows >= 1, f"{path}: the configuration table is missing"
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, f"{path}: console errors: {errors}"
            name = path.strip("/").replace("/", "-") or "home"
            driver.save_screenshot(str(tmp_path / f"{name}.png"))
        assert (tmp_path / "home.png").stat().st_size > 0
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    shutil.rmtree(site, ignore_errors=True)
