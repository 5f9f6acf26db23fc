"""Hostile input against both services over HTTP (issue 10, items 5-9): the poison order, orders from the far
future, bad files for run-from-raw, and one error schema for every refusal, with nothing written to Redis."""

import hashlib
import json
import os
import socket
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from conftest import AUTH
from live_services import FS_VERSION, SERVICE_API, TRAINING_API, LiveServices, live_services

from fraud_poc.core.schema import WINDOW
from fraud_poc.store.carry_over import marks_key
from fraud_poc.store.health_log import scores_key

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)


@pytest.fixture(scope="module")
def live(key_prefix, tmp_path_factory):
    yield from live_services(f"{key_prefix}bounds:", tmp_path_factory.mktemp("bounds"))


def snapshot(live: LiveServices) -> dict[bytes, str]:
    """Every key of the services under the test prefix, with a digest of its value, but the two keys of the training
    service's log upkeep, which it writes once a minute whatever the requests (`carry_over.keep_log`), and the score
    log, which the prediction service writes 0.2 s after the orders it scored (a refused order is never scored)."""
    upkeep = {
        marks_key(live.keys).encode(),
        f"{live.keys.events}:marked".encode(),
        scores_key(live.keys).encode(),
    }
    keys = set(live.redis.scan_iter(match=f"{live.keys.prefix}*", count=1000)) - upkeep
    return {key: hashlib.sha256(live.redis.dump(key) or b"").hexdigest() for key in keys}


def now_iso(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def order(tag: str, **changes) -> dict:
    """A valid order of entities no other test uses, dated now."""
    return {
        "order_id": f"{tag}-o1",
        "order_date": now_iso(),
        "customer_id": f"{tag}-c",
        "email": f"{tag}@example.com",
        "ip_addr": f"{tag}-ip",
        "order_amount": 25.0,
        "location_lat": 40.4,
        "location_long": -3.7,
        **changes,
    }


def in_error_schema(response: requests.Response) -> dict:
    """The answer's JSON, checked to be exactly the error schema, with the HTTP status and no traceback."""
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    answer = response.json()
    assert set(answer) == {"status", "error", "fields"} and answer["status"] == response.status_code, answer
    assert all(set(f) == {"field", "message"} for f in answer["fields"]), answer
    assert "Traceback" not in response.text and 'File "' not in response.text, answer
    return answer


def post_raw(url: str, body: bytes, headers: dict | None = None) -> requests.Response:
    headers = {"Content-Type": "application/json", **(headers or {})}
    return requests.post(url, data=body, headers=headers, timeout=30)


POISON_AMOUNTS = [
    b"1e39",
    b"3.5e38",
    b"1e300",
    b"1e400",
    b"-1e400",
    b"NaN",
    b"Infinity",
    b"1000000000.5",
    b"-0.01",
]


def test_poison_order_is_refused_and_nothing_is_written(live: LiveServices):
    """An amount beyond 1e9 (above float32's range, infinite, NaN) is a 400 naming order_amount, alone or in a
    batch, and leaves every key of the feature store and the event log as it was."""
    before = snapshot(live)
    url = f"{live.prediction.base}{SERVICE_API}"
    victim = live.orders.iloc[-1]
    for amount in POISON_AMOUNTS:
        poison = order(
            "poison", customer_id=victim["customer_id"], email=victim["email"], ip_addr=victim["ip_addr"]
        )
        body = (
            json.dumps(poison).replace('"order_amount": 25.0', '"order_amount": ' + amount.decode()).encode()
        )
        assert amount in body
        answer = in_error_schema(post_raw(f"{url}/predict", body))
        assert answer["status"] == 400 and answer["fields"][0]["field"] == "order_amount", (amount, answer)
        batch = b'{"orders": [' + json.dumps(order("fine")).encode() + b", " + body + b"]}"
        answer = in_error_schema(post_raw(f"{url}/predict-batch", batch))
        assert [f["field"] for f in answer["fields"]] == ["orders[1].order_amount"], (amount, answer)
    assert snapshot(live) == before
    # the victim is still scored, from finite features
    scored = requests.post(
        f"{url}/predict?features=true",
        json=order(
            "after", customer_id=victim["customer_id"], email=victim["email"], ip_addr=victim["ip_addr"]
        ),
        timeout=30,
    )
    assert scored.status_code == 200, scored.text
    assert all(abs(value) < 3.4e38 for value in scored.json()["features"].values())


BAD_IDS = [  # (field, value, what the message says): `schema.id_problem`, the rule preprocess applies too
    ("order_id", "   ", "blank"),
    ("customer_id", "\u3000\t", "blank"),
    ("email", "", "at least 1 character"),
    ("ip_addr", "10.0.0.1\u0000", "a control character"),
    ("customer_id", "c\nd", "a control character"),
    ("order_id", "o" * 257, "at most 256 characters"),
]


def test_blank_or_control_ids_are_refused_and_nothing_is_written(live: LiveServices):
    """A blank id (or one with a control character, or too long) is a 400 naming the field, alone or in a batch,
    with nothing written: preprocess would refuse it in an export, and every later run-from-raw with it."""
    before = snapshot(live)
    url = f"{live.prediction.base}{SERVICE_API}"
    for field, value, why in BAD_IDS:
        answer = in_error_schema(
            requests.post(f"{url}/predict", json=order("blank", **{field: value}), timeout=30)
        )
        assert answer["status"] == 400 and [f["field"] for f in answer["fields"]] == [field], (value, answer)
        assert why in answer["error"], (value, answer)
        batch = {"orders": [order("fine"), order("blank", **{field: value})]}
        answer = in_error_schema(requests.post(f"{url}/predict-batch", json=batch, timeout=30))
        assert [f["field"] for f in answer["fields"]] == [f"orders[1].{field}"], (value, answer)
    assert snapshot(live) == before


def test_an_order_id_known_with_another_customer_is_refused(live: LiveServices):
    """Order X for customer A, then X for customer B (or A's order with another email or IP): 409, nothing written,
    alone or in a batch; X for A again stays a retry (200, nothing written); a label for X changes A's states
    only, and B has none."""
    url = f"{live.prediction.base}{SERVICE_API}"
    first = order("reuse")
    assert requests.post(f"{url}/predict", json=first, timeout=30).status_code == 200
    before = snapshot(live)
    events = live.redis.xlen(live.keys.events)
    thief = {"customer_id": "reuse-thief", "email": "thief@example.com", "ip_addr": "reuse-thief-ip"}
    for field, value in thief.items():
        clash = {**first, field: value}
        answer = in_error_schema(requests.post(f"{url}/predict", json=clash, timeout=30))
        assert answer["status"] == 409 and [f["field"] for f in answer["fields"]] == ["order_id"], answer
        assert "another customer_id, email or ip_addr" in answer["error"], answer
        # in a batch: refused as a whole, the clashing order named, the new order before it not written either
        batch = {"orders": [order("reuse-new"), clash]}
        answer = in_error_schema(requests.post(f"{url}/predict-batch", json=batch, timeout=30))
        assert answer["status"] == 409 and [f["field"] for f in answer["fields"]] == ["orders[1].order_id"], (
            answer
        )
    # one new id twice in a batch for two customers: refused before either is written
    twice = {"orders": [order("twice"), order("twice", customer_id="twice-other")]}
    answer = in_error_schema(requests.post(f"{url}/predict-batch", json=twice, timeout=30))
    assert answer["status"] == 409 and [f["field"] for f in answer["fields"]] == ["orders[1].order_id"], (
        answer
    )
    # an order of the history prepare-db's writer loaded (its index entry written by Python, not the script)
    known = live.orders.iloc[-1]
    taken = order("reuse-history", order_id=known["order_id"], order_date=known["order_date"].isoformat())
    answer = in_error_schema(requests.post(f"{url}/predict", json=taken, timeout=30))
    assert answer["status"] == 409 and [f["field"] for f in answer["fields"]] == ["order_id"], answer
    assert snapshot(live) == before
    same = {**taken, **{e: known[e] for e in ("customer_id", "email", "ip_addr")}}
    assert (
        requests.post(f"{url}/predict", json=same, timeout=30).status_code == 200
    )  # its own entities: a retry
    retry = requests.post(f"{url}/predict", json=first, timeout=30)  # the same order: a retry
    assert retry.status_code == 200, retry.text
    retried = requests.post(f"{url}/predict-batch", json={"orders": [first, first]}, timeout=30)
    assert retried.status_code == 200, retried.text
    assert snapshot(live) == before and live.redis.xlen(live.keys.events) == events
    label = {"order_id": first["order_id"], "is_fraud": True}
    labelled = requests.post(f"{url}/report-label", json=label, headers=AUTH, timeout=30)
    assert labelled.status_code == 200 and labelled.json()["states_changed"] == 3, labelled.text
    for entity, value in thief.items():
        assert not live.redis.exists(live.keys.fs_state(FS_VERSION, entity, value)), entity
        assert not live.redis.exists(live.keys.fs_tiles(FS_VERSION, entity, value)), entity


def test_far_future_orders_cannot_push_a_customer_out_of_the_window(live: LiveServices):
    """Ten orders of a known customer dated years (or a month) ahead are refused and change nothing; the
    customer's next real order still sees its history."""
    customer = live.orders["customer_id"].value_counts().index[0]
    history = int((live.orders["customer_id"] == customer).sum())
    url = f"{live.prediction.base}{SERVICE_API}"
    before = snapshot(live)
    for n, when in enumerate(
        ["2199-01-01T00:00:00Z", "2100-06-01T00:00:00Z", now_iso(days=30), now_iso(days=1.1)] * 3
    ):
        if n == 10:
            break
        attack = order(f"future{n}", customer_id=customer, order_date=when)
        answer = in_error_schema(requests.post(f"{url}/predict", json=attack, timeout=30))
        assert answer["status"] == 400 and answer["fields"][0]["field"] == "order_date", answer
    batch = {
        "orders": [
            order(f"future-b{n}", customer_id=customer, order_date=now_iso(days=400)) for n in range(10)
        ]
    }
    answer = in_error_schema(requests.post(f"{url}/predict-batch", json=batch, timeout=30))
    assert [f["field"] for f in answer["fields"]] == [f"orders[{n}].order_date" for n in range(10)]
    old = order("ancient", customer_id=customer, order_date="1990-01-01T00:00:00Z")
    assert in_error_schema(requests.post(f"{url}/predict", json=old, timeout=30))["status"] == 400
    assert snapshot(live) == before
    scored = requests.post(
        f"{url}/predict?features=true", json=order("real", customer_id=customer), timeout=30
    )
    assert scored.status_code == 200, scored.text
    prediction = scored.json()
    assert prediction["known_entities"]["customer_id"] is True
    assert prediction["features"]["n_orders_by_customer_id"] == min(WINDOW, history + 1)


def test_label_dates_outside_the_window_are_refused(live: LiveServices):
    """report-label: a label from the future or older than service.max_days_back is a 400 naming label_date."""
    url = f"{live.prediction.base}{SERVICE_API}"
    known = live.orders.iloc[-1]["order_id"]
    for label_date in (now_iso(minutes=5), "2000-01-01T00:00:00Z"):
        body = {"order_id": known, "is_fraud": True, "label_date": label_date}
        answer = in_error_schema(requests.post(f"{url}/report-label", json=body, headers=AUTH, timeout=30))
        assert answer["status"] == 400 and answer["fields"][0]["field"] == "label_date", answer


def long_request_line(port: int, length: int) -> bytes:
    """The raw answer to a GET whose path is `length` bytes (beyond what any client library sends as is)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /" + b"x" * length + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_every_refusal_of_both_services_is_in_the_error_schema(live: LiveServices):
    """Malformed and deeply nested JSON, an overlong path or header, a bad tracking header, bad query arguments,
    unknown paths and methods, a too-large body: a 4xx in the error schema, never a 5xx or a traceback."""
    service, training = f"{live.prediction.base}{SERVICE_API}", f"{live.training.base}{TRAINING_API}"
    nested = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"a": ' * 5_000 + b"1" + b"}" * 5_000
    cases = [
        ("malformed", lambda: post_raw(f"{service}/predict", b'{"order_id": '), 400),
        ("malformed training", lambda: post_raw(f"{training}/run-pipeline", b'{"seed": ', AUTH), 400),
        ("nested", lambda: post_raw(f"{service}/predict", nested), 400),
        ("nested batch", lambda: post_raw(f"{service}/predict-batch", deep_object), 400),
        ("nested training", lambda: post_raw(f"{training}/run-pipeline", deep_object, AUTH), 400),
        ("nested label", lambda: post_raw(f"{service}/report-label", nested, AUTH), 400),
        ("long path", lambda: requests.get(f"{service}/model-info" + "x" * 6000, timeout=30), 404),
        ("track header", lambda: post_raw(f"{service}/predict", b"{}", {"X-Track-Request-Ts": "abc"}), 400),
        (
            "track header training",
            lambda: requests.get(f"{training}/list-runs", headers={"X-Track-Request-Ts": "x"}, timeout=30),
            400,
        ),
        (
            "num_items=abc",
            lambda: requests.get(f"{service}/find-orders?num_items=abc", headers=AUTH, timeout=30),
            400,
        ),
        ("limit=abc", lambda: requests.get(f"{training}/list-runs?limit=abc", timeout=30), 400),
        ("unknown run", lambda: requests.get(f"{training}/pipeline-status?run_id=nope", timeout=30), 404),
        (
            "long run id",
            lambda: requests.get(f"{training}/pipeline-status?run_id={'r' * 500}", timeout=30),
            400,
        ),
        ("unknown path", lambda: requests.get(f"{service}/nothing", timeout=30), 404),
        ("unknown path training", lambda: requests.get(f"{training}/nothing", timeout=30), 404),
        ("method", lambda: requests.delete(f"{service}/predict", timeout=30), 405),
        ("too large", lambda: post_raw(f"{service}/predict", b"x" * (2 << 20)), 413),
        ("no token", lambda: post_raw(f"{training}/run-pipeline", b"{}"), 401),
        (
            "long raw path",
            lambda: post_raw(f"{training}/run-from-raw", b'{"path": "' + b"0" * 1000 + b'"}', AUTH),
            400,
        ),
        *[
            (f"{event}?x=1", lambda event=event: post_raw(f"{training}/{event}?x=1", b"{}", AUTH), 400)
            for event in ("run-pipeline", "run-from-raw", "promote-model", "rollback", "clean-runs")
        ],
        (
            "pipeline-status&x=1",
            lambda: requests.get(f"{training}/pipeline-status?run_id=a&x=1", timeout=30),
            400,
        ),
        ("list-runs?x=1", lambda: requests.get(f"{training}/list-runs?x=1", timeout=30), 400),
    ]
    for name, call, status in cases:
        response = call()
        assert response.status_code == status, (name, response.status_code, response.text[:500])
        in_error_schema(response)
    for base in (live.prediction.base, live.training.base):
        port = int(base.rsplit(":", 1)[1])
        raw = long_request_line(port, 20_000)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"400" and b"application/json" in head, raw[:300]
        assert json.loads(body)["error"].startswith("bad HTTP request: the request line"), body
        big_header = requests.get(
            f"{base}/api/docs/swagger.json", headers={"X-Big": "x" * 10_000}, timeout=30
        )
        assert big_header.status_code == 400 and in_error_schema(big_header)["status"] == 400


def run_from_raw(live: LiveServices, path: str) -> requests.Response:
    return requests.post(
        f"{live.training.base}{TRAINING_API}/run-from-raw", json={"path": path}, headers=AUTH, timeout=30
    )


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    path.write_text(
        "\n".join([",".join(columns), *(",".join(str(r[c]) for c in columns) for r in rows)]) + "\n"
    )


def test_run_from_raw_refuses_what_cannot_be_read_as_orders(live: LiveServices):
    """The data root itself, a FIFO named *.csv, a file over the size limit, a missing column, an empty file:
    a 400 naming `path` at once (the FIFO never blocks), and no run is registered."""
    user = live.data_root / "user"
    os.mkfifo(user / "pipe.csv")
    (live.data_root / "pipes").mkdir()
    os.mkfifo(live.data_root / "pipes" / "orders.csv")
    with open(user / "sparse.csv", "wb") as f:
        f.truncate(600 * 2**20)  # over input_limits.max_file_mb (512), and takes no disk
    rows = [order(f"raw{n}") | {"is_fraud": "false"} for n in range(3)]
    write_csv(user / "no_amount.csv", [{k: v for k, v in r.items() if k != "order_amount"} for r in rows])
    (user / "empty.csv").write_text("")
    runs_before = live.redis.zcard(live.keys.runs)
    for path, problem in [
        ("", "at least 1 character"),
        (".", "the data root itself"),
        ("user/..", "the data root itself"),
        ("../outside.csv", "outside the data root"),
        ("user/pipe.csv", "not a regular file"),
        ("user/sparse.csv", "600.0 MB, more than the 512 MB allowed per file"),
        ("user/no_amount.csv", "column 'order_amount': missing"),
        ("user/empty.csv", "empty"),
        ("pipes", "path 'pipes/orders.csv': not a regular file"),  # a folder of a FIFO
    ]:
        started = time.monotonic()
        answer = in_error_schema(run_from_raw(live, path))
        assert answer["status"] == 400 and answer["fields"][0]["field"] == "path", (path, answer)
        assert problem in answer["error"], (path, answer)
        assert time.monotonic() - started < 10, path  # refused, not read
    assert live.redis.zcard(live.keys.runs) == runs_before


def test_a_csv_of_megabyte_ids_fails_its_run_naming_the_column(live: LiveServices):
    """16 MB of orders whose ids are 1 MB each: the run fails in preprocess with the column and the bound named
    (an InvalidOrdersError: it cannot succeed on a retry), nothing goes live; before, such a file exhausted the
    workers' memory four times."""
    huge = [  # dated over 150 days: enough for the periods, which run-from-raw checks before a run starts
        order(f"huge{n}", customer_id=f"c{n}" + "x" * 2**20, order_date=now_iso(days=-10 * n))
        | {"is_fraud": "false"}
        for n in range(16)
    ]
    write_csv(live.data_root / "user" / "huge_ids.csv", huge)
    assert (live.data_root / "user" / "huge_ids.csv").stat().st_size > 16 * 2**20
    live_before = live.redis.get(live.keys.live)
    response = run_from_raw(live, "user/huge_ids.csv")
    assert response.status_code == 200, response.text  # its header is fine: the rows are read on a worker
    run_id = response.json()["run_id"]
    deadline, status = time.monotonic() + 180, {}
    while time.monotonic() < deadline:
        status = requests.get(
            f"{live.training.base}{TRAINING_API}/pipeline-status?run_id={run_id}", timeout=30
        ).json()
        if status["state"] == "failed":
            break
        time.sleep(1)
    assert status["state"] == "failed", status
    error = status["steps"][1]["error"]
    assert (
        "user/huge_ids.csv: column 'customer_id': 16 invalid value(s)" in error
        and "longer than 256 characters" in error
    ), error
    assert live.redis.get(live.keys.live) == live_before


def test_the_docs_examples_are_working_requests(live: LiveServices):
    """What the docs' "Fill example" sends for predict and predict-batch (each field's example in the spec) is
    scored (a cold start), dated near now as the service requires."""
    spec = json.loads((Path(__file__).resolve().parents[1] / "config" / "openapi-service.json").read_text())
    properties = spec["components"]["schemas"]["Order"]["properties"]
    example = {name: schema["example"] for name, schema in properties.items()}
    assert set(example) == set(order("x")), example
    example["order_id"] = f"example-{time.time_ns()}"  # a fresh id: a repeat would be scored, not stored
    url = f"{live.prediction.base}{SERVICE_API}"
    response = requests.post(f"{url}/predict", json=example, timeout=30)
    assert response.status_code == 200 and response.json()["order_id"] == example["order_id"], response.text
    response = requests.post(f"{url}/predict-batch", json={"orders": [example]}, timeout=30)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 1, response.text


def test_each_service_has_a_gunicorn_control_socket_of_its_own(live: LiveServices):
    """gunicorn's control socket (for `gunicornc`) defaults to one path per user, `~/.gunicorn/gunicorn.ctl`, which
    the second service took over from the first; each service now has its own, under `<data root>/run/`."""
    folders = [
        live.data_root.resolve() / "run" / f"{name}-{port}"
        for name, port in (("training", live.training.port), ("prediction", live.prediction.port))
    ]
    for folder in folders:
        path = folder / "gunicorn.ctl"
        assert path.exists() and stat.S_ISSOCK(path.stat().st_mode), path
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # a live server answers on each
