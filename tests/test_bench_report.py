"""`bench/report.py`: a benchmark's printed figures (its child processes' too) become its own section of
docs/benchmarks.md, added before the history the first time and replaced after; a benchmark run by another writes
none; `FRAUD_BENCH_RECORD=0` writes nothing; a failing benchmark leaves the page as it was."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import report  # noqa: E402

PAGE = "# Benchmarks\n\nintro\n\n## Latest runs\n\n## History\n\nold figures, 2026-11-29\n"


@pytest.fixture
def page(tmp_path, monkeypatch):
    path = tmp_path / "benchmarks.md"
    path.write_text(PAGE)
    monkeypatch.setattr(report, "BENCHMARKS", path)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.delenv("FRAUD_BENCH_RECORD", raising=False)
    monkeypatch.delenv(report._OUTER, raising=False)
    return path


def section_of(text: str, name: str) -> str:
    return text.split(f"<!-- bench:{name} -->\n")[1].split(f"<!-- /bench:{name} -->")[0]


def test_section_added_then_replaced(page, capfd):
    with report.recorded("bench_x"):
        print("rate 500: p99 3.1 ms", flush=True)
        subprocess.run([sys.executable, "-c", "print('child: peak 1.2 GB')"], check=True)
    first = page.read_text()
    body = section_of(first, "bench_x")
    assert "rate 500: p99 3.1 ms\nchild: peak 1.2 GB\n```" in body
    assert "UTC" in body and "load (1 min)" in body and "cores" in body and "`python bench/" in body
    assert first.index("<!-- bench:bench_x -->") < first.index("## History") and first.endswith(
        "old figures, 2026-11-29\n"
    )
    assert "child: peak 1.2 GB" in capfd.readouterr().out  # still shown on the terminal

    with report.recorded("bench_x"):
        print("rate 500: p99 2.9 ms")
    second = page.read_text()
    assert second.count("<!-- bench:bench_x -->") == 1
    assert "p99 2.9 ms" in section_of(second, "bench_x") and "p99 3.1 ms" not in second


def test_nested_disabled_and_failed_runs_write_nothing(page, monkeypatch):
    with report.recorded("bench_outer"):
        with report.recorded("bench_inner"):  # as bench_health runs bench_service
            print("inner figure")
    text = page.read_text()
    assert "bench_inner -->" not in text and "inner figure" in section_of(text, "bench_outer")

    monkeypatch.setenv("FRAUD_BENCH_RECORD", "0")
    with report.recorded("bench_off"):
        print("trial")
    assert "bench_off" not in page.read_text()
    monkeypatch.delenv("FRAUD_BENCH_RECORD")

    before = page.read_text()
    with pytest.raises(RuntimeError), report.recorded("bench_failing"):
        print("half a figure")
        raise RuntimeError("service did not start")
    assert page.read_text() == before
