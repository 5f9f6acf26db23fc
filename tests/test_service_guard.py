"""The prediction service as `config/env.sh` configures it by default, over HTTP (issue 22):

- private by default: `predict` and `predict-batch` refuse a call without the token (401); with it they answer
  without the features unless asked (`?features=true`);
- the `Bearer` scheme in any case (RFC 7235);
- a NUL in a header: a 400 in the error schema and no traceback in the log;
- a flood far beyond the process's bound of requests in progress (`service.max_in_flight`): 200s and 503s with
  `Retry-After`, never a 500 or a connection error; `/metrics` answers through it and counts every refusal;
  requests pipelined on one keep-alive connection through it are each answered, in order;
- each worker listens with gunicorn's backlog (2048), not aiohttp's 128.

One prediction service (two workers on one port, as `SERVICES` runs it), a small model live under a key prefix of
its own.
"""

import asyncio
import json
import socket
import subprocess
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from uuid import uuid4

import aiohttp
import pandas as pd
import psutil
import pytest
import redis
import requests
from conftest import API_TOKEN, AUTH, REDIS_URL, ROOT, Service, service_env
from live_services import make_model_live
from prometheus_client.parser import text_string_to_metric_families

from fraud_poc.core.settings import ServiceSettings
from fraud_poc.store.redis_store import Keys
from fraud_poc.web.overload import BUSY, WINDOW_SECONDS

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

SERVICE_API = "/api/fraud-service/0x2"
FLOOD_CONNECTIONS = 8 * ServiceSettings().max_in_flight  # each sends its next request once answered
FLOOD_SECONDS = 5.0


def default_env(key_prefix: str, data_root: Path) -> dict:
    """The test's forced environment without the predict setting, then `config/env.sh`'s defaults."""
    env = service_env(key_prefix, data_root)
    del env["FRAUD_PREDICT_REQUIRES_TOKEN"]
    dumped = subprocess.run(
        ["bash", "-c", ". config/env.sh && env -0"], cwd=ROOT, env=env, capture_output=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in dumped.decode().split("\0") if "=" in line)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("guard")
    key_prefix = f"fraudguard:{uuid4().hex[:12]}:"
    r = redis.Redis.from_url(REDIS_URL)
    history = make_model_live(r, Keys(key_prefix))
    env = default_env(key_prefix, workdir / "data")
    assert env["FRAUD_PREDICT_REQUIRES_TOKEN"] == "true"
    started = Service("prediction", env, workdir / "prediction.log")
    try:
        started.wait_ready()
        yield started, history
    finally:
        started.stop()
        for key in r.scan_iter(match=f"{key_prefix}*", count=1000):
            r.unlink(key)


def an_order(tag: str, n: int = 0) -> dict:
    return {
        "order_id": f"{tag}-{n}",
        "order_date": pd.Timestamp.now(tz="UTC").isoformat(),
        "customer_id": f"{tag}-customer",
        "email": f"{tag}@example.com",
        "ip_addr": "198.51.100.7",
        "order_amount": 30.0,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


def test_predict_needs_the_token_by_default(service):
    prediction, _ = service
    tag = uuid4().hex[:8]
    for endpoint, body in (("predict", an_order(tag)), ("predict-batch", {"orders": [an_order(tag)]})):
        url = f"{prediction.base}{SERVICE_API}/{endpoint}"
        refused = requests.post(url, json=body, timeout=30)
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"].startswith("Bearer") and refused.json()["status"] == 401
    scored = requests.post(
        f"{prediction.base}{SERVICE_API}/predict", json=an_order(tag, 1), headers=AUTH, timeout=30
    )
    assert scored.status_code == 200, scored.text
    # the refused calls appended nothing: the first accepted order of this customer is a cold start
    assert scored.json()["cold_start"] is True


def test_features_only_when_asked(service):
    prediction, _ = service
    tag, url = uuid4().hex[:8], f"{prediction.base}{SERVICE_API}"
    plain = requests.post(f"{url}/predict", json=an_order(tag), headers=AUTH, timeout=30).json()
    assert plain["features"] == {} and plain["top_contributions"], plain
    assert all(c["value"] is None for c in plain["top_contributions"]), plain  # values are features too
    asked = requests.post(f"{url}/predict?features=true", json=an_order(tag), headers=AUTH, timeout=30).json()
    assert asked["fraud_score"] == plain["fraud_score"]  # a retry: the same order, scored the same
    assert asked["features"]["n_orders_by_customer_id"] == 1.0
    assert all(asked["features"][c["feature"]] == c["value"] for c in asked["top_contributions"]), asked
    batch = requests.post(
        f"{url}/predict-batch?features=true", json={"orders": [an_order(tag, 1)]}, headers=AUTH, timeout=30
    ).json()
    assert batch["predictions"][0]["features"]["n_orders_by_customer_id"] == 2.0
    bad = requests.post(f"{url}/predict?features=yes", json=an_order(tag, 2), headers=AUTH, timeout=30)
    assert bad.status_code == 400 and bad.json()["fields"][0]["field"] == "features", bad.text


def test_the_bearer_scheme_in_any_case(service):
    prediction, _ = service
    url = f"{prediction.base}{SERVICE_API}"
    for scheme in ("bearer", "BEARER", "bEaReR"):
        headers = {"Authorization": f"{scheme} {API_TOKEN}"}
        scored = requests.post(f"{url}/predict", json=an_order(uuid4().hex[:8]), headers=headers, timeout=30)
        assert scored.status_code == 200, (scheme, scored.text)
        # report-label always checks the token (and the OpenAPI validator sees the header): past it, a 404
        label = requests.post(
            f"{url}/report-label",
            json={"order_id": "never-scored", "is_fraud": True},
            headers=headers,
            timeout=30,
        )
        assert label.status_code == 404, (scheme, label.text)
        wrong = {"Authorization": f"{scheme} {API_TOKEN[:-1]}"}
        refused = requests.post(
            f"{url}/report-label",
            json={"order_id": "never-scored", "is_fraud": True},
            headers=wrong,
            timeout=30,
        )
        assert refused.status_code == 401, (scheme, refused.text)


def raw_post(path: str, order: dict) -> bytes:
    """A predict request as bytes on the wire (keep-alive, with the token)."""
    body = json.dumps(order).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_nul_in_a_header_is_a_400_without_a_traceback(service):
    prediction, _ = service
    body = json.dumps(an_order(uuid4().hex[:8])).encode()
    answer = raw_request(
        prediction.port,
        f"POST {SERVICE_API}/predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_TOKEN}\r\n".encode()
        + b"X-Note: a\x00b\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body,
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400" and b"application/json" in head, answer[:300]
    assert json.loads(payload)["error"].startswith("bad HTTP request"), payload
    time.sleep(0.5)  # the log line is written
    logged = prediction.log.read_text(errors="replace")
    assert "on a request aiohttp could not parse" in logged  # the one line
    assert "Traceback" not in logged and "Error handling request" not in logged, logged[-3000:]


async def flood(base: str, history: pd.DataFrame) -> tuple[Counter, int, Counter]:
    """`FLOOD_CONNECTIONS` connections sending orders back to back for `FLOOD_SECONDS`, and one sending them three
    at a time pipelined: the answers by kind (status, `503+retry-after`, or the exception's name), how many 503s
    were the overload refusal, and the pipelined requests' answers by status (`raw`: the refusals the connection
    protocol wrote itself, which name no `Server`, of any sender)."""
    answers, busy, pipelined = Counter(), 0, Counter()
    url = f"{base}{SERVICE_API}/predict"
    combos = history[["customer_id", "email", "ip_addr"]].drop_duplicates().to_dict("records")
    run = uuid4().hex[:8]
    deadline = time.monotonic() + FLOOD_SECONDS
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)

    async def sender(session: aiohttp.ClientSession, k: int) -> None:
        nonlocal busy
        n = 0
        while time.monotonic() < deadline:
            n += 1
            order = {**an_order(f"flood-{run}-{k}", n), **combos[(k + n) % len(combos)]}
            try:
                async with session.post(url, json=order, headers=AUTH) as response:
                    text = await response.text()
                    kind = response.status
                    if kind == 503 and "Retry-After" in response.headers:
                        kind = "503+retry-after"
                        busy += json.loads(text)["error"] == BUSY
                        pipelined["raw"] += "Server" not in response.headers  # the protocol's prepared bytes
                    answers[kind] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                answers[type(e).__name__] += 1

    async def pipeliner() -> None:
        """Three requests at a time on one keep-alive connection, written at once: each answer is its own
        request's (a 200 names its order), 503s included, and the connection stays in sync after them."""
        nonlocal busy
        reader, writer = await asyncio.open_connection("127.0.0.1", urllib.parse.urlsplit(base).port)
        n = 0
        while time.monotonic() < deadline:
            orders = [{**an_order(f"pipe-{run}", n + i), **combos[(n + i) % len(combos)]} for i in range(3)]
            n += 3
            writer.write(b"".join(raw_post(SERVICE_API + "/predict", order) for order in orders))
            for order in orders:
                head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
                length = int(head.split("content-length: ", 1)[1].split("\r\n", 1)[0])
                body = json.loads(await reader.readexactly(length))
                status = int(head.split(" ", 2)[1])
                if status == 200:
                    assert body["order_id"] == order["order_id"], (order["order_id"], body)
                    answers[200] += 1
                else:
                    assert status == 503 and "\r\nretry-after: 1\r\n" in head, head
                    answers["503+retry-after"] += 1
                    busy += body["error"] == BUSY
                pipelined[status] += 1
        writer.close()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(pipeliner(), *[sender(session, k) for k in range(FLOOD_CONNECTIONS)])
    return answers, busy, pipelined


def counted(base: str) -> dict[tuple[str, tuple], float]:
    """The service's `/metrics`, parsed by Prometheus' parser: (name, sorted labels) -> value."""
    page = requests.get(f"{base}/metrics", timeout=30)
    assert page.status_code == 200, page.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page.text)
        for s in family.samples
    }


async def flood_and_scrape(base: str, history: pd.DataFrame) -> tuple[tuple[Counter, int, Counter], int]:
    """`flood`, and the status of a `/metrics` scrape in the middle of it."""

    async def scrape() -> int:
        await asyncio.sleep(FLOOD_SECONDS / 2)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(f"{base}/metrics") as response:
                await response.read()
                return response.status

    return await asyncio.gather(flood(base, history), scrape())


def test_a_flood_far_beyond_the_bound_gets_200s_and_503s_with_retry_after(service):
    prediction, history = service
    before = counted(prediction.base)
    (answers, busy, pipelined), scraped = asyncio.run(flood_and_scrape(prediction.base, history))
    assert set(answers) <= {200, "503+retry-after"}, answers  # no 500, no other 503, no connection error
    assert answers[200] > 0 and answers["503+retry-after"] > 0 and busy == answers["503+retry-after"], answers
    assert scraped == 200  # /metrics is never refused
    assert pipelined[503] > 0, pipelined  # refusals in a pipeline, each answer its own request's (pipeliner)
    assert pipelined["raw"] > 0, (
        pipelined
    )  # refused as soon as parsed (GuardedRequestHandler), in the service
    after = counted(prediction.base)
    moved = {
        key: after.get(key, 0.0) - before.get(key, 0.0)
        for key in (
            ("fraud_overload_refusals_total", ()),
            ("fraud_http_requests_total", (("event", "predict"), ("status", "503"))),
            ("fraud_http_requests_total", (("event", "predict"), ("status", "200"))),
            ("fraud_prediction_score_count", (("event", "predict"),)),
        )
    }
    assert list(moved.values()) == [busy, busy, answers[200], answers[200]], (moved, answers)
    after = requests.post(
        f"{prediction.base}{SERVICE_API}/predict", json=an_order(uuid4().hex[:8]), headers=AUTH, timeout=30
    )
    assert after.status_code == 200, after.text  # the flood over, the service serves again
    assert "overload:" in prediction.log.read_text(errors="replace")  # the refusals were logged, in short


def listens(worker: psutil.Process, port: int) -> bool:
    return any(c.laddr.port == port and c.status == "LISTEN" for c in worker.net_connections("tcp"))


def test_two_workers_share_a_burst_of_connections(service):
    """The service runs two workers on one port (`SERVICES`); a burst of keep-alive connections, as a load balancer's
    pool opens them, is spread over both (before, the first worker to wake took nearly all)."""
    prediction, _ = service
    workers = psutil.Process(prediction.proc.pid).children()
    assert len(workers) == 2, workers
    deadline = (
        time.monotonic() + 60
    )  # each listens once its app is loaded (the service answers when one does)
    while not all(listens(w, prediction.port) for w in workers):
        assert time.monotonic() < deadline, "a worker never listened"
        time.sleep(0.2)
    body = json.dumps(an_order(uuid4().hex[:8])).encode()
    request = (
        f"POST {SERVICE_API}/predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    # a flood may have ended just now (the test before): a worker gives its whole bound back once it has refused
    # nothing for `WINDOW_SECONDS`
    time.sleep(3 * WINDOW_SECONDS)
    burst = [socket.create_connection(("127.0.0.1", prediction.port), timeout=30) for _ in range(32)]
    try:
        for s in burst:  # then a request on each, kept open after its answer (the same order: retries)
            s.sendall(request)
        for s in burst:
            assert s.recv(65536).startswith(b"HTTP/1.1 200"), "a request was not answered 200"
        held = [
            sum(
                c.laddr.port == prediction.port and c.status == "ESTABLISHED"
                for c in w.net_connections("tcp")
            )
            for w in workers
        ]
    finally:
        for s in burst:
            s.close()
    assert sum(held) == 32 and min(held) >= 4, (
        held
    )  # 32 draws of a fair coin: fewer than 4 is a 1-in-10^5 event


def test_each_worker_listens_with_gunicorns_backlog(service):
    """aiohttp's sites listen with a backlog of 128 unless told: under overload the queue of connections not yet
    accepted filled, and a client whose handshake the kernel dropped retried only a second later."""
    prediction, _ = service
    workers = psutil.Process(prediction.proc.pid).children()
    deadline = time.monotonic() + 60
    while not all(listens(w, prediction.port) for w in workers):
        assert time.monotonic() < deadline, "a worker never listened"
        time.sleep(0.2)
    listed = subprocess.run(
        ["ss", "-Hltn", f"sport = :{prediction.port}"], capture_output=True, text=True, check=True
    ).stdout
    assert [int(line.split()[2]) for line in listed.splitlines()] == [2048, 2048], (
        listed
    )  # Send-Q: the backlog
