"""``report.html``: the whole study on one self-contained page.

Tables, figures (inlined as base64 PNG), the study file, library versions and one row per cell with its status
and a relative link to its folder. Nothing is loaded from elsewhere, so the page opens from disk, offline, and
keeps working when the study folder is moved or archived as a whole.
"""

from __future__ import annotations

import base64
import html
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from .._io import write_text
from .figures import Figure
from .tables import TABLES, footnote

PACKAGES = [
    "histotransfer",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "scikit-learn",
    "h5py",
    "openslide-python",
    "openslide-bin",
    "tiffslide",
    "tifffile",
    "matplotlib",
    "pyyaml",
]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.meta { color: #555; } .note { color: #555; font-size: 0.85em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.9em; max-width: 60em; }
pre { background: #f7f7f7; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.notes li { color: #7a4b00; } .failed { color: #b00020; font-weight: bold; } .blocked { color: #a06000; }
.done, .cached { color: #1b6e20; }
"""


def versions() -> dict[str, str]:
    """Python, platform and the versions of the libraries the study ran with."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, border=0, na_rep="–")


def _cells_html(cells: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for c in cells:
        status = html.escape(str(c["status"]))
        link = html.escape(c["folder"].rstrip("/") + "/", quote=True)
        seconds = c.get("seconds")
        secs = f"{float(seconds):.1f}" if seconds not in (None, "") and not pd.isna(seconds) else ""
        message = html.escape(str(c.get("message") or ""))
        if c["status"] == "failed":
            message += f' (<a href="{link}error.log">error.log</a>)'
        rows.append(
            f'<tr><td>{html.escape(c["kind"])}</td><td><a href="{link}">{html.escape(c["key"])}</a></td>'
            f'<td class="{status}">{status}</td><td>{secs}</td><td>{message}</td></tr>'
        )
    head = "<tr><th>stage</th><th>cell (folder)</th><th>status</th><th>seconds</th><th>message</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


SHORTCUT_NOTE = (
    "Within-group AUC: the model's mean test AUC within each group (the group column, or staining "
    "batches inferred from slide colour), with a 95% bootstrap interval: the direct evidence, since "
    "inside one group the group cannot rank slides. Group-only AUC: slides scored by their group alone "
    "(no slide's own label used), judged against a permutation null. Colour-only AUC: a logistic "
    "regression on each slide's tissue colour statistics, out of fold; a lower bound on what colour can "
    "tell. A verdict is shown where the within-group AUC is near chance, the group alone comes within "
    "the margin of the model's AUC (on all slides or on the test split), or, with no group, colour does."
)


def write_report(
    path: Path,
    title: str,
    study_file: Path,
    study_text: str,
    tables: Mapping[str, pd.DataFrame],
    figures: Sequence[Figure],
    cells: Sequence[Mapping[str, Any]],
    notes: Sequence[str] = (),
    shortcuts: pd.DataFrame | None = None,
) -> Path:
    """Write the self-contained HTML report to ``path`` (atomically) and return it; ``notes`` (small samples,
    shortcuts, CKA caveats) come first, so nobody reads a table without them. ``shortcuts`` (one row per MIL
    run, ``tables.shortcut_table``) is shown after the tables when it has rows."""
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["status"]] = counts.get(c["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no cells"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)} — histotransfer study</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">Study file <code>{html.escape(str(study_file))}</code>; report written '
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; cells: {html.escape(summary)}.</p>",
    ]
    if notes:
        parts.append('<h2>Read these first</h2><ul class="notes">')
        parts += [f"<li>{html.escape(n)}</li>" for n in notes]
        parts.append("</ul>")
    parts.append("<h2>Tables</h2>")
    for name, df in tables.items():
        parts.append(f'<h3 id="{name}">{html.escape(TABLES[name])}</h3>')
        if len(df):
            parts.append(_table_html(df))
        else:
            parts.append('<p class="note">No encoder configuration of the study belongs in this table.</p>')
        parts.append(
            f'<p class="note">{html.escape(footnote(name))} CSV: <a href="tables/{name}.csv">tables/{name}.csv'
            f'</a>, Markdown: <a href="tables/{name}.md">tables/{name}.md</a>.</p>'
        )
    if shortcuts is not None and len(shortcuts):
        parts.append(
            '<h2 id="shortcut_check">Shortcut check: do the group or colour alone explain the model&#x27;s AUC?</h2>'
        )
        parts.append(_table_html(shortcuts))
        parts.append(
            f'<p class="note">{html.escape(SHORTCUT_NOTE)} CSV: <a href="tables/runs_mil.csv">'
            "tables/runs_mil.csv</a>.</p>"
        )
    parts.append("<h2>Figures</h2>")
    for fig in figures:
        parts.append(f'<h3 id="{fig.name}">{html.escape(fig.title)}</h3>')
        if fig.path is None:
            parts.append(f'<p class="note">Not drawn: {html.escape(fig.missing)}</p>')
        else:
            parts.append(f"<figure>{_img(fig.path)}<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    parts.append("<h2>Cells</h2>")
    parts.append(
        '<p class="note">Each cell is cached in its folder (<code>done.json</code> marks it finished); '
        "re-running the study skips finished cells and redoes failed ones.</p>"
    )
    parts.append(_cells_html(cells))
    parts.append("<h2>Study file</h2>")
    parts.append(f"<pre>{html.escape(study_text)}</pre>")
    parts.append("<h2>Versions</h2>")
    parts.append(_table_html(pd.DataFrame(list(versions().items()), columns=["package", "version"])))
    parts.append("</body></html>")
    write_text("\n".join(parts) + "\n", path)
    return path
