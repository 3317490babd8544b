"""The website: built offline, warnings as errors, with a page for every entry of _toc.yml;
then served on localhost and read by headless Chromium. Every page loads without console
errors, its math is typeset by the MathJax the site serves itself, its images load, and an
exercise page's Colab button opens that exercise. Screenshots go to _build/screenshots/ for
a person to see."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from transformer_course.colab import colab_url

from .conftest import ROOT

CHROMIUM = shutil.which("chromium")
SCREENSHOTS = ROOT / "_build" / "screenshots"
# Chromium's own connections to Google would fail on an offline machine, noisily: off.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]  # fmt: skip

pytestmark = pytest.mark.slow


def _pages() -> list[str]:
    """Every page of _toc.yml, as its path without extension."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries:
            pages.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        walk(part["chapters"])
    return pages


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The site, built once for this module, with any attempt to reach the network sent to a
    closed local port (so it fails the build)."""
    out = tmp_path_factory.mktemp("site")
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": ""}
    env.update(http_proxy=closed, https_proxy=closed, no_proxy="")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    build = [jupyter_book, "build", ROOT, "--path-output", out, "--warningiserror", "--keep-going"]
    done = subprocess.run(build, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out / "_build" / "html"


def test_site_builds_offline_with_a_page_for_every_toc_entry(built):
    for page in _pages():
        assert (built / f"{page}.html").is_file(), f"no page for {page}"
    assert (built / "index.html").is_file()


@pytest.fixture(scope="module")
def site(built):
    """The built site, served on localhost."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=built)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None and not os.environ.get("REQUIRE_BROWSER"):
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def _visit(browser, url: str):
    """The page at url once loaded and typeset, with what went wrong on the way."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url, wait_until="networkidle")
    page.evaluate("() => window.MathJax && MathJax.startup ? MathJax.startup.promise : null")
    return page, problems


@pytest.mark.parametrize("page_path", _pages())
def test_every_page_loads_typesets_its_math_and_its_images(site, browser, page_path):
    page, problems = _visit(browser, f"{site}/{page_path}.html")
    try:
        assert problems == [], problems
        body = page.inner_text("article")
        assert "$$" not in body and "\\frac" not in body, "raw TeX left on the page"
        if page.locator("span.math, div.math").count():  # a page with math has it typeset
            assert page.locator("mjx-container").count() > 0, "MathJax did not typeset the math"
            src = page.evaluate("() => [...document.scripts].map(s => s.src).join(' ')")
            assert f"{site}/_static/mathjax/" in src and "cdn" not in src, src
        broken = page.evaluate(
            "() => [...document.images].filter(i => !i.complete || i.naturalWidth === 0)"
            ".map(i => i.src)"
        )
        assert broken == [], broken
    finally:
        page.close()


def test_an_exercise_pages_colab_button_opens_that_exercise(site, browser):
    path = "exercises/01_self_attention/01_self_attention"
    page, _ = _visit(browser, f"{site}/{path}.html")
    try:
        hrefs = page.eval_on_selector_all("a[href*='colab.research.google.com']",
                                          "links => links.map(a => a.href)")  # fmt: skip
        expected = colab_url(ROOT, f"{path}.ipynb")
        assert hrefs and set(hrefs) == {expected}, hrefs  # the theme's button and the badge
    finally:
        page.close()


def test_screenshots_of_the_landing_page_and_a_chapter(site, browser):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name, page_path in (("landing", "book/intro"), ("chapter-01", "book/01_self_attention")):
        page, _ = _visit(browser, f"{site}/{page_path}.html")
        target = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(target), full_page=False)
        page.close()
        assert target.stat().st_size > 10_000, f"{target} looks empty"
