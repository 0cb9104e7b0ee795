"""Running jobs on the test cluster: the checkout on PYTHONPATH, output captured."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_on(cluster, n, program, ppn=None, timeout=240, env=None):
    """A job across the cluster, its output captured."""
    return cluster.run(n, program, ppn=ppn, timeout=timeout, capture_output=True, text=True,
                       env_extra={"PYTHONPATH": ROOT, **(env or {})}, cwd=ROOT)
