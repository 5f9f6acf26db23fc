"""The docs site (`make docs`, `install/docs.py`) builds from the notebooks and docs/ with no network, and every
name of every module's `__all__` is in it; its pages link to each other, not to the repository's files."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.system  # a whole build of the site from every notebook (about 100 s): `make test`, not `make test-fast`
def test_docs_site_builds_and_shows_every_public_name(tmp_path):
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "install/docs.py", "--check", "--out", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "every name of every module's __all__ is in the site" in done.stdout
    pages = {p.name: p.read_text() for p in site.glob("*.html")}
    # the README's page, a library notebook with its show_doc, a guide written in docs/, the benchmarks
    assert {"index.html", "core_schema.html", "running.html", "benchmarks.html"} <= set(pages), sorted(pages)
    assert "validate_orders" in pages["features_validation.html"]
    assert 'href="running.html"' in pages["index.html"]  # docs/running.md became the site's page
    # no link leads to the placeholder host or to a Markdown/notebook file of the repository
    hrefs = {h for text in pages.values() for h in re.findall(r'href="([^"]+)"', text)}
    assert not [h for h in hrefs if "example.invalid" in h or re.search(r"\.(md|ipynb)(#|$)", h)], hrefs


def test_missing_names_are_reported(tmp_path):
    """The check can fail: a site without a module's names is refused, naming them."""
    sys.path.insert(0, str(ROOT / "install"))
    import docs

    (tmp_path / "index.html").write_text("<html><body>nothing documented</body></html>")
    missing = docs.missing_names(tmp_path)
    assert "fraud_poc.core.schema.validate_orders" not in missing  # validation's, not schema's
    assert any(name.startswith("fraud_poc.core.schema.") for name in missing), missing[:5]
