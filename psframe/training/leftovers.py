"""Shared-memory files a killed MPICH job leaves in /dev/shm, removed once no process uses them."""
import glob
import os

__all__ = ["shm_files", "remove_unused"]

SHM_GLOB = "/dev/shm/mpich_shm_*"


def shm_files(pattern=SHM_GLOB):
    return set(glob.glob(pattern))


def remove_unused(before, pattern=SHM_GLOB):
    """Remove the files matching ``pattern`` that were not there ``before`` (those are none
    of this job's business) and that no process maps or holds open; return their paths.
    Without this, every restart of a killed job would leave a few MB more in /dev/shm."""
    new = shm_files(pattern) - set(before)
    if not new:
        return []
    removed = []
    for path in sorted(new - _in_use()):
        try:
            os.remove(path)
            removed.append(path)
        except OSError:  # gone already, or not ours to remove
            continue
    return removed


def _in_use():
    """Every file some process maps or holds open, as far as we may look (another user's
    processes cannot use our files, whose mode is 0600). A job creating a segment holds it
    open from its creation on, so a file in neither list is no running job's."""
    paths = set()
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(os.path.join(proc, "maps")) as f:
                paths.update(parts[5].strip() for parts in (line.split(None, 5) for line in f)
                             if len(parts) == 6)
            fds = os.listdir(os.path.join(proc, "fd"))
        except OSError:  # the process ended, or is not ours
            continue
        for fd in fds:
            try:
                paths.add(os.readlink(os.path.join(proc, "fd", fd)))
            except OSError:  # closed meanwhile
                continue
    return paths
