"""psframe on several hosts: the simulated cluster itself, then jobs across its hosts."""
import os
import subprocess
import sys
import time

import pytest

from psframe import cluster as psc
from psframe.cluster import netns

from cluster_jobs import ROOT, run_on

PY = sys.executable
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
CLI = [PY, "-m", "psframe", "cluster"]


def cli(*args, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# -- the cluster --------------------------------------------------------------------------------
def test_hosts_have_their_own_names_addresses_and_only_a_local_route(cluster3):
    c = cluster3
    proc = run_on(c, 3, ["hostname"], ppn=1)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(c.hosts)
    for host, address in zip(c.hosts, c.addresses):
        routes = netns.ip("route", "show", ns=host).stdout.strip().splitlines()
        assert routes == [f"{address.rsplit('.', 1)[0]}.0/24 dev eth0 proto kernel scope "
                          f"link src {address}"], routes
        assert netns.ip("route", "show", "default", ns=host).stdout.strip() == ""


def test_nothing_is_added_to_this_machines_own_namespace(cluster3):
    links = netns.ip("-o", "link", "show").stdout
    addresses = netns.ip("-o", "addr", "show").stdout
    assert "br0" not in links and cluster3.switch not in links
    assert "10.213." not in addresses  # no address of any cluster here


def test_ranks_fill_a_host_then_the_next_and_ppn_1_is_round_robin(cluster3):
    c = cluster3
    script = ["sh", "-c", 'echo "$PMI_RANK $(hostname)"']
    filled = run_on(c, 4, script)  # default ppn: ceil(4 / 3) = 2
    rr = run_on(c, 4, script, ppn=1)
    for proc in (filled, rr):
        assert proc.returncode == 0, proc.stderr
    by_rank = lambda p: dict(line.split() for line in p.stdout.splitlines())  # noqa: E731
    h = c.hosts
    assert by_rank(filled) == {"0": h[0], "1": h[0], "2": h[1], "3": h[1]}
    assert by_rank(rr) == {"0": h[0], "1": h[1], "2": h[2], "3": h[0]}


def test_the_exit_status_and_output_are_the_jobs(cluster3):
    proc = run_on(cluster3, 2, ["sh", "-c", 'echo "out $PMI_RANK"; exit 3'], ppn=1)
    assert proc.returncode == 3
    assert sorted(proc.stdout.split("\n")[:2]) == ["out 0", "out 1"]


def test_a_job_past_its_timeout_is_killed_whole(cluster3):
    with pytest.raises(subprocess.TimeoutExpired):
        run_on(cluster3, 3, ["sleep", "300"], ppn=1, timeout=5)
    for host in cluster3.hosts:  # no rank, proxy or mpiexec left on any host
        assert netns.ip("netns", "pids", host).stdout.split() == [], host


def test_cli_up_status_run_down_and_down_twice(cluster_available):
    made = cli("up", "--nodes", "2", "--bandwidth", "1gbit", "--name", "psf-clitest")
    try:
        assert made.returncode == 0, made.stderr
        assert "psf-clitest-h1" in made.stdout
        status = cli("status")
        assert "psf-clitest" in status.stdout and "1gbit" in status.stdout
        for ns, dev in (("psf-clitest-h0", "eth0"), ("psf-clitest-sw", "h0")):
            qdisc = subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", dev],
                                   capture_output=True, text=True).stdout
            assert "tbf" in qdisc and "rate 1Gbit" in qdisc, qdisc
        ran = cli("run", "--name", "psf-clitest", "-n", "2", "--ppn", "1", "--", "hostname")
        assert ran.returncode == 0, ran.stderr
        assert sorted(ran.stdout.split()) == ["psf-clitest-h0", "psf-clitest-h1"]
    finally:
        first = cli("down", "--name", "psf-clitest")
    assert first.returncode == 0 and "removed psf-clitest" in first.stdout
    again = cli("down", "--name", "psf-clitest")
    assert again.returncode == 0 and "nothing to remove" in again.stdout
    assert not [ns for ns in netns.namespaces() if ns.startswith("psf-clitest")]
    assert not os.path.exists("/etc/netns/psf-clitest-h0")


def test_bad_input_is_one_clear_error(cluster_available):
    for args, message in ((["up", "--nodes", "0"], "--nodes must be an integer >= 1"),
                          (["up", "--nodes", "2", "--bandwidth", "fast"], "bandwidth 'fast'"),
                          (["up", "--nodes", "2", "--name", "Bad Name"], "cluster name"),
                          (["run", "--name", "psf-nosuch", "-n", "2", "--", "true"],
                           "no cluster named 'psf-nosuch'")):
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)


def test_a_crashed_runs_leftovers_go_with_the_next_up(cluster_available):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that has exited: the maker of a crashed run
    stale = psc.up(1, name="psf-stale", owner_pid=dead.pid)
    netns.add_namespace("psf-orphan-h0")  # a namespace a crashed `up` left without state
    fresh = psc.up(1, owner_pid=os.getpid())
    try:
        names = netns.namespaces()
        assert stale.hosts[0] not in names and "psf-orphan-h0" not in names
        assert fresh.hosts[0] in names
    finally:
        fresh.down()
        psc.remove("psf-stale")
        netns.delete_namespace("psf-orphan-h0")


def test_without_root_the_error_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(psc.ClusterError, match="needs root"):
        netns.require()


# -- jobs across hosts --------------------------------------------------------------------------
@pytest.mark.timeout(300)  # above the job's own 240 s bound
def test_sync_across_hosts_equals_serial_sgd_and_paths_follow_the_hosts(cluster3):
    # ranks 0, 1 on host 0; 2, 3 on host 1; 4 on host 2: the server and worker 0 share a host
    proc = run_on(cluster3, 5, [PY, "-m", "mpi4py", os.path.join(SCRIPTS, "cluster_paths.py")],
                  ppn=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PATHS shared-read mpi mpi mpi" in proc.stdout
    assert "OK" in proc.stdout


@pytest.mark.timeout(660)  # the job's own bound is 600 s: it fails on that, not on this
@pytest.mark.parametrize("files, n, ppn", [
    (["test_sync.py", "test_policies_mpi.py"], 3, 1),  # every worker on a host of its own
    (["test_pipeline.py"], 5, 1),  # stages of each pipeline on different hosts
    (["test_servers.py"], 5, 1),  # servers 0, 1, 2 on three hosts, their workers beside
], ids=["sync-and-policies", "model-and-hybrid", "several-servers"])
def test_the_exactness_tests_pass_across_hosts(cluster3, files, n, ppn, tmp_path):
    """The MPI suite's own tests (Sync, model and hybrid against serial SGD; the SSP bound;
    the other policies), run with their ranks on different hosts."""
    paths = [os.path.join(ROOT, "tests", "mpi", f) for f in files]
    env = {"PSFRAME_TEST_LOGS": str(tmp_path), "PSFRAME_TEST_LABEL": "cluster"}
    proc = run_on(cluster3, n, [PY, os.path.join(ROOT, "tests", "quiet_rank.py"), "-m",
                                "mpi4py", "-m", "pytest", "--with-mpi", "-m", "mpi", "-q",
                                "-p", "no:cacheprovider", *paths], ppn=ppn, timeout=600,
                  env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.split("\n")[-2]


def test_a_rank_killed_on_a_remote_host_ends_the_job_within_seconds(cluster3):
    t0 = time.perf_counter()
    proc = run_on(cluster3, 3, [PY, "-m", "mpi4py", os.path.join(SCRIPTS, "cluster_kill.py")],
                  ppn=1, timeout=100)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "UNREACHABLE" not in proc.stdout
    # "Within seconds": a bound far above the 1-3 s it takes, so a slow machine cannot trip it.
    assert elapsed < 60, f"the job took {elapsed:.1f} s to end"


@pytest.mark.timeout(300)
def test_run_hostfile_sh_starts_a_job_across_the_hosts(cluster3, tmp_path):
    c = cluster3
    env = dict(os.environ, PSFRAME_MPIEXEC_ARGS=f"-launcher-exec {c.ssh} "
               + " ".join(f"-genv {k} {v}" for k, v in psc.MPI_ENV.items()))
    cmd = c.on_host(0, [os.path.join(ROOT, "scripts", "run_hostfile.sh"), c.hostfile(1), "3",
                        "--data", "digits", "--model", "mlp:64,16,10", "--steps", "20",
                        "--quiet", "--log-dir", str(tmp_path)])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                              cwd=ROOT, start_new_session=True)
    finally:
        c.kill_jobs()  # nothing of a stalled job outlives the test
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "psframe run summary" in proc.stdout
    assert "mpi x2" in proc.stdout  # both workers on other hosts: by message


@pytest.mark.timeout(200)
def test_the_torch_ddp_baseline_meets_across_hosts(cluster3, tmp_path):
    """Its ranks agree on the rendezvous before rank 0 blocks in torch's store: without that
    barrier rank 0's MPI broadcast of the address stayed unsent and the job hung."""
    pytest.importorskip("torch")
    import json

    from psframe.bench import cells

    program, out = cells.baseline_program(str(tmp_path), "torch_ddp", 2, {
        "model": "mlp:64,16,10", "data": "digits", "batch_size": 16, "steps": 5,
        "eval": False, "lr": 0.05})
    proc = run_on(cluster3, 2, program, ppn=1, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        result = json.load(f)
    assert result["stats"]["steps_per_worker"] == [5, 5]
    assert not result["config"]["rendezvous"].startswith("127.")
