"""`make training-service`, `make prediction-service` and `make lab` work where no Redis answers: each starts
the embedded Redis for as long as it runs (as `make run` does), answers, and on SIGTERM stops cleanly and takes
the embedded Redis down after it. "No Redis" is a port where none answers, so the test runs on any machine;
`make lab` runs as this user (as root here, which needs `--allow-root`). `make run` on a small sample prints its
summary and leaves no example order in the live feature store."""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from uuid import uuid4

import pytest
import redis
import requests
from conftest import AUTH, free_port, service_env

from fraud_poc.store.redis_server import redis_answers

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

ROOT = Path(__file__).resolve().parents[1]


def start_make(target: str, env: dict, log: Path, *variables: str) -> subprocess.Popen:
    """`make TARGET VAR=...` in a process group of its own (the test stops the whole group, as Ctrl-C would)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        # pytest started in the background (`cmd &` without job control) ignores Ctrl-C, and an ignored signal stays
        # ignored across exec: make would let it through to its children but not stop itself. A handled one is reset
        # to its default in the child, as a terminal starts a command.
        signal.signal(signal.SIGINT, signal.default_int_handler)
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


def test_make_run_summary_and_no_demo_order_left(tmp_path):
    """`make run` on a small sample: a line per finished step, then the model, its recall per scenario (as in its
    metadata), paths that exist, the docs and `make up`; the example orders were scored but nothing of them stays in
    the live feature store, its order index or its event log."""
    prefix = f"fraudtest:run:{uuid4().hex[:8]}:"
    env = service_env(prefix, tmp_path / "data")
    env.pop("FRAUD_FIND_ORDERS_ENABLED")  # `make run` turns it on for its examples by itself
    training, prediction, demo = free_port(), free_port(), free_port()
    sample = "--num-orders 30000 --num-customers 600 --months 4"
    done = subprocess.run(
        ["make", "--no-print-directory", "run", f"TRAINING_PORT={training}", f"PREDICTION_PORT={prediction}"]
        + [f"RUN_ARGS={sample} --demo-port {demo}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    r = redis.Redis.from_url(env["FRAUD_REDIS_URL"])
    try:
        assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
        steps = ["sample-data", "preprocess", "feature-calc", "training-data", "train-model", "prepare-db"]
        for number, step in enumerate(steps, 1):
            assert re.search(
                rf"^  \[{number}/6\] {step} +done +rows [\d,]+ -> [\d,]+ +[\d.]+ s$", out, re.M
            ), out
        model_id = re.search(r"^model (xgb-\S+): promoted=True", out, re.M).group(1)

        listed = out.split("\nfiles:\n")[1].split("\ndocs")[0].splitlines()  # "  kind  path", then "  path"
        files, kind = {}, None
        for line in listed:
            kind = line[2:11].strip() or kind
            files.setdefault(kind, []).append(Path(line[12:]))
        assert sorted(files) == ["metadata", "model", "report"] and len(files["report"]) >= 3, listed
        assert all(p.is_file() for paths in files.values() for p in paths), listed
        metadata = json.loads(files["metadata"][0].read_text())
        assert metadata["model_id"] == model_id
        shown = dict(
            re.findall(r"^  (\w+) +(\d\.\d{3})  \(", out.split("recall per fraud scenario")[1], re.M)
        )
        expected = {k: f"{v['recall']:.3f}" for k, v in metadata["metrics"]["recall_by_scenario"].items()}
        assert shown == expected and len(shown) >= 4, out
        assert (
            f"http://127.0.0.1:{training}/api/docs/" in out
            and f"http://127.0.0.1:{prediction}/api/docs/" in out
        )
        assert "`make up`" in out
        # one log file per service the launcher started (hopeit's own files are off: console_only), each with
        # its start's header line
        logs = sorted((tmp_path / "data" / "logs").iterdir())
        assert [p.name for p in logs] == ["prediction-demo.log", "prediction.log", "training.log"], logs
        assert all(p.read_text().startswith("=== ") for p in logs)
        # the rows add up: each step reads what the one before wrote (train-model: training-data's rows)
        done_rows = re.findall(r"^  \[\d/6\] (\S+) +done +rows ([\d,]+) -> ([\d,]+)", out, re.M)
        rows_in, rows_out = ({step: r[n] for step, *r in done_rows} for n in (0, 1))
        assert rows_in["train-model"] == rows_out["training-data"], out
        assert rows_in["prepare-db"] == rows_out["feature-calc"], out

        demo_ids = re.findall(r"^  (demo-\S+): amount", out, re.M)
        assert len(demo_ids) == 3, out
        pointer = json.loads(r.get(f"{prefix}live"))
        version = pointer["fs_version"]
        assert not any(r.hexists(f"{prefix}fs:{version}:orders", order_id) for order_id in demo_ids)
        events = r.xrange(f"{prefix}events")
        assert not any(
            order_id.encode() in b"".join(fields.values()) for _, fields in events for order_id in demo_ids
        )
        keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
        assert len(keys) > 100 and not [k for k in keys if b"demo:" in k or b"new-customer" in k]
        known = re.search(r"^  \S+-1: amount.*", out, re.M)
        assert known and "cold_start=False" in known.group(0)  # the first example is a known customer's order
        for key in r.scan_iter(match=f"{prefix}fs:{version}:*", count=1000):
            if r.type(key) == b"string":
                assert b"demo-" not in r.get(key), key
    finally:
        for key in r.scan_iter(match=f"{prefix}*", count=1000):
            r.unlink(key)


@pytest.mark.parametrize("interrupt_after", ["serving until Ctrl-C", "Redis: embedded server started"])
def test_make_up_serves_until_ctrl_c(no_redis, tmp_path, interrupt_after):
    """`make up` where no Redis answers: both services on the given ports, with the embedded Redis, until Ctrl-C
    (SIGINT to the whole group, as a terminal sends it), which stops everything without a traceback, also when it
    comes while the services are still starting."""
    url, env = no_redis
    training, prediction = free_port(), free_port()
    log = tmp_path / "up.log"
    proc = start_make("up", env, log, f"TRAINING_PORT={training}", f"PREDICTION_PORT={prediction}")
    try:
        wait_until(lambda: interrupt_after in log.read_text(), proc, log)
        if interrupt_after == "serving until Ctrl-C":
            for port in (training, prediction):
                assert requests.get(f"http://127.0.0.1:{port}/api/docs/", timeout=5).status_code == 200
            info = requests.get(f"http://127.0.0.1:{prediction}/api/fraud-service/0x2/model-info", timeout=5)
            assert info.status_code == 503 and "no model" in info.json()["error"].lower()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=90)
    text = log.read_text()
    # make reports the interrupt itself ("make: *** [up] Interrupt", killed by SIGINT); the launcher stopped cleanly
    assert proc.returncode == -signal.SIGINT and "\nstopping\n" in text and "Traceback" not in text, text[
        -3000:
    ]
    assert not redis_answers(url)


@pytest.mark.parametrize("target", ["run", "up", "training-service", "prediction-service"])
def test_taken_ports_stop_a_launch_before_it_touches_anything(no_redis, tmp_path, target):
    """Another launch holds the ports (here: this test's listening sockets, on every interface as the services
    listen): the target fails at once, naming each port it needs and the process that holds it, prints no token
    and no docs URL, starts no Redis, and leaves the running services' logs as they were."""
    _, env = no_redis
    logs = Path(env["FRAUD_DATA_ROOT"]) / "logs"
    logs.mkdir(parents=True)
    running = {"training.log": b"=== a running service's lines ===\n", "prediction.log": b"predict 200\n"}
    for name, content in running.items():
        (logs / name).write_bytes(content)
    holders = [socket.create_server(("0.0.0.0", 0)) for _ in range(2)]
    ports = {"training": holders[0].getsockname()[1], "prediction": holders[1].getsockname()[1]}
    try:
        done = subprocess.run(
            ["make", "--no-print-directory", target]
            + [f"TRAINING_PORT={ports['training']}", f"PREDICTION_PORT={ports['prediction']}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )
    finally:
        for holder in holders:
            holder.close()
    said = (done.stdout + done.stderr).decode()
    assert done.returncode != 0, said
    needed = [name for name in ports if target in ("run", "up") or target.startswith(name)]
    for name in needed:
        assert f"port {ports[name]} ({name} service) is taken by pid {os.getpid()}: " in said, said
    assert "nothing was started" in said and "API token" not in said and "/api/docs" not in said, said
    assert {p.name: p.read_bytes() for p in logs.iterdir()} == running
    assert not (Path(env["FRAUD_DATA_ROOT"]) / "redis").exists()
