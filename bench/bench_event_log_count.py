"""What the append script's count of logged events costs Redis: the script as it is against the same script without
its `INCR <events>:added` (the count a promotion needs to say exactly how many events a trimmed log lost, on Redis
6.2 which counts no `entries-added`), side by side in one run.

Each round runs `--calls` append calls per variant (new orders of 500 customers, 700 emails, 50 IPs, event log on)
under a key prefix of its own (removed after), variants taking turns so a noisy neighbour hits both alike; printed:
Redis CPU (`INFO cpu`, user + sys) per call for each round and the median.

    . config/env.sh && .venv/bin/python bench/bench_event_log_count.py
"""

import argparse

import redis
from report import recorded

from fraud_poc.core.schema import FeatureSpec
from fraud_poc.store.redis_store import Keys, redis_url_from_env
from fraud_poc.store.store_scripts import APPEND_SCRIPT, script_args, script_keys

COUNT = "  redis.call('INCR', KEYS[12] .. ':added')"


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def run(r: redis.Redis, script: str, prefix: str, calls: int) -> float:
    """Redis CPU microseconds per append call of `script`."""
    keys, append, spec = Keys(prefix), r.register_script(script), FeatureSpec()
    start = redis_cpu(r)
    pipe = r.pipeline(transaction=False)
    for i in range(calls):
        t = 1_700_000_000_000_000 + i * 1_000_000
        record = (f"o{i}", t, f"c{i % 500}", f"e{i % 700}@x.io", f"10.0.{i % 50}.1", 10.0 + i % 90)
        args = script_args(b"", spec, record, (1.0, 2.0), 1_000_000)
        append(keys=script_keys(keys, "v1", record), args=args, client=pipe)
        if i % 500 == 499:
            pipe.execute()
    pipe.execute()
    used = (redis_cpu(r) - start) / calls * 1e6
    for key in r.scan_iter(match=f"{prefix}*", count=1000):
        r.unlink(key)
    return used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    assert COUNT in APPEND_SCRIPT, "the append script no longer counts events this way"
    variants = {"with count": APPEND_SCRIPT, "without count": APPEND_SCRIPT.replace(COUNT, "  -- no count")}
    r = redis.Redis.from_url(redis_url_from_env())
    print(f"Redis {r.info('server')['redis_version']}, {args.calls} append calls per variant and round")
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, script in variants.items():
            results[name].append(
                run(r, script, f"bench-count:{round_}:{len(results[name])}:{name[:4]}:", args.calls)
            )
    for name, values in results.items():
        median = sorted(values)[len(values) // 2]
        print(f"{name:>14}: Redis CPU per call {[round(v, 1) for v in values]} µs, median {median:.1f} µs")


if __name__ == "__main__":
    with recorded("bench_event_log_count"):
        main()
