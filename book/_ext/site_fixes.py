"""Two fixes to Jupyter Book 1's pages, each found by the site's browser test
(tests/test_site.py) as an error in Chromium's console."""

from __future__ import annotations


def _page(app, pagename, templatename, context, doctree):
    # sphinx-thebe adds its configuration script once per read of the sources, and Jupyter
    # Book reads them twice: the page declared `const THEBE_JS_URL` twice, a SyntaxError.
    seen, scripts = set(), []
    for script in context.get("script_files", []):
        # The same script may come as filename None or "": neither is a file.
        name = getattr(script, "filename", script) or ""
        key = (str(name), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            scripts.append(script)
    context["script_files"] = scripts
    # The pydata theme's script rejects an empty light/dark mode with a console error;
    # "auto" follows the reader's system setting, as the empty mode meant to.
    context.setdefault("default_mode", "auto")


def setup(app):
    app.connect("html-page-context", _page, priority=900)  # after the themes add theirs
    return {"parallel_read_safe": True, "parallel_write_safe": True}
