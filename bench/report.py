"""Each benchmark writes its own section of `docs/benchmarks.md`, never by hand: `with recorded("bench_x"): main()`.

What the benchmark prints (it and the processes it starts) is shown on the terminal as it runs and, when it ends without an error, replaces that
benchmark's section (between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; added before the history if there is
none yet) with the date, the machine and its load before and after, the commit, the command and the printed figures.
`FRAUD_BENCH_RECORD=0` leaves the file alone (a trial run).
"""

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "docs" / "benchmarks.md"
HISTORY = "\n## History"
MAX_LINES = 300
_OUTER = "FRAUD_BENCH_RECORDING"  # set while a benchmark records: the ones it starts do not


class _Tee:
    """Copies what is written to file descriptor 1 (this process's and its children's) while passing it on."""

    def __init__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.close(write)
        # this process's prints go to file descriptor 1 too, whatever sys.stdout was (a test's capture, say)
        self.stdout, sys.stdout = sys.stdout, open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        self.read, self.chunks = read, []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        while chunk := os.read(self.read, 65536):
            self.chunks.append(chunk)
            os.write(self.saved, chunk)

    def close(self) -> str:
        """Puts file descriptor 1 back and returns what went through it."""
        sys.stdout.flush()
        sys.stdout.close()
        sys.stdout = self.stdout
        os.dup2(self.saved, 1)  # the pipe's last writer here is gone: the pump reads to its end
        self.thread.join(timeout=10)
        os.close(self.saved)
        os.close(self.read)
        return b"".join(self.chunks).decode(errors="replace")


def machine() -> str:
    """Cores, memory and the 1-minute load average, as the section's header says them."""
    cores = os.cpu_count()
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        memory = f", {mem_kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        memory = ""
    return f"{cores} cores{memory}"


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "fraud_poc", "bench"], cwd=ROOT, capture_output=True
    )
    return (done.stdout.strip() or "unknown") + (" with changes" if dirty.stdout.strip() else "")


def section(name: str, started: float, load_before: float, output: str) -> str:
    """The Markdown of one benchmark's latest run."""
    lines = output.rstrip("\n").splitlines()
    if len(lines) > MAX_LINES:
        lines = [f"... ({len(lines) - MAX_LINES} lines above left out)"] + lines[-MAX_LINES:]
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(started))
    minutes = (time.time() - started) / 60
    command = "python " + " ".join(shlex.quote(a) for a in [f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    body = "\n".join(lines)
    return (
        f"<!-- bench:{name} -->\n### `{name}`: latest run\n\n"
        f"{when} UTC, {minutes:.1f} min; machine: {machine()}, load (1 min) {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after; commit {commit()}.\n\n`{command}`\n\n```text\n{body}\n```\n"
        f"<!-- /bench:{name} -->\n"
    )


def write_section(name: str, text: str, path: Path | None = None) -> None:
    """Replaces the section of `name` in `path` (docs/benchmarks.md), or adds it before the history."""
    path = path or BENCHMARKS
    doc = path.read_text()
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->\n.*?<!-- /bench:{re.escape(name)} -->\n", re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc)
    elif HISTORY in doc:
        head, tail = doc.split(HISTORY, 1)
        doc = f"{head.rstrip()}\n\n{text}{HISTORY}{tail}"
    else:
        doc = f"{doc.rstrip()}\n\n{text}"
    path.write_text(doc)


@contextmanager
def recorded(name: str):
    """Runs the benchmark with its printed output (and its children's) copied into its section of benchmarks.md.

    A benchmark that another one runs (`bench_health.py --beside 'bench_service.py ...'`) writes no section of its own:
    its output is part of the outer one's."""
    if os.environ.get("FRAUD_BENCH_RECORD", "1") == "0" or os.environ.get(_OUTER):
        yield
        return
    os.environ[_OUTER] = name
    started, load_before = time.time(), os.getloadavg()[0]
    tee = _Tee()
    try:
        yield
    finally:
        output = tee.close()
        del os.environ[_OUTER]
    write_section(name, section(name, started, load_before, output))
    print(f"(written to {BENCHMARKS.relative_to(ROOT)}, section {name})")
