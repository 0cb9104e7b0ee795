"""The few iproute2 and tc calls a simulated cluster is made of, and what they need."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from typing import List, Optional, Sequence

__all__ = ["ClusterError", "require", "ip", "namespaces", "add_namespace", "delete_namespace",
           "kill_processes", "shape", "rate_bytes"]


class ClusterError(RuntimeError):
    """The simulated cluster cannot be made, used or removed; the message says why."""


def require(bandwidth: bool = False) -> None:
    """Raise ClusterError naming everything missing: root, iproute2 (ip), unshare, tc."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need CAP_SYS_ADMIN and CAP_NET_ADMIN)")
    if shutil.which("ip") is None:
        missing.append("iproute2 (the `ip` command)")
    if shutil.which("unshare") is None:
        missing.append("util-linux's `unshare` (each host's own hostname)")
    if bandwidth and shutil.which("tc") is None:
        missing.append("iproute2's `tc` (--bandwidth)")
    if missing:
        raise ClusterError("psframe cluster needs " + "; ".join(missing))


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.returncode}")
    return proc


def ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    """``ip [-n NS] ARGS``."""
    return _run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def namespaces() -> List[str]:
    """The names of this machine's network namespaces."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def add_namespace(name: str) -> None:
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)


def kill_processes(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (absent is fine)."""
    for pid in ip("netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def delete_namespace(name: str) -> None:
    """Remove a namespace and what it holds: its processes (a namespace lives on while any
    process is in it), its veth ends; absent is fine."""
    kill_processes(name)
    ip("netns", "delete", name, check=False)
    shutil.rmtree(os.path.join("/etc/netns", name), ignore_errors=True)


_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def rate_bytes(rate: str) -> float:
    """Bytes per second of a tc rate such as ``1gbit`` or ``100mbit`` (ValueError if not)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"bandwidth {rate!r}: give a rate such as 1gbit, 100mbit or 10gbit")
    return float(m.group(1)) * _UNITS[m.group(2).lower()] / 8


def shape(ns: str, dev: str, rate: str) -> None:
    """Limit ``dev``'s egress in ``ns`` to ``rate`` (tc's token bucket filter). The bucket
    holds 4 ms of traffic (at least 64 KiB), enough for the kernel's timer granularity."""
    burst = max(64 << 10, int(rate_bytes(rate) * 0.004))
    _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
          "burst", str(burst), "latency", "100ms"])
