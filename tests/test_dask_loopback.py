"""The local Dask cluster listens on loopback only: no socket of the scheduler, its workers, nannies or dashboard
is reachable on another address of this machine."""

import socket

import psutil
import pytest

from fraud_poc.core.settings import DaskSettings
from fraud_poc.pipeline.dask_client import close_dask_client, dask_client


def listening(processes: list[psutil.Process]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of `processes`."""
    found = []
    for process in processes:
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((process.pid, conn.laddr.ip, conn.laddr.port))
    return found


def other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    ]


def reachable(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((ip, port)) == 0


@pytest.fixture(scope="module")
def local_cluster():
    before = {(pid, ip, port) for pid, ip, port in listening([psutil.Process()])}
    client = dask_client(DaskSettings(n_workers=1, threads_per_worker=1, memory_limit="1GiB"))
    try:
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        yield client, [s for s in listening(processes) if s not in before]
    finally:
        close_dask_client()


def test_local_cluster_listens_on_loopback_only(local_cluster):
    client, sockets = local_cluster
    ports = {port for _, _, port in sockets}
    scheduler_port = int(client.scheduler.address.rsplit(":", 1)[1])
    dashboard_port = int(client.dashboard_link.split(":")[2].split("/")[0])
    assert {scheduler_port, dashboard_port} <= ports, (
        client.scheduler.address,
        client.dashboard_link,
        sockets,
    )
    assert len(sockets) >= 4  # scheduler, dashboard, nanny, worker
    assert [s for s in sockets if not s[1].startswith("127.")] == []


def test_local_cluster_is_not_reachable_from_other_addresses(local_cluster):
    client, sockets = local_cluster
    addresses = other_addresses()
    if not addresses:
        pytest.skip("this machine has no address but loopback")
    assert all(reachable("127.0.0.1", port) for _, _, port in sockets)
    assert [(ip, port) for ip in addresses for _, _, port in sockets if reachable(ip, port)] == []
