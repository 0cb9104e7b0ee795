"""Cluster: N hosts on one machine, each a network namespace with its own hostname and link.

Layout of a cluster named NAME (``psf-`` and 6 hex digits unless named):
- a switch namespace ``NAME-sw`` holding a bridge, ``br0``;
- hosts ``NAME-h0`` .. ``NAME-h{N-1}``, each a namespace with ``lo`` and ``eth0`` (an
  address of 10.213.K.0/24), the other end of ``eth0`` (``h{i}``) on the bridge;
- ``/etc/netns/HOST/hosts``, which ``ip netns exec`` shows as ``/etc/hosts`` inside HOST, so
  every host resolves every other by name;
- a state directory (``$PSFRAME_CLUSTER_DIR``, default /run/psframe/clusters) holding
  ``NAME/cluster.json``, the hostfile, ``ssh``: the stand-in through which MPICH's hydra
  starts its proxy on a host (``ip netns exec HOST``, then that host's own hostname), and
  ``mpiexec``: the venv's mpiexec on host 0 across the hosts, for ``PSFRAME_MPIEXEC``.

Nothing is added to the machine's own namespace: no interface, address or route; the hosts
have no route out, so their traffic never leaves them. ``--bandwidth`` shapes each host's
link in both directions (tc's token bucket filter on both ends of its veth).
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from .. import env
from . import netns
from .netns import ClusterError

__all__ = ["Cluster", "ClusterError", "up", "find", "clusters", "remove", "down_all", "sweep",
           "MPI_ENV"]

_NAME = re.compile(r"psf-[a-z0-9]{1,8}")  # every namespace a cluster owns starts with psf-
_OWNED_NS = re.compile(r"(?P<name>.+)-(sw|h\d+)")

# MPI settings every job `run` starts gets (as -genv): MPICH's libfabric netmod. Its tcp
# provider carries the hosts' traffic over their links. MPICH's default netmod, UCX, sees
# one kernel and moves it through shared memory instead, past the links: a 100mbit link
# then carried 35x what it can (docs/operations.md, "Many nodes").
MPI_ENV: Dict[str, str] = {"MPIR_CVAR_CH4_NETMOD": "ofi"}


def _state_root() -> str:
    return env.cluster_dir()


@dataclass
class Cluster:
    """One simulated cluster, as recorded in its state directory."""

    name: str
    hosts: List[str]
    addresses: List[str]
    bandwidth: Optional[str] = None
    owner_pid: int = 0  # the process that ran `up` (its parent, for the CLI): alive = in use
    created: float = field(default_factory=time.time)

    @property
    def switch(self) -> str:
        return f"{self.name}-sw"

    @property
    def directory(self) -> str:
        return os.path.join(_state_root(), self.name)

    @property
    def ssh(self) -> str:
        return os.path.join(self.directory, "ssh")

    @property
    def mpiexec(self) -> str:
        return os.path.join(self.directory, "mpiexec")

    def hostfile(self, ppn: Optional[int] = None) -> str:
        """A hostfile of every host, ``host:ppn`` (hydra fills a host with ppn ranks, then the
        next, cycling), written in the state directory; default ppn: one slot per host."""
        path = os.path.join(self.directory, f"hosts.{ppn or 1}")
        with open(path, "w") as f:
            f.writelines(f"{h}:{ppn or 1}\n" for h in self.hosts)
        return path

    # -- running a job ----------------------------------------------------------------------
    def command(self, n_procs: int, program: Sequence[str], ppn: Optional[int] = None,
                mpiexec: Optional[str] = None, extra: Sequence[str] = ()) -> List[str]:
        """argv of ``mpiexec -n NP PROGRAM`` started on host 0, its ranks spread over the
        hosts ``ppn`` at a time (default: as evenly as the hosts allow)."""
        if n_procs < 1:
            raise ValueError(f"-n must be >= 1, got {n_procs}")
        if ppn is None:
            ppn = math.ceil(n_procs / len(self.hosts))
        if ppn < 1:
            raise ValueError(f"--ppn must be >= 1, got {ppn}")
        if not program:
            raise ValueError("name the program to run after --")
        job = [*self._mpiexec_across(ppn, mpiexec), *extra, "-n", str(n_procs), *program]
        return self.on_host(0, job)

    def _mpiexec_across(self, ppn: int, mpiexec: Optional[str] = None) -> List[str]:
        """mpiexec with the hosts' launcher, hostfile and MPI settings; its -n and program
        to follow."""
        if mpiexec is None:
            from ..training.launch import find_mpiexec

            mpiexec = find_mpiexec()
            if os.path.realpath(mpiexec).startswith(os.path.realpath(_state_root()) + os.sep):
                # $PSFRAME_MPIEXEC names a cluster's wrapper: the real mpiexec is the one
                # the search finds without it (else the wrapper would start itself).
                mpiexec = find_mpiexec({})
        genv = [a for k, v in MPI_ENV.items() for a in ("-genv", k, v)]
        return [mpiexec, "-launcher", "ssh", "-launcher-exec", self.ssh,
                "-f", self.hostfile(ppn), *genv]

    def on_host(self, i: int, argv: Sequence[str]) -> List[str]:
        """argv that runs ``argv`` on host ``i``: in its namespace, under its hostname."""
        host = self.hosts[i]
        return ["ip", "netns", "exec", host, "unshare", "--uts", "--", "sh", "-c",
                'hostname "$0" && exec "$@"', host, *argv]

    def run(self, n_procs: int, program: Sequence[str], ppn: Optional[int] = None,
            env_extra: Optional[Dict[str, str]] = None, timeout: Optional[float] = None,
            capture_output: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Run a job across the hosts; its output and exit status are the job's. Past
        ``timeout`` the whole job (mpiexec, its proxies, every rank) is killed, then
        subprocess.TimeoutExpired raised: a stalled job never outlives its caller's bound."""
        environ = dict(os.environ, **(env_extra or {}))
        if capture_output:
            kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with subprocess.Popen(self.command(n_procs, program, ppn), env=environ,
                              start_new_session=True, **kwargs) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_jobs()
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.communicate()
                raise
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_jobs(self) -> None:
        """SIGKILL every process running on the hosts (a job's ranks and proxies)."""
        for host in self.hosts:
            netns.kill_processes(host)

    # -- life cycle -------------------------------------------------------------------------
    def save(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, "cluster.json"), "w") as f:
            json.dump(asdict(self), f, indent=1)

    def down(self) -> None:
        """Remove every namespace, file and directory ``up`` made; absent parts are fine."""
        remove(self.name)

    def alive(self) -> bool:
        """Whether the process that made it still runs (else it is a crashed run's leftover)."""
        if self.owner_pid <= 0:
            return False
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def describe(self) -> str:
        rate = self.bandwidth or "unshaped"
        rows = [f"cluster {self.name}: {len(self.hosts)} hosts, links {rate}, "
                f"state in {self.directory}"]
        rows += [f"  {h}  {a}" for h, a in zip(self.hosts, self.addresses)]
        rows.append(f"  mpiexec across the hosts: {self.mpiexec}")
        return "\n".join(rows)


def _listed_namespaces() -> List[str]:
    try:
        return netns.namespaces()
    except ClusterError:
        return []


def _owner_of(ns: str) -> Optional[str]:
    m = _OWNED_NS.fullmatch(ns)
    return m.group("name") if m and _NAME.fullmatch(m.group("name")) else None


def clusters() -> List[Cluster]:
    """Every cluster with a state directory here."""
    root = _state_root()
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        path = os.path.join(root, name, "cluster.json")
        try:
            with open(path) as f:
                out.append(Cluster(**json.load(f)))
        except (OSError, ValueError, TypeError):
            continue  # half written by a crashed `up`: its namespaces are swept below
    return out


def find(name: Optional[str] = None) -> Cluster:
    """The cluster called ``name``, or the only one there is."""
    found = clusters()
    if name is not None:
        for c in found:
            if c.name == name:
                return c
        raise ClusterError(f"no cluster named {name!r}; `psframe cluster status` lists them")
    if not found:
        raise ClusterError("no cluster is up; start one with `psframe cluster up --nodes N`")
    if len(found) > 1:
        names = ", ".join(c.name for c in found)
        raise ClusterError(f"{len(found)} clusters are up ({names}); name one with --name")
    return found[0]


def _names_here() -> List[str]:
    """Every cluster name with state or with a namespace (a crashed `up` may leave either)."""
    return sorted({c.name for c in clusters()} | {
        owner for owner in map(_owner_of, _listed_namespaces()) if owner is not None})


def remove(name: str) -> bool:
    """Remove cluster ``name``: the processes on its hosts, every namespace named after it
    and its state. Returns whether anything was there."""
    directory = os.path.join(_state_root(), name)
    owned = [ns for ns in _listed_namespaces() if _owner_of(ns) == name]
    for ns in owned:
        netns.delete_namespace(ns)
    found = bool(owned) or os.path.isdir(directory)
    shutil.rmtree(directory, ignore_errors=True)
    return found


def sweep() -> List[str]:
    """Remove crashed runs' leftovers: clusters whose maker has exited, and namespaces named
    like a cluster's with no state left. Returns their names."""
    alive = {c.name for c in clusters() if c.alive()}
    return [name for name in _names_here() if name not in alive and remove(name)]


def down_all() -> List[str]:
    """Remove every cluster and every leftover; returns their names."""
    return [name for name in _names_here() if remove(name)]


def _ssh_standin(cluster: Cluster) -> str:
    """The program hydra runs instead of ssh: ``ssh [OPTIONS] HOST COMMAND...`` becomes
    COMMAND run by a shell in HOST's namespace under HOST's hostname, as sshd would."""
    hosts = " | ".join(shlex.quote(h) for h in cluster.hosts)
    return f"""#!/bin/sh
# psframe cluster {cluster.name}: MPICH's hydra starts its proxies through this, not ssh.
while [ $# -gt 0 ]; do
    case "$1" in
        -[bcDEeFIiJLlmOopQRSWw]) shift 2 ;;  # ssh options that take a value
        -*) shift ;;
        *) break ;;
    esac
done
host=$1
shift
case "$host" in
    {hosts}) ;;
    *) echo "psframe cluster {cluster.name}: no host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$host" unshare --uts -- sh -c 'hostname "$0" && exec sh -c "$1"' "$host" "$*"
"""


def _mpiexec_wrapper(cluster: Cluster) -> str:
    """An mpiexec that takes mpiexec's own arguments (``-n N PROGRAM...``) and runs the job
    across the hosts, one rank per host before the next (round-robin), rank 0 on host 0.
    ``exec`` all the way: its pid is mpiexec's, so a supervisor's signals reach mpiexec."""
    argv = shlex.join(cluster.on_host(0, cluster._mpiexec_across(1)))
    return f"""#!/bin/sh
# psframe cluster {cluster.name}: mpiexec across its hosts (PSFRAME_MPIEXEC={cluster.mpiexec}).
exec {argv} "$@"
"""


def up(nodes: int, bandwidth: Optional[str] = None, name: Optional[str] = None,
       owner_pid: Optional[int] = None) -> Cluster:
    """Make a cluster of ``nodes`` hosts (see the module docstring); leftovers of crashed
    runs go first. On any failure, what was made is removed again."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"--nodes must be an integer >= 1, got {nodes!r}")
    if bandwidth is not None:
        netns.rate_bytes(bandwidth)  # a bad rate fails before anything is made
    if name is not None and not _NAME.fullmatch(name):
        raise ValueError(f"cluster name {name!r}: use psf- and 1-8 lowercase letters or "
                         "digits, e.g. psf-a")
    netns.require(bandwidth=bandwidth is not None)
    sweep()
    name = name or f"psf-{secrets.token_hex(3)}"
    if any(c.name == name for c in clusters()) or any(
            _owner_of(ns) == name for ns in _listed_namespaces()):
        raise ClusterError(f"a cluster named {name!r} exists; `psframe cluster down --name "
                           f"{name}` removes it")
    subnet = 10 + zlib.crc32(name.encode()) % 240  # 10.213.K.0/24: K per cluster, for reading
    hosts = [f"{name}-h{i}" for i in range(nodes)]
    cluster = Cluster(name, hosts, [f"10.213.{subnet}.{i + 1}" for i in range(nodes)],
                      bandwidth, owner_pid if owner_pid is not None else os.getppid())
    try:
        cluster.save()
        _build(cluster)
    except BaseException:
        cluster.down()
        raise
    return cluster


def _build(c: Cluster) -> None:
    sw = c.switch
    netns.add_namespace(sw)
    netns.ip("link", "add", "br0", "type", "bridge", ns=sw)
    netns.ip("link", "set", "br0", "up", ns=sw)
    hosts_file = "127.0.0.1 localhost\n" + "".join(
        f"{a} {h}\n" for h, a in zip(c.hosts, c.addresses))
    for i, (host, address) in enumerate(zip(c.hosts, c.addresses)):
        netns.add_namespace(host)
        port = f"h{i}"
        netns.ip("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host,
                 ns=sw)
        netns.ip("link", "set", port, "master", "br0", ns=sw)
        netns.ip("link", "set", port, "up", ns=sw)
        netns.ip("addr", "add", f"{address}/24", "dev", "eth0", ns=host)
        netns.ip("link", "set", "eth0", "up", ns=host)
        if c.bandwidth:
            netns.shape(host, "eth0", c.bandwidth)  # host -> switch
            netns.shape(sw, port, c.bandwidth)  # switch -> host
        etc = os.path.join("/etc/netns", host)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "hosts"), "w") as f:
            f.write(hosts_file)
    for path, text in ((c.ssh, _ssh_standin(c)), (c.mpiexec, _mpiexec_wrapper(c))):
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
