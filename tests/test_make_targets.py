"""`make training-service`, `make prediction-service` and `make lab` work where no Redis answers: each starts
the embedded Redis for as long as it runs (as `make run` does), answers, and on SIGTERM stops cleanly and takes
the embedded Redis down after it. "No Redis" is a port where none answers, so the test runs on any machine;
`make lab` runs as this user (as root here, which needs `--allow-root`)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
from conftest import AUTH, free_port, service_env

from fraud_poc.redis_server import redis_answers

ROOT = Path(__file__).resolve().parents[1]


def start_make(target: str, env: dict, log: Path, *variables: str) -> subprocess.Popen:
    """`make TARGET VAR=...` in a process group of its own (the test stops the whole group, as Ctrl-C would)."""
    return subprocess.Popen(
        ["make", "--no-print-directory", target, *variables],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_until(check, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"make exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            if check():
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(log.read_text()[-3000:])


def stop_group(proc: subprocess.Popen, redis_url: str) -> None:
    """SIGTERM to the group; then the embedded Redis must be gone too."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    while redis_answers(redis_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not redis_answers(redis_url), "the embedded Redis outlived the command that started it"


@pytest.fixture
def no_redis(tmp_path) -> tuple[str, dict]:
    """A Redis URL where nothing answers, and a service environment that uses it."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    return url, service_env("fraudtest:make:", tmp_path / "data", redis_url=url)


@pytest.mark.parametrize(
    "target, port_variable, path, expected",
    [
        ("training-service", "TRAINING_PORT", "/api/training-pipeline/0x2/list-runs", 200),
        ("prediction-service", "PREDICTION_PORT", "/api/fraud-service/0x2/model-info", 503),
    ],
)
def test_service_targets_ensure_redis(no_redis, tmp_path, target, port_variable, path, expected):
    url, env = no_redis
    port, log = free_port(), tmp_path / f"{target}.log"
    proc = start_make(target, env, log, f"{port_variable}={port}")
    try:
        wait_until(
            lambda: requests.get(f"http://127.0.0.1:{port}/api/docs/swagger.json", timeout=2).ok, proc, log
        )
        assert redis_answers(url)
        response = requests.get(f"http://127.0.0.1:{port}{path}", headers=AUTH, timeout=10)
        assert response.status_code == expected, response.text
        if expected == 503:  # it reached Redis: there is just no model yet
            assert "no model" in response.json()["error"].lower(), response.text
        assert "started the embedded one" in log.read_text()
    finally:
        stop_group(proc, url)


def test_lab_ensures_redis_and_runs_as_root(no_redis, tmp_path):
    url, env = no_redis
    port, log, token = free_port(), tmp_path / "lab.log", "lab-test-token"
    proc = start_make(
        "lab",
        {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter")},
        log,
        f"LAB_PORT={port}",
        f"LAB_ARGS=--no-browser --ServerApp.token={token}",
    )
    try:
        wait_until(
            lambda: requests.get(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2).ok, proc, log
        )
        assert redis_answers(url)
    finally:
        stop_group(proc, url)
