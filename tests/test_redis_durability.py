"""kill -9 of Redis under load loses at most about a second of acknowledged writes (issue 22): the prediction service
scores ~100 orders/s against the embedded Redis as `fraud_poc.store.redis_server` starts it (append-only file,
`appendfsync everysec`), on a port and data folder of this test's own; Redis is killed with SIGKILL, started again
on the same folder, and every order answered 200 more than a second before the kill is in the order index and in
its customer's state."""

import threading
import time
from pathlib import Path

import pytest
import redis
import requests
from conftest import AUTH, free_port, service_env
from live_services import FS_VERSION, SERVICE_API, ServiceOnPort, make_model_live

from fraud_poc.features.serving_state import decode_state
from fraud_poc.store.redis_server import start_embedded_redis, stop_embedded_redis
from fraud_poc.store.redis_store import Keys

pytestmark = pytest.mark.system  # services in subprocesses (the system tier)

RATE, THREADS = 100.0, 4  # orders per second, over this many client threads
LOAD_SECONDS = 5.0  # scored before the kill
MARGIN = 1.0  # everysec: what may be lost at most, in seconds before the kill


@pytest.fixture(scope="module")
def stack(key_prefix, tmp_path_factory):
    folder = tmp_path_factory.mktemp("durable")
    url = f"redis://127.0.0.1:{free_port()}/0"
    server = {"proc": start_embedded_redis(url, folder / "redis")}
    client = redis.Redis.from_url(url)
    keys = Keys(key_prefix)
    make_model_live(client, keys, orders=1_000)
    env = service_env(key_prefix, folder / "data", redis_url=url)
    (folder / "data").mkdir()
    prediction = ServiceOnPort("prediction", free_port(), env, folder / "prediction.log")
    try:
        prediction.wait_ready()
        yield server, url, folder / "redis", client, keys, prediction
    finally:
        prediction.stop()
        if server["proc"].poll() is None:
            stop_embedded_redis(server["proc"])


def order(n: int) -> dict:
    """A new order of its own customer (email, IP), dated now."""
    return {
        "order_id": f"durable-{n}",
        "order_date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "customer_id": f"durable-c{n}",
        "email": f"durable{n}@example.com",
        "ip_addr": f"durable-ip-{n}",
        "order_amount": 20.0,
        "location_lat": 40.4,
        "location_long": -3.7,
    }


class Load:
    """Sends `RATE` predict requests per second over `THREADS` threads; records (n, status, answered at)."""

    def __init__(self, base: str):
        self.base, self.running, self.answers, self.lock = base, True, [], threading.Lock()
        self.next, self.started = 0, time.monotonic()
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        session = requests.Session()
        while self.running:
            with self.lock:
                n, self.next = self.next, self.next + 1
            due = self.started + n / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                response = session.post(
                    f"{self.base}{SERVICE_API}/predict", json=order(n), headers=AUTH, timeout=30
                )
                status = response.status_code
            except requests.RequestException:
                status = 0
            with self.lock:
                self.answers.append((n, status, time.monotonic()))

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=60)


def test_kill_9_of_redis_under_load_keeps_what_was_answered_a_second_before(stack):
    server, url, redis_dir, client, keys, prediction = stack
    assert client.config_get("appendfsync")["appendfsync"] == "everysec"
    load = Load(prediction.base)
    time.sleep(LOAD_SECONDS)
    server["proc"].kill()  # SIGKILL: no snapshot, no AOF rewrite on the way down
    killed = time.monotonic()
    server["proc"].wait()
    time.sleep(0.5)
    load.stop()
    ok = [(n, at) for n, status, at in load.answers if status == 200]
    before = [n for n, at in ok if at < killed - MARGIN]
    rate = len([1 for _, at in ok if at < killed]) / (killed - load.started)
    print(
        f"{len(ok)} answered 200 ({rate:.0f}/s before the kill), {len(before)} more than {MARGIN} s before it"
    )
    assert len(before) >= 0.5 * RATE * (LOAD_SECONDS - MARGIN), (len(before), rate)  # the load was real

    server["proc"] = start_embedded_redis(url, redis_dir)  # the same folder: the AOF is read back
    client = redis.Redis.from_url(url)
    index = keys.fs_orders(FS_VERSION)
    missing = [n for n in before if not client.hexists(index, f"durable-{n}")]
    assert not missing, f"{len(missing)} of {len(before)} acknowledged orders lost: {missing[:10]}"
    for n in before:
        state = client.get(keys.fs_state(FS_VERSION, "customer_id", f"durable-c{n}"))
        assert state is not None and [r[0] for r in decode_state(state)] == [f"durable-{n}"], n
    kept_after = sum(client.hexists(index, f"durable-{n}") for n, at in ok if at >= killed - MARGIN)
    print(
        f"of the {len(ok) - len(before)} answered in the last {MARGIN} s before the kill, {kept_after} kept"
    )
    # the service scores again against the restarted Redis
    assert requests.post(
        f"{prediction.base}{SERVICE_API}/predict", json=order(10**6), headers=AUTH, timeout=30
    ).ok


def test_data_folder_is_reused(stack):
    """The embedded Redis keeps its files in its folder (`data/redis` under the data root): the AOF and RDB."""
    _, _, redis_dir, client, _, _ = stack
    assert (Path(redis_dir) / "fraud-poc.aof").stat().st_size > 0
    assert Path(client.config_get("dir")["dir"]) == Path(redis_dir).resolve()
