"""A test network made of Linux network namespaces: each host (the SuperLink, every site) in a namespace of its own
with one interface, ``eth0``, on a private 10.x.y.0/24, all plugged into a bridge that lives in a further namespace
(the "hub"). The machine running the tests (the operator) is on the same bridge through one veth pair, so `flwr`
commands reach the SuperLink over the network as an administrator's would.

Faults are made at the hub, on the host's bridge port, as a switch or a firewall would make them:
:meth:`TestNetwork.partition` takes the port down (the host's packets are dropped, without any error at either
end), :meth:`TestNetwork.heal` brings it back, and :meth:`TestNetwork.limit` puts a token-bucket filter (``tc``'s
``tbf``) on both directions of the host's link. Processes run inside a host's namespace with ``ip netns exec``
(:meth:`TestNetwork.argv`).

Everything is named ``facefl-test-<pid>-<token>-...`` (the pid of the pytest process that made it); :func:`build`
first removes what a crashed earlier session left (namespaces whose creator is gone) and :meth:`TestNetwork.close`
removes everything, killing what still runs inside, even after a failed test. Needs root (``ip netns add``); when
the machine does not allow it, :func:`unavailable` says why in one line and the tests skip.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

PREFIX = "facefl-test-"  # every namespace this module makes
HUB = "hub"
BRIDGE = "br0"
OPERATOR = "operator"  # the machine that runs the tests, on the bridge through one veth pair


class NetworkError(RuntimeError):
    """A namespace, link or qdisc could not be made as asked."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and done.returncode:
        raise NetworkError(f"`{' '.join(args)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def unavailable() -> str | None:
    """Why this machine cannot build test networks (one line), or None when it can."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "network namespace tests need iproute2 (`ip` and `tc`)"
    if os.geteuid() != 0:
        return "network namespace tests need root (`ip netns add`)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = _ip("ip", "netns", "add", probe, check=False)
    if done.returncode:
        return f"`ip netns add` is not permitted here: {(done.stderr or done.stdout).strip().splitlines()[-1]}"
    _ip("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    """One host of the test network: its namespace, address, and its port on the hub's bridge."""

    name: str
    namespace: str
    address: str
    port: str  # the veth end in the hub namespace, on the bridge


@dataclass
class TestNetwork:
    """A bridge in a namespace of its own, with one namespace per host; see the module docstring."""

    token: str
    subnet: ipaddress.IPv4Network
    hub: str
    hosts: dict[str, Host] = field(default_factory=dict)
    operator_address: str = ""
    operator_link: str = ""
    closed: bool = False

    def address(self, host: str) -> str:
        return self.hosts[host].address

    def argv(self, host: str, command: list) -> list[str]:
        """``command`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *map(str, command)]

    def partition(self, host: str) -> None:
        """Cut ``host`` off: its bridge port goes down and its packets are dropped silently."""
        _ip("ip", "-n", self.hub, "link", "set", self.hosts[host].port, "down")

    def heal(self, host: str) -> None:
        _ip("ip", "-n", self.hub, "link", "set", self.hosts[host].port, "up")

    def is_partitioned(self, host: str) -> bool:
        info = json.loads(_ip("ip", "-j", "-n", self.hub, "link", "show", self.hosts[host].port).stdout)
        return "UP" not in info[0]["flags"]

    def limit(self, host: str, rate: str = "1mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        """A token-bucket filter of ``rate`` on both directions of ``host``'s link."""
        h = self.hosts[host]
        for ns, dev in ((self.hub, h.port), (h.namespace, "eth0")):
            _ip("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
                "latency", latency)

    def unlimit(self, host: str) -> None:
        h = self.hosts[host]
        for ns, dev in ((self.hub, h.port), (h.namespace, "eth0")):
            _ip("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def namespaces(self) -> list[str]:
        return [self.hub, *(h.namespace for h in self.hosts.values())]

    def processes(self) -> dict[int, str]:
        """The live processes inside the network's namespaces: pid -> command line."""
        found = {}
        for ns in self.namespaces():
            for pid in (int(p) for p in _ip("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()):
                if _alive(pid):
                    found[pid] = _cmdline(pid)
        return found

    def close(self) -> list[str]:
        """Kill what still runs in the namespaces and delete them (the veth pairs go with them). Returns the
        command lines of the processes that had to be killed."""
        if self.closed:
            return []
        self.closed = True
        killed = _remove(self.namespaces())
        if self.operator_link:
            _ip("ip", "link", "del", self.operator_link, check=False)  # normally gone with the hub
        return killed


def build(hosts: list[str]) -> TestNetwork:
    """A new test network with one namespace per name in ``hosts``, addressed .1, .2, ... in a fresh 10.x.y.0/24
    that no route of this machine uses; the operator (this process's namespace) is .254."""
    remove_leftovers()
    token = f"{os.getpid()}-{random.randrange(16 ** 4):04x}"
    net = TestNetwork(token, _free_subnet(), f"{PREFIX}{token}-{HUB}")
    try:
        _ip("ip", "netns", "add", net.hub)
        _ip("ip", "-n", net.hub, "link", "set", "lo", "up")
        _ip("ip", "-n", net.hub, "link", "add", BRIDGE, "type", "bridge")
        _ip("ip", "-n", net.hub, "link", "set", BRIDGE, "up")
        for i, name in enumerate(hosts, start=1):
            host = Host(name, f"{PREFIX}{token}-{name}", str(net.subnet[i]), f"v{i}")
            net.hosts[name] = host
            _ip("ip", "netns", "add", host.namespace)
            _ip("ip", "-n", host.namespace, "link", "set", "lo", "up")
            _ip("ip", "-n", net.hub, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns",
                host.namespace)
            _ip("ip", "-n", host.namespace, "addr", "add", f"{host.address}/{net.subnet.prefixlen}", "dev", "eth0")
            _ip("ip", "-n", host.namespace, "link", "set", "eth0", "up")
            _ip("ip", "-n", net.hub, "link", "set", host.port, "master", BRIDGE, "up")
        # The operator: a veth pair from this namespace to the bridge (its name is unique on this machine).
        net.operator_link = f"fflt{token.replace('-', '')[-10:]}"[:15]
        net.operator_address = str(net.subnet[254])
        _ip("ip", "link", "add", net.operator_link, "type", "veth", "peer", "name", "vop", "netns", net.hub)
        _ip("ip", "-n", net.hub, "link", "set", "vop", "master", BRIDGE, "up")
        _ip("ip", "addr", "add", f"{net.operator_address}/{net.subnet.prefixlen}", "dev", net.operator_link)
        _ip("ip", "link", "set", net.operator_link, "up")
    except BaseException:
        net.close()
        raise
    return net


def connects(net: TestNetwork, source: str, target: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection from host ``source`` (or the operator) to ``target``'s ``port`` opens."""
    probe = ["python3", "-c", "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
             "timeout=float(sys.argv[3])).close()", net.address(target), str(port), str(timeout)]
    argv = probe if source == OPERATOR else net.argv(source, probe)
    return subprocess.run(argv, capture_output=True, timeout=timeout + 20).returncode == 0


def remove_leftovers() -> list[str]:
    """Remove the namespaces of earlier sessions whose pytest process is gone; returns their names."""
    done = _ip("ip", "-j", "netns", "list", check=False)
    names = [n["name"] for n in json.loads(done.stdout or "[]")] if done.returncode == 0 else []
    stale = []
    for name in names:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(name)
    _remove(stale)
    return stale


def _remove(namespaces: list[str]) -> list[str]:
    killed = []
    for ns in namespaces:
        pids = [int(p) for p in _ip("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        for pid in pids:
            try:
                if _alive(pid):
                    killed.append(_cmdline(pid))
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        deadline = time.monotonic() + 10
        while pids and any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        _ip("ip", "netns", "del", ns, check=False)
    return killed


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that overlaps no route of this namespace."""
    routes = json.loads(_ip("ip", "-j", "route", "show", "table", "all").stdout or "[]")
    used = []
    for route in routes:
        dst = route.get("dst", "")
        try:
            used.append(ipaddress.ip_network(dst if dst != "default" else "0.0.0.0/32", strict=False))
        except ValueError:
            continue
    used = [u for u in used if u.version == 4 and u.prefixlen > 0]
    for _ in range(200):
        candidate = ipaddress.ip_network(f"10.{random.randrange(100, 250)}.{random.randrange(256)}.0/24")
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise NetworkError("No free 10.x.y.0/24 for a test network: this machine routes all of them.")
