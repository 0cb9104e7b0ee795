"""A simulated cluster for the tests that need several hosts; made once, removed at the end."""
import os

import pytest

from psframe import cluster as psc
from psframe.cluster import netns


# What a kernel or container without network namespaces for us says; anything else fails.
_NOT_HERE = ("Operation not permitted", "Permission denied", "not supported")


def _unavailable():
    """Why this machine cannot make a cluster, or None."""
    try:
        netns.require(bandwidth=True)
    except psc.ClusterError as exc:
        return str(exc)
    probe = f"psf-probe{os.getpid() % 10000}"
    try:
        netns.add_namespace(probe)
    except psc.ClusterError as exc:
        if any(s in str(exc) for s in _NOT_HERE):
            return f"network namespaces are not available here: {exc}"
        raise
    finally:
        netns.delete_namespace(probe)
    return None


@pytest.fixture(scope="session")
def cluster_available():
    reason = _unavailable()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def cluster3(cluster_available):
    """Three hosts, unshaped, for the whole session; removed however the tests end."""
    c = psc.up(3, owner_pid=os.getpid())
    try:
        yield c
    finally:
        c.down()
