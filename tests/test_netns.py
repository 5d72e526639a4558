"""The test network of ``tests/netns.py`` itself: hosts reach each other (and the operator reaches them) over the
bridge, a partition cuts one host off until it is healed, ``tbf`` limits a link's rate, and nothing is left behind,
not even by a crashed session. Marked ``netns`` (root; run by ``.ci/run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import netns
import pytest

pytestmark = pytest.mark.netns

PORT = 9000
PAYLOAD = 256 * 1024
SINK = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
while True:
    c, _ = s.accept()
    got = 0
    while got < {PAYLOAD}:
        chunk = c.recv(65536)
        if not chunk:
            break
        got += len(chunk)
    c.sendall(b"k")
    c.close()
"""
SEND = f"""
import socket, sys, time
t = time.monotonic()
c = socket.create_connection((sys.argv[1], {PORT}), timeout=60)
c.sendall(b"x" * {PAYLOAD})
assert c.recv(1) == b"k"
print(time.monotonic() - t)
"""


@pytest.fixture
def net():
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    network = netns.build(["x", "y"])
    try:
        yield network
    finally:
        network.close()


def _namespaces() -> set[str]:
    return {n["name"] for n in json.loads(subprocess.run(["ip", "-j", "netns", "list"], capture_output=True,
                                                         text=True).stdout or "[]")}


def _seconds_to_send(net) -> float:
    done = subprocess.run(net.argv("x", [sys.executable, "-c", SEND, net.address("y")]), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout)


def test_partition_heal_limit_and_cleanup(net):
    assert set(net.namespaces()) <= _namespaces()
    assert all(ns.startswith(f"{netns.PREFIX}{os.getpid()}-") for ns in net.namespaces())
    assert net.subnet.subnet_of(netns.ipaddress.ip_network("10.0.0.0/8"))
    sink = subprocess.Popen(net.argv("y", [sys.executable, "-c", SINK]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not netns.connects(net, "x", "y", PORT):
            assert time.monotonic() < deadline and sink.poll() is None, "the sink did not start"
            time.sleep(0.2)
        assert netns.connects(net, netns.OPERATOR, "y", PORT)  # the operator is on the bridge too
        assert not netns.connects(net, "x", "y", PORT + 1)  # a closed port is refused: the probe is honest

        net.partition("y")
        assert net.is_partitioned("y") and not netns.connects(net, "x", "y", PORT, timeout=2)
        net.heal("y")
        assert not net.is_partitioned("y") and netns.connects(net, "x", "y", PORT, timeout=5)

        free = _seconds_to_send(net)
        net.limit("y", "1mbit")
        limited = _seconds_to_send(net)  # 2 Mbit at 1 Mbit/s, less the bucket's burst
        net.unlimit("y")
        assert free < 1.0 and limited > 1.5, (free, limited)
    finally:
        sink.kill()
        sink.wait()
    killed = net.close()
    assert killed == [] and not set(net.namespaces()) & _namespaces()


def test_leftovers_of_a_crashed_session_are_removed():
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    dead = 4194304 + 1  # above the kernel's largest pid: no process has it
    stale = f"{netns.PREFIX}{dead}-0000-hub"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    mine = netns.build(["x"])
    try:
        assert stale not in _namespaces()  # build() removed it first
        assert netns.remove_leftovers() == [] and set(mine.namespaces()) <= _namespaces()  # a live session's stay
    finally:
        mine.close()
    assert not set(mine.namespaces()) & _namespaces()
