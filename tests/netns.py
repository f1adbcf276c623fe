"""Several network hosts on one machine, for tests: Linux network namespaces on a virtual switch.

Each host is a namespace with one interface, ``eth0`` (a veth pair whose other end is on a bridge in a
namespace of its own, so the machine's firewall never sees the traffic), and an address 10.77.0.<i + 1>/24.
Creating them needs root and the ``ip`` tool; ``network`` skips the calling test with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class Network:
    tag: str
    names: list[str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def namespace(self, name: str) -> str:
        return f"mocosfl-{self.tag}-{name}"

    def address(self, name: str) -> str:
        return f"10.77.0.{self.names.index(name) + 1}"

    def popen(self, name: str, cmd: list[str], **kwargs: object) -> subprocess.Popen:
        """Start ``cmd`` on host ``name`` (in its own session: closing the network kills all of it)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespace(name), *cmd], start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def counters(self, name: str) -> dict[str, int]:
        """Bytes ``eth0`` of host ``name`` has sent (tx) and received (rx), from the kernel's counters."""
        out = _ip("-n", self.namespace(name), "-s", "-j", "link", "show", "eth0")
        stats = json.loads(out)[0]["stats64"]
        return {"tx": int(stats["tx"]["bytes"]), "rx": int(stats["rx"]["bytes"])}


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def network(names: list[str]) -> Iterator[Network]:
    """Hosts ``names`` on one switch; every process started on them is killed and every namespace deleted
    at exit."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` tool (iproute2) to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    net = Network(tag=str(os.getpid()), names=names)
    switch = net.namespace("switch")
    made: list[str] = []
    try:
        try:
            _ip("netns", "add", switch)
            made.append(switch)
            _ip("-n", switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", switch, "link", "set", "br0", "up")
            for i, name in enumerate(names):
                ns, host_end, switch_end = net.namespace(name), f"mh{net.tag}-{i}", f"ms{net.tag}-{i}"
                _ip("netns", "add", ns)
                made.append(ns)
                _ip("link", "add", host_end, "type", "veth", "peer", "name", switch_end)
                _ip("link", "set", host_end, "netns", ns)
                _ip("link", "set", switch_end, "netns", switch)
                _ip("-n", ns, "link", "set", host_end, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{net.address(name)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", switch, "link", "set", switch_end, "master", "br0", "up")
        except OSError as e:
            pytest.skip(f"cannot create network namespaces here ({e})")
        yield net
    finally:
        for proc in net.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for ns in reversed(made):
            # torchrun starts its workers in sessions of their own: whatever still runs in a namespace goes too,
            # or the namespace would outlive its name.
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for i in range(len(names)):  # a veth pair left in this namespace when moving it failed
            subprocess.run(["ip", "link", "del", f"mh{net.tag}-{i}"], capture_output=True, timeout=30)
