"""A throwaway one-node Slurm (munged, slurmctld, slurmd) in a temporary directory, for tests."""
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TOOLS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel"]
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/bin"  # daemons live in sbin
POLICY_RC = "/usr/sbin/policy-rc.d"
OWNER = "PSFRAME_LOCAL_SLURM_OWNER"  # in every daemon's and job's environment: our pid
STATE_PREFIX = "psframe-slurm-"
# The node claims more CPUs than this 2-core machine has (slurmd reports the configured
# count, see config_overrides), so 1 server + 3 workers fit with the script's 1 CPU per task.
NODE_CPUS = 4
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def tool(name):
    return shutil.which(name, path=SEARCH_PATH)


def install(timeout_s=180):
    """Installs Debian's Slurm and munge when missing; returns why it could not, or None."""
    if os.geteuid() != 0:
        return "slurmd runs jobs as root here (and installing Slurm needs root too); not root"
    missing = [t for t in TOOLS if tool(t) is None]
    if not missing:
        return None
    if tool("apt-get") is None:
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get"
    # Without systemd, the packages' scripts would start the daemons from /etc/init.d, with
    # the system's config; a policy-rc.d that says no keeps them down (Docker images have one).
    own_policy = not os.path.exists(POLICY_RC)
    if own_policy:
        with open(POLICY_RC, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(POLICY_RC, 0o755)
    deadline = time.time() + timeout_s
    try:
        install = ["install", "--no-install-recommends", *PACKAGES]
        failed = _apt(install, deadline)
        if failed:  # a clean machine may have no package lists yet
            failed = _apt(["update"], deadline) or _apt(install, deadline)
    finally:
        if own_policy:
            os.remove(POLICY_RC)
    if failed:
        return failed
    still = [t for t in TOOLS if tool(t) is None]
    return f"installed {' '.join(PACKAGES)}, yet {', '.join(still)} missing" if still else None


def _apt(args, deadline):
    """Runs apt-get; returns why it failed, or None."""
    cmd = ["apt-get", "-q", "-y", *args]
    try:
        proc = subprocess.run(cmd, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                              capture_output=True, text=True,
                              timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        return f"'{' '.join(cmd)}' did not finish in time (no network?)"
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:]
    return f"'{' '.join(cmd)}' failed (exit {proc.returncode}): {' '.join(last)}"


def _die_with_parent():
    # pytest-timeout ends the test process without running finalizers; the daemons must not
    # outlive it. 1 is PR_SET_PDEATHSIG.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Its own munged (own key and socket), slurmctld and slurmd, all under ``state``."""

    def __init__(self, state):
        self.state = state
        self.conf = os.path.join(state, "slurm.conf")
        self.node = socket.gethostname().split(".")[0]  # what slurmd takes itself for
        self.daemons = {}

    def env(self, **extra):
        """The caller's environment less any outer job's, pointing at this cluster, marked
        with its owner (see sweep)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_"))}
        return dict(env, SLURM_CONF=self.conf, **{OWNER: str(os.getpid())}, **extra)

    def run(self, *cmd, timeout=30, **kw):
        return subprocess.run([tool(cmd[0]), *cmd[1:]], env=kw.pop("env", self.env()),
                              capture_output=True, text=True, timeout=timeout, **kw)

    def log(self, name):
        try:
            with open(os.path.join(self.state, f"{name}.log")) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _spawn(self, name, *cmd):
        out = open(os.path.join(self.state, f"{name}.log"), "w")
        self.daemons[name] = subprocess.Popen([tool(cmd[0]), *cmd[1:]], env=self.env(),
                                              stdout=out, stderr=subprocess.STDOUT,
                                              preexec_fn=_die_with_parent)
        out.close()

    def start(self, timeout_s=60):
        s = self.state
        for d in ("munge", "spool", "ctld"):
            os.makedirs(os.path.join(s, d), mode=0o700)
        key = os.path.join(s, "munge", "key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o400)
        sock = os.path.join(s, "munge", "socket")
        # --force: munged refuses a socket in a directory others cannot enter, as ours (0700).
        self._spawn("munged", "munged", "--foreground", "--force", f"--key-file={key}",
                    f"--socket={sock}", f"--pid-file={s}/munge/pid",
                    f"--seed-file={s}/munge/seed", f"--log-file={s}/munge/log")
        self._wait_for(lambda: os.path.exists(sock), "munged made no socket", 10)
        with open(self.conf, "w") as f:
            f.write(self._config(sock))
        self._spawn("slurmctld", "slurmctld", "-D")
        self._spawn("slurmd", "slurmd", "-D")
        self._wait_for(self._node_idle, "the node did not come up idle", timeout_s)

    def _config(self, munge_socket):
        s = self.state
        return "\n".join([
            "ClusterName=psframetest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={s}/ctld",
            f"SlurmdSpoolDir={s}/spool",
            f"SlurmctldPidFile={s}/slurmctld.pid",
            f"SlurmdPidFile={s}/slurmd.pid",
            # No cgroups: a container may not offer them.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SlurmdDebug=verbose",  # logs each step it launches, which the tests look for
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _node_idle(self):
        proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%t", timeout=10)
        return proc.stdout.strip() == "idle"

    def _wait_for(self, ready, what, timeout_s):
        deadline = time.time() + timeout_s
        while not ready():
            dead = [n for n, p in self.daemons.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-2000:]}" for n in self.daemons)
                raise RuntimeError(f"{what} (exited: {dead or 'none'})\n{logs}")
            time.sleep(0.2)

    def sbatch(self, args, cwd, env):
        proc = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def wait(self, job, timeout_s):
        """The job's fields from scontrol once it has ended; cancels it after timeout_s."""
        deadline = time.time() + timeout_s
        while True:
            line = self.run("scontrol", "show", "job", "-o", job, timeout=10).stdout
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobState") in DONE_STATES:
                return fields
            if time.time() > deadline:
                self.run("scancel", job, timeout=10)
                raise TimeoutError(f"job {job} still {fields.get('JobState')} "
                                   f"after {timeout_s} s")
            time.sleep(0.3)

    def stop(self):
        """Cancels every job, stops the daemons and kills whatever they left behind."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user=root", timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        # slurmstepd (and a job's ranks) outlive slurmd by design; they all carry our
        # SLURM_CONF, which no other process on the machine has.
        deadline = time.time() + 5  # a killed process shows its environment until it is gone
        while (pids := self.leftovers()) and time.time() < deadline:
            for pid in pids:
                _kill(pid)
            time.sleep(0.1)

    def leftovers(self):
        return [pid for pid, env in _environments() if env.get("SLURM_CONF") == self.conf]


def sweep():
    """Kills and removes what a run killed outright left (pytest-timeout's thread method ends
    the process without finalizers; the daemons die with it, but not slurmstepd and a job)."""
    for pid, env in _environments():
        owner = env.get(OWNER)
        if owner and not os.path.exists(f"/proc/{owner}"):
            _kill(pid)
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{STATE_PREFIX}*-*")):
        owner = os.path.basename(path)[len(STATE_PREFIX):].split("-")[0]
        if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
            shutil.rmtree(path, ignore_errors=True)


def state_dir():
    """A fresh directory named by its owner, for sweep."""
    return tempfile.mkdtemp(prefix=f"{STATE_PREFIX}{os.getpid()}-")


def _environments():
    """(pid, environment) of every other process whose environment is readable."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                raw = f.read()
        except OSError:  # gone, or not ours to read
            continue
        pairs = (e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)
        yield int(entry), dict(pairs)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
