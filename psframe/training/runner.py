"""`python -m psframe.training.runner SCRIPT ARGS`: a user's script as a rank of a launched job."""
import os
import runpy
import sys

from ..errors import ConfigError, TrainingInterrupted
from .launch import env_rank


def main(argv):
    """Run SCRIPT as `python SCRIPT` would. Its bad input and its clean stop become the exit
    statuses the CLI gives them (2, 130), which the supervising launcher never restarts."""
    script, *args = argv
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except ConfigError as exc:  # ps.train raises it on every rank, before any work
        if env_rank() in (0, None):
            print(f"psframe: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingInterrupted as exc:  # every rank stopped cleanly
        if env_rank() in (0, None):
            print(f"psframe: {exc}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
