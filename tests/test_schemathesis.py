"""Schemathesis against both services' OpenAPI specs (`config/openapi-*.json`), bounded in time: no 5xx for any
input, and every answer conforms to the spec (status documented, content type, headers, body schema).

The prediction service runs with a small model live and the API token sent, so every endpoint does its real work.
The training service is fuzzed with the token on every endpoint except `run-pipeline` (which would start real runs
of up to 20M orders), and `run-pipeline` without it (a 401, or a 400 for a body the spec refuses): nothing runs.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AUTH, ROOT
from live_services import LiveServices, live_services

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
MAX_EXAMPLES = 40  # per operation and phase: the three runs take about a minute on 2 cores


@pytest.fixture(scope="module")
def live(key_prefix, tmp_path_factory):
    yield from live_services(f"{key_prefix}fuzz:", tmp_path_factory.mktemp("fuzz"))


def schemathesis(spec: str, base: str, out: Path, *args: str) -> tuple[int, str]:
    """`st run` of `spec` against `base`: its exit code and output (also written to `out`)."""
    cmd = [
        str(Path(sys.executable).parent / "st"),
        "run",
        str(ROOT / "config" / spec),
        f"--url={base}",
        f"--checks={CHECKS}",
        "--phases=examples,coverage,fuzzing",
        f"--max-examples={MAX_EXAMPLES}",
        "--seed=10",
        "--workers=2",
        "--request-timeout=20",
        "--generation-database=none",
        "--no-color",
        "--warnings=off",
        f"--report-dir={out.parent}",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=out.parent)
    out.write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def cases_run(output: str) -> int:
    """The number of test cases schemathesis reports having generated."""
    found = re.search(r"Test cases:\s*\n\s*(\d+) generated", output)
    assert found, output[-3000:]
    return int(found.group(1))


@pytest.mark.parametrize(
    "name, spec, service, args",
    [
        (
            "prediction",
            "openapi-service.json",
            "prediction",
            [f"--header=Authorization:{AUTH['Authorization']}"],
        ),
        (
            "training",
            "openapi-training.json",
            "training",
            [f"--header=Authorization:{AUTH['Authorization']}", "--exclude-path-regex=run-pipeline"],
        ),
        (
            "run-pipeline without token",
            "openapi-training.json",
            "training",
            ["--include-path-regex=run-pipeline"],
        ),
    ],
)
def test_no_server_error_and_answers_conform_to_the_spec(
    live: LiveServices, tmp_path, name, spec, service, args
):
    code, output = schemathesis(spec, getattr(live, service).base, tmp_path / "schemathesis.txt", *args)
    summary = output[output.find("SUMMARY") :] if "SUMMARY" in output else output[-3000:]
    assert code == 0, f"{name}: schemathesis found problems:\n{output[-8000:]}"
    assert cases_run(output) > 0, summary
    print(f"{name}: {cases_run(output)} cases\n{summary}")
