"""The environment a launch test starts its children in: no inherited MPI or psframe state."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def clean_env(**extra):
    """This environment minus any MPI or psframe launch state, so children start afresh."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "PSFRAME_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env
