"""CPU time of one overload refusal in the prediction service's process, today's two ways side by side (issue 22).

Both runs refuse every request (`in_flight.limit` = 0) of an aiohttp app with the service's middlewares
(`http_metrics`, `overload_guard`) and a `predict` route, on uvloop:

- A: aiohttp's own connection protocol: the refusal is `overload_guard`'s (a `Request`, routing, the middleware
  chain, a task, a `Response`);
- B: `GuardedRequestHandler`: the 503's prepared bytes, written as soon as the request's head is parsed.

Two settings, A and B alternating, each figure the CPU time of the process divided by the requests:

- in-process: a transport that keeps nothing (no system calls: the code path alone);
- socket: a client process sends the requests one at a time on one keep-alive loopback connection (the server's
  system calls included).

    .venv/bin/python bench/bench_refusal.py --rounds 10
"""

import argparse
import asyncio
import json
import resource
import socket
import statistics
import sys
import textwrap
import time
from pathlib import Path

import uvloop
from aiohttp import web, web_protocol, web_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fraud_poc.web.overload as guard  # noqa: E402
from fraud_poc.web.http_metrics import install_http_metrics  # noqa: E402

PATH = "/api/fraud-service/0x2/predict"
BODY = json.dumps(
    {
        "order_id": "bench-abc-1",
        "order_date": "2026-12-05T06:00:00+00:00",
        "customer_id": "c-123",
        "email": "someone@example.com",
        "ip_addr": "198.51.100.7",
        "order_amount": 80.25,
        "location_lat": 40.4,
        "location_long": -3.7,
    }
).encode()
REQUEST = (
    f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer xyz\r\n"
    f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
).encode() + BODY
PROTOCOLS = {
    "A (overload_guard)": web_protocol.RequestHandler,
    "B (GuardedRequestHandler)": guard.GuardedRequestHandler,
}
CLIENT = textwrap.dedent(
    """
    import socket, sys
    port, n, request = int(sys.argv[1]), int(sys.argv[2]), bytes.fromhex(sys.argv[3])
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(n):
        s.sendall(request)
        got = b""
        while not got.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, "the server closed the connection"
            got += chunk
        assert got.startswith(b"HTTP/1.1 503"), got[:100]
    """
)


class Sink(asyncio.Transport):
    """A transport that counts the 503s written to it and wakes whoever waits for one."""

    def __init__(self):
        super().__init__()
        self.answers, self.waiter, self.closed = 0, None, False

    def write(self, data):
        if data.startswith(b"HTTP/1.1 503"):
            self.answers += 1
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result(None)

    def writelines(self, chunks):
        self.write(b"".join(chunks))

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_write_buffer_size(self):
        return 0


def cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


async def in_process(server: web_server.Server, protocol_class, n: int) -> float:
    """CPU microseconds per refusal, `n` requests on one connection whose transport keeps nothing."""
    web_server.RequestHandler = protocol_class
    protocol, sink = server(), Sink()
    protocol.connection_made(sink)
    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)
    started = time.process_time()
    for _ in range(n):
        sink.waiter = loop.create_future()
        protocol.data_received(REQUEST)
        if not sink.waiter.done():
            await sink.waiter
    used = time.process_time() - started
    assert sink.answers == n, (sink.answers, n)
    protocol.connection_lost(None)
    return used / n * 1e6


async def over_socket(port: int, protocol_class, n: int) -> float:
    """The server's CPU microseconds per refusal, `n` requests from a client process on one connection."""
    web_server.RequestHandler = protocol_class
    started = cpu_seconds()  # spawning the client costs the server about a millisecond
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), str(n), REQUEST.hex()
    )
    assert await client.wait() == 0
    return (cpu_seconds() - started) / n * 1e6


async def handler(request: web.Request) -> web.Response:
    return web.json_response({"never": "called"})


async def measure(args: argparse.Namespace) -> None:
    app = web.Application(middlewares=[guard.overload_guard])
    app.router.add_post(PATH, handler)
    install_http_metrics(app)  # outermost at startup, as in the service
    guard.guard_connections(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listener).start()
    port = listener.getsockname()[1]
    guard.in_flight.limit = 0  # every request refused
    guard.log.disabled = True  # the rate-limited line: once per 10 s anyway
    for name, measured in (("in-process", None), ("socket", port)):
        used = {label: [] for label in PROTOCOLS}
        for round_ in range(args.rounds + 1):  # the first round warms up
            for label, protocol_class in PROTOCOLS.items():
                if measured is None:
                    figure = await in_process(runner.server, protocol_class, args.requests)
                else:
                    figure = await over_socket(port, protocol_class, args.requests)
                if round_:
                    used[label].append(figure)
        for label, figures in used.items():
            print(
                f"{name:10s} {label:27s} CPU per refusal: median {statistics.median(figures):6.1f} us"
                f" (rounds {min(figures):.1f} to {max(figures):.1f})"
            )
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds per setting (after one to warm up)")
    parser.add_argument("--requests", type=int, default=5000, help="refusals per run")
    uvloop.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
