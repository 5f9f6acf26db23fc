"""Builds the docs site from the notebooks and `docs/*.md`, offline, into `_docs/` (`make docs`; settings.ini's `doc_path`).

nbdev's `nbdev_docs` renders through Quarto, which this project cannot install: the `quarto-cli` package on the
package index is a source package only, whose build downloads Quarto's binary from outside it. So nbdev does the
notebook half, as for `nbdev_docs`: `proc_nbs` writes the notebooks as the site shows them into `_proc/` (a
`show_doc` after each export, the exported code hidden, backticked names linked, and the cells that `show_doc` needs
run, so a `show_doc` that fails fails the build); this script then renders each one, and each page of `docs/`, to
HTML with nbconvert and Pygments, with one sidebar, a page per notebook, no network and nothing outside the venv.

`python install/docs.py [--out DIR]`; `--check` also checks that every name in each module's `__all__` is in the site
(CI: `tests/test_docs.py`).
"""

import argparse
import html
import importlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# docs/*.md pages in this order after the notebooks' pages; any other .md of docs/ follows them
MD_ORDER = [
    "running",
    "learning",
    "operations",
    "security",
    "metrics",
    "docker",
    "layout",
    "data",
    "redis-layout",
]
MD_ORDER += ["benchmarks"]

CSS = """
body { margin: 0; font: 15px/1.5 system-ui, sans-serif; color: #222; }
nav { position: fixed; top: 0; bottom: 0; left: 0; width: 250px; overflow-y: auto; padding: 12px;
      background: #f6f7f9; border-right: 1px solid #ddd; font-size: 13px; box-sizing: border-box; }
nav a { display: block; padding: 2px 4px; color: #234; text-decoration: none; }
nav a.here { background: #dde6f0; font-weight: 600; }
nav h4 { margin: 12px 0 4px; color: #666; text-transform: uppercase; font-size: 11px; }
main { margin-left: 250px; padding: 16px 32px; max-width: 1000px; }
pre { background: #f5f5f5; padding: 8px; overflow-x: auto; font-size: 13px; }
code { font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
.jp-InputArea, .input_area { border-left: 3px solid #9ab; margin: 6px 0; }
.jp-OutputArea, .output_area { margin: 0 0 10px 12px; }
img { max-width: 100%; }
blockquote { color: #555; border-left: 3px solid #ccc; margin-left: 0; padding-left: 12px; }
.description { color: #555; font-size: 17px; }
"""


def frontmatter(nb: dict) -> dict:
    """The title, description and output file nbdev put in the processed notebook's first raw cell."""
    import yaml

    for cell in nb["cells"]:
        src = "".join(cell.get("source") or "")
        if cell["cell_type"] == "raw" and src.startswith("---"):
            return yaml.safe_load(src.strip().strip("-")) or {}
    return {}


def _strip_quarto(text: str) -> str:
    """Quarto's fenced divs (`::: {...}` lines) and directives (`#| ...` lines) are not for this renderer."""
    text = re.sub(r"^:::.*$\n?", "", text, flags=re.M)
    text = re.sub(r"\]\(([^)\s]+)\)\{[^}\n]*\}", r"](\1)", text)  # a link's {target=... style=...}
    return re.sub(r"^#\|.*$\n?", "", text, flags=re.M)


def other_public_names(nb: dict, source: Path) -> dict | None:
    """A markdown cell listing the names of the notebook's module's `__all__` that no `show_doc` shows (constants,
    aliases), each with its value, or None when there is none. `source`: the notebook in nbs/ (its `default_exp`)."""
    sources = ["".join(c.get("source") or "") for c in nb["cells"] if c["cell_type"] == "code"]
    original = [
        "".join(c["source"]) for c in json.loads(source.read_text())["cells"] if c["cell_type"] == "code"
    ]
    exp = next(
        (m.group(1) for s in original if (m := re.search(r"^#\|\s*default_exp\s+(\S+)", s, re.M))), None
    )
    if exp is None:
        return None
    module = importlib.import_module(f"fraud_poc.{exp}")
    shown = set(re.findall(r"^show_doc\((\w+)", "\n".join(sources), re.M))
    rows = []
    for name in getattr(module, "__all__", []):
        if name in shown:
            continue
        value = repr(getattr(module, name, None))
        value = value if len(value) <= 160 else value[:157] + "..."
        value = value.replace("|", "\\|").replace("`", "'").replace("\n", " ")
        rows.append(f"| `{name}` | `{value}` |")
    if not rows:
        return None
    table = "\n".join(["| name | value |", "|---|---|", *rows])
    text = f"## Other public names\n\nThe names of `fraud_poc.{exp}.__all__` that are not functions or classes above:\n\n{table}\n"
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def site_notebook(nb: dict, doc_url: str, source_url: str) -> dict:
    """The processed notebook as this renderer shows it: no frontmatter cell, no empty cell, links made relative
    (to the site's pages, and `show_doc`'s source links to the module in the checkout beside `_docs/`)."""
    cells = []
    for cell in nb["cells"]:
        src = "".join(cell.get("source") or "")
        if cell["cell_type"] == "raw" or (not src.strip() and not cell.get("outputs")):
            continue
        if re.search(r"^#\|\s*echo:\s*false", src, re.M):  # show_doc cells: the output only
            cell.setdefault("metadata", {}).setdefault("tags", []).append("remove_input")
        cell["source"] = _strip_quarto(src).replace(doc_url, "").replace(source_url, "../")
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "text/markdown" in data:
                md = "".join(data["text/markdown"])
                data["text/markdown"] = _strip_quarto(md).replace(doc_url, "").replace(source_url, "../")
        cells.append(cell)
    nb["cells"] = cells
    return nb


def md_notebook(path: Path) -> dict:
    """A page of docs/ as a one-cell notebook, its links to the repository's files made links of the site."""
    text = path.read_text()
    return {
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": text}],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def fix_links(body: str, pages: dict[str, str]) -> str:
    """`docs/x.md`, `x.md` and `nbs/NN_x.ipynb` links to the page of the site that shows them."""

    def sub(m: re.Match) -> str:
        target, anchor = m.group(2), m.group(3) or ""
        name = Path(target).name
        if name in pages:
            return f'{m.group(1)}"{pages[name]}{anchor}"'
        return m.group(0)

    return re.sub(r'(href=)"((?:\.\./)?(?:docs/|nbs/)?[\w.-]+\.(?:md|ipynb))(#[^"]*)?"', sub, body)


def page(title: str, description: str, body: str, nav: str) -> str:
    from pygments.formatters import HtmlFormatter

    styles = CSS + HtmlFormatter().get_style_defs(".highlight")
    desc = f'<p class="description">{html.escape(description)}</p>' if description else ""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)} - fraud-poc</title>'
        f"<style>{styles}</style></head>\n<body>{nav}<main><h1>{html.escape(title)}</h1>{desc}\n{body}\n</main>"
        "</body></html>\n"
    )


def _docs_eval(cell) -> bool | None:
    """Which cells the docs run (nbdev's `_do_eval`, stricter): exports, and cells of nothing but imports and
    `show_doc` calls.

    nbdev also runs any cell that imports something besides other code; here that would run tests (servers, Redis,
    Dask) while building the docs, so such a cell is shown, not run."""
    import ast

    if cell.cell_type != "code" or not cell.source:
        return None
    if cell.directives_.get("eval:", [""])[0].lower() == "false":
        return None
    if cell.directives_.keys() & {"export", "exports", "exporti", "exec_doc"}:
        return True
    try:
        body = ast.parse(cell.source).body
    except SyntaxError:
        return None

    def harmless(t) -> bool:  # an import, or a call of show_doc
        if isinstance(t, (ast.Import, ast.ImportFrom)):
            return True
        return (
            isinstance(t, ast.Expr)
            and isinstance(t.value, ast.Call)
            and getattr(t.value.func, "id", None) == "show_doc"
        )

    return True if body and all(harmless(t) for t in body) else None


def build(out: Path) -> list[Path]:
    """The site in `out`: one page per notebook (index.html from nbs/index.ipynb) and per page of docs/."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs

    cfg = get_config()
    doc_url = cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/")
    doc_url = doc_url.rstrip("/") + "/"
    source_url = f"{cfg.git_url.rstrip('/')}/blob/{cfg.branch}/"
    cache = cfg.config_path / "_proc"
    shutil.rmtree(cache, ignore_errors=True)  # a notebook renamed or removed leaves no stale page
    import nbdev.processors

    nbdev.processors._do_eval = _docs_eval  # in this process: n_workers=0 runs the notebooks here, one by one
    proc_nbs(path=str(cfg.nbs_path), n_workers=0, force=True)

    entries = []  # (section, html name, title, description, notebook)
    for path in sorted(cache.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        fm = frontmatter(nb)
        name = fm.get("output-file") or path.with_suffix(".html").name
        section = "Start" if path.stem == "index" else "Library"
        if path.stem[:2].isdigit() and int(path.stem[:2]) >= 50:
            section = "Events and launcher" if int(path.stem[:2]) < 80 else "Exploring"
        if path.stem[:2] in ("40", "41", "42", "43", "44", "45"):
            section = "Events and launcher"
        entries.append((section, name, fm.get("title", path.stem), fm.get("description", ""), path.name, nb))
    entries.sort(key=lambda e: (e[0] != "Start", e[4]))
    # nbdev names a page after its notebook less the number: a step's work (32_sample_data) and its event
    # (54_sample_data) would be one page. The first keeps the name; the others take their notebook's.
    taken, groups = set(), {}
    for i, e in enumerate(entries):
        if e[1] in taken:
            groups.setdefault(e[1], []).append(Path(e[4]).with_suffix(".html").name)
            entries[i] = (e[0], groups[e[1]][-1], *e[2:])
        taken.add(entries[i][1])
    mds = sorted(
        DOCS.glob("*.md"),
        key=lambda p: (p.stem not in MD_ORDER, MD_ORDER.index(p.stem) if p.stem in MD_ORDER else 0, p.stem),
    )
    for path in mds:
        text = path.read_text()
        m = re.search(r"^# (.+)$", text, re.M)
        title = m.group(1).strip() if m else path.stem
        body = re.sub(r"^# .+\n", "", text, count=1, flags=re.M) if m else text
        nb = md_notebook(path)
        nb["cells"][0]["source"] = body
        name = f"{path.stem}.html" if f"{path.stem}.html" not in taken else f"guide-{path.stem}.html"
        entries.append(("Guides", name, title, "", path.name, nb))

    pages = {e[4]: e[1] for e in entries}
    pages.update({Path(e[4]).name: e[1] for e in entries})
    nav_sections: dict[str, list] = {}
    for e in entries:
        nav_sections.setdefault(e[0], []).append(e)
    order = ["Start", "Guides", "Library", "Events and launcher", "Exploring"]

    def nav(here: str) -> str:
        parts = ['<nav><a href="index.html"><b>fraud-poc</b></a>']
        for section in order:
            if section not in nav_sections:
                continue
            parts.append(f"<h4>{section}</h4>")
            for e in nav_sections[section]:
                cls = ' class="here"' if e[1] == here else ""
                parts.append(f'<a href="{e[1]}"{cls}>{html.escape(e[2])}</a>')
        return "".join(parts) + "</nav>"

    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="basic", exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_input_tags={"remove_input"}), enabled=True)
    bodies = {}
    for section, name, title, description, _src, nb in entries:
        if section != "Guides":
            others = other_public_names(nb, cfg.nbs_path / _src)
            nb = site_notebook(nb, doc_url, source_url)
            if others:
                nb["cells"].append(others)
        body, _ = exporter.from_notebook_node(nbformat.reads(json.dumps(nb), as_version=4))
        bodies[name] = (title, description, fix_links(body, pages))
    anchors = {name: set(re.findall(r'id="([^"]+)"', b[2])) for name, b in bodies.items()}

    def to_anchor(m: re.Match) -> str:
        """A link into a page that shares its name with others goes to the one that has the anchor."""
        target, anchor = m.group(1), m.group(2)
        if anchor not in anchors.get(target, ()):
            target = next((t for t in groups.get(target, []) if anchor in anchors[t]), target)
        return f'href="{target}#{anchor}"'

    written = []
    for name, (title, description, body) in bodies.items():
        if groups:
            body = re.sub(r'href="([\w.-]+\.html)#([^"]+)"', to_anchor, body)
        target = out / name
        target.write_text(page(title, description, body, nav(name)))
        written.append(target)
    for image in DOCS.glob("*.png"):  # the README's and pages' pictures, as `docs/x.png` and as `x.png`
        (out / "docs").mkdir(exist_ok=True)
        shutil.copy2(image, out / "docs" / image.name)
        shutil.copy2(image, out / image.name)
    return written


def public_names() -> dict[str, list[str]]:
    """Every module of fraud_poc/ and the names of its `__all__`."""
    names = {}
    for path in sorted((ROOT / "fraud_poc").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name.startswith("_"):
            continue
        module = importlib.import_module(".".join(rel.parts))
        names[module.__name__] = list(getattr(module, "__all__", []))
    return names


def missing_names(out: Path) -> list[str]:
    """`module.name` of each public name that no page of the site shows (as a word)."""
    text = "\n".join(p.read_text() for p in out.glob("*.html"))
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    return [f"{m}.{n}" for m, names in public_names().items() for n in names if n not in words]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the site (default: doc_path)")
    parser.add_argument(
        "--check", action="store_true", help="fail if a name of a module's __all__ is not shown"
    )
    args = parser.parse_args()
    from nbdev.config import get_config

    out = args.out or get_config().doc_path
    started = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    written = build(out)
    print(f"{len(written)} pages in {out} ({time.monotonic() - started:.1f} s): open {out / 'index.html'}")
    if args.check:
        missing = missing_names(out)
        if missing:
            sys.exit(f"{len(missing)} public names are in no page of the site: {', '.join(missing)}")
        print("every name of every module's __all__ is in the site")


if __name__ == "__main__":
    main()
