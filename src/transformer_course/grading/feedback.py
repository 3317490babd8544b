"""One HTML page per student and assignment: score, and each test's verdict and diagnosis.

Built from the test results alone (the checks' reports), not from the graded notebook, so
the source of hidden tests never reaches a student.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #ddd; padding: .4rem; text-align: left; vertical-align: top; }}
pre {{ white-space: pre-wrap; margin: 0; }}
.passed {{ color: #1a7f37; }} .failed {{ color: #cf222e; }} .not-attempted {{ color: #9a6700; }}
</style></head><body>
<h1>{title}</h1>
<p>Status: {status}. Score: <strong>{score:g} / {max_score:g}</strong>.</p>
{table}
</body></html>
"""


def write(path: Path, sub) -> None:
    rows = "".join(
        f'<tr><td>{escape(t.test_id)}</td><td class="{t.status.replace(" ", "-")}">'
        f"{escape(t.status)}</td><td>{sub.test_scores.get(t.test_id, 0.0):g} / {t.points:g}</td>"
        f"<td><pre>{escape(t.message)}</pre></td></tr>"
        for t in sub.tests
    )
    table = (
        f"<table><tr><th>test</th><th>verdict</th><th>points</th><th>why</th></tr>{rows}</table>"
        if rows
        else "<p>No test results: the notebook could not be graded.</p>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        PAGE.format(
            title=escape(f"{sub.assignment}: feedback for {sub.student}"),
            status=escape(sub.status),
            score=sub.score,
            max_score=sub.max_score,
            table=table,
        )
    )
