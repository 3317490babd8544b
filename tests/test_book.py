"""The website builds offline, warnings as errors, with a page for every entry of _toc.yml."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT


def _toc_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries = [toc["root"]]
    entries += [e["file"] for part in toc.get("parts", [toc]) for e in part.get("chapters", [])]
    return entries


@pytest.mark.slow
def test_site_builds_offline_with_warnings_as_errors(tmp_path):
    # Any attempt to reach the network goes to a closed local port and fails the build.
    closed = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": ""}
    env.update(http_proxy=closed, https_proxy=closed, no_proxy="")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [jupyter_book, "build", ROOT, "--path-output", tmp_path, "--warningiserror"]
    done = subprocess.run([*command, "--keep-going"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    for entry in _toc_files():
        assert (html / f"{entry}.html").is_file(), f"no page for {entry}"
    assert (html / "index.html").is_file()
