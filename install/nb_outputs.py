"""Keeps a notebook's outputs where they are the same from run to run (nbdev's documentation shows them).

Runs the notebook's cells as `nbdev_test` does (cells flagged with a flag of settings.ini's `tst_flags`, or with
`eval: false`, are skipped), twice, each in a fresh process, and stores a cell's outputs only when both runs gave the
same and they name no temporary path; images, widgets and stderr are left out, and every other cell is left without
outputs. `python install/nb_outputs.py nbs/00_core_schema.ipynb ...`, then `make clean-nbs`.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP_DATA = ("text/plain", "text/markdown", "text/html")
UNSTABLE = re.compile(r"/tmp/|/var/folders/| at 0x[0-9a-f]+")


def _directives(source: str) -> set[str]:
    names = set()
    for line in source.splitlines():
        m = re.match(r"#\|\s*([\w-]+:?)\s*(.*)", line)
        if not m:
            break
        names.add(m.group(1) + (" " + m.group(2).strip().lower() if m.group(1) == "eval:" else ""))
    return names


def _kept(output: dict) -> dict | None:
    """The part of an output that may be stored, or None."""
    kind = output.get("output_type")
    if kind == "stream":
        return output if output.get("name") == "stdout" else None
    if kind in ("execute_result", "display_data"):
        data = {k: v for k, v in output.get("data", {}).items() if k in KEEP_DATA}
        if not data:
            return None
        return {**output, "data": data, "metadata": {}} | (
            {"execution_count": None} if kind == "execute_result" else {}
        )
    return None


def run_once(path: Path) -> list[list[dict] | None]:
    """Each cell's outputs (None: not run), as `nbdev_test` would run the notebook."""
    from execnb.shell import CaptureShell
    from nbdev.config import get_config

    skip = set(get_config().tst_flags.split())
    nb = json.loads(path.read_text())
    os.environ["IN_TEST"] = "1"
    os.chdir(path.parent)
    sys.path.insert(0, str(ROOT))
    shell = CaptureShell(path)
    results = []
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        directives = _directives(source)
        if cell["cell_type"] != "code" or skip & directives or "eval: false" in directives:
            results.append(None)
            continue
        outputs = shell.run(source)
        if shell.exc:
            raise SystemExit(f"{path.name}: a cell failed:\n{source}\n{shell.exc!r}")
        results.append([o for o in (_kept(dict(o)) for o in outputs) if o is not None])
    return results


def keep_stable_outputs(path: Path) -> int:
    """Runs `path` twice in fresh processes; stores the outputs both runs agree on. Returns how many cells have some."""
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, __file__, "--run", str(path)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:] + done.stdout[-3000:])
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    nb = json.loads(path.read_text())
    kept = 0
    for cell, first, second in zip(nb["cells"], *runs, strict=True):
        if cell["cell_type"] != "code":
            continue
        same = first is not None and first == second and not UNSTABLE.search(json.dumps(first))
        cell["outputs"] = first if same else []
        cell["execution_count"] = None
        kept += bool(same and first)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return kept


if __name__ == "__main__":
    if sys.argv[1] == "--run":
        results = run_once(Path(sys.argv[2]).resolve())
        print(json.dumps(results))
    else:
        for name in sys.argv[1:]:
            print(f"{name}: outputs kept in {keep_stable_outputs(Path(name).resolve())} cells")
