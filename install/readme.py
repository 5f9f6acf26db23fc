"""Writes README.md from nbs/index.ipynb (`make readme`; `make check-sync` checks README.md is up to date).

nbdev's `nbdev_readme` does the same through Quarto, which has no package this project can install (the
`quarto-cli` wheel downloads its binary when it is built). The README is the notebook's markdown cells, in order,
verbatim, separated by a blank line; a code cell is refused, as its output would not be in the README.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_text(notebook: dict) -> str:
    """The README of a notebook: its markdown cells joined by blank lines."""
    parts = []
    for number, cell in enumerate(notebook["cells"]):
        source = "".join(cell["source"]).strip("\n")
        if cell["cell_type"] != "markdown":
            sys.exit(
                f"nbs/index.ipynb cell {number} is a {cell['cell_type']} cell: the README takes markdown only"
            )
        parts.append(source)
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    notebook = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    (ROOT / "README.md").write_text(readme_text(notebook))
