"""The redesign's contracts: one option table, declared capabilities, env vars in one place."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import re
import subprocess
import sys

import pytest

import psframe as ps
from psframe import env
from psframe.cli import app
from psframe.policies import PushDecision
from psframe.training import RunOptions, config
from psframe.training.options import cli_fields

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_signature_lists_every_run_option():
    params = inspect.signature(ps.train).parameters
    for f in dataclasses.fields(RunOptions):
        assert f.name in params, f.name
        assert params[f.name].default == f.default, f.name
    assert list(params)[:2] == ["model", "data"]


def test_every_cli_run_option_is_a_flag_a_config_key_and_passed_to_train():
    parser = app.build_parser()
    train_cmd = next(a for a in parser._subparsers._group_actions[0].choices.values()
                     if a.prog.endswith("train"))
    dests = {a.dest for a in train_cmd._actions}
    for f in cli_fields():
        assert f.name in config.OPTIONS, f.name
        assert config.OPTIONS[f.name].default == f.default, f.name
        assert f.name in dests, f.name
    assert set(config.RUN_OPTIONS) == {f.name for f in cli_fields()}


def test_options_marked_shown_reach_the_result_config_keys():
    shown = set(RunOptions().shown())
    assert shown == {"mode", "batch_size", "shuffle", "seed", "dtype", "micro_batches", "servers"}


def test_an_unknown_option_names_the_known_ones():
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'.*batch_size"):
        RunOptions.from_keywords({"learning_rate": 0.1})


def test_the_default_learning_rate_has_one_source():
    assert ps.SGD().lr == ps.SGD.DEFAULT_LR == 0.1
    assert ps.Adam().lr == ps.Adam.DEFAULT_LR == 1e-3
    assert f"sgd {ps.SGD.DEFAULT_LR:g}" in config.OPTIONS["lr"].help


@pytest.mark.parametrize("policy, lockstep", [
    (ps.Sync(), True), (ps.Sync(backup=1), False), (ps.Async(), False), (ps.SSP(0), False),
    (ps.Mixed(sync_steps=3), False), (ps.Policy(), False),
])
def test_policies_declare_lockstep(policy, lockstep):
    assert policy.lockstep is lockstep


def test_a_subclass_keeps_what_it_declares():
    class Mine(ps.Sync):
        lockstep = False

    assert ps.Sync().lockstep and not Mine().lockstep


def test_push_decision_constructors_set_the_flags_the_server_reads():
    assert PushDecision.gather((1,)) == PushDecision(accumulate=True, release=(1,))
    assert PushDecision.step(0.5, 0.25) == PushDecision(accumulate=True, complete=True,
                                                        scale=0.5, weight=0.25)
    assert PushDecision.apply_now(0.5, 3) == PushDecision(apply=True, weight=0.5, staleness=3)
    assert PushDecision.discard() == PushDecision(drop=True)
    assert PushDecision.nothing([2, 0]) == PushDecision(release=(2, 0))


def test_mpiexec_args_are_split_as_a_shell_would():
    environ = {env.MPIEXEC_ARGS: "-genv NAME 'a b' -bind-to core"}
    assert env.mpiexec_args(environ) == ["-genv", "NAME", "a b", "-bind-to", "core"]
    assert env.mpiexec_args({}) == []


def test_psframe_variables_are_read_only_in_env_py():
    reads = re.compile(r"environ(\.get)?\s*[\[(]\s*[\"']PSFRAME_")
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "psframe")):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and path != os.path.join(ROOT, "psframe", "env.py"):
                with open(path) as f:
                    if reads.search(f.read()):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_importing_psframe_starts_no_mpi():
    code = ("import sys, psframe, psframe.cli, psframe.training.launch; "
            "print('mpi4py.MPI' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


# Below the transport only the transport talks to MPI: these folders and the foundation
# modules (every psframe/*.py but the package's entry points) import no mpi4py, not even
# inside a function.
BELOW_TRANSPORT = ("server", "worker", "sparse", "policies", "nn")
ENTRY_POINTS = ("__init__.py", "__main__.py")


def _modules_below_transport() -> list[str]:
    """Paths, relative to the checkout, of every module the mpi4py rule covers."""
    package = os.path.join(ROOT, "psframe")
    paths = [os.path.join(package, name) for name in sorted(os.listdir(package))
             if name.endswith(".py") and name not in ENTRY_POINTS]
    for layer in BELOW_TRANSPORT:
        for folder, _, files in os.walk(os.path.join(package, layer)):
            paths += [os.path.join(folder, name) for name in sorted(files) if name.endswith(".py")]
    return [os.path.relpath(path, ROOT) for path in paths]


def _mpi4py_imports(relpath: str) -> list[int]:
    """Lines of ``relpath`` that import mpi4py or one of its modules, at any depth."""
    with open(os.path.join(ROOT, relpath)) as f:
        tree = ast.parse(f.read(), filename=relpath)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        if any(name == "mpi4py" or name.startswith("mpi4py.") for name in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_mpi4py_below_transport():
    modules = _modules_below_transport()
    assert "psframe/backend.py" in modules and "psframe/server/orders.py" in modules
    offenders = [f"{path}:{line}" for path in modules for line in _mpi4py_imports(path)]
    assert offenders == [], "mpi4py imported below the transport layer:\n" + "\n".join(offenders)


def test_bench_baselines_are_installed_with_the_package():
    from psframe.bench import cells

    for system in cells.BASELINES:
        assert os.path.isfile(cells.baseline_script(system)), system
    assert os.path.dirname(cells.baselines_dir()) == os.path.dirname(cells.__file__)


def test_a_mixed_phase_cannot_be_mixed_in_a_spec_either():
    with pytest.raises(ValueError, match="Mixed phases cannot themselves be Mixed"):
        ps.policies.policy_from_spec("mixed:100:mixed:5")


def test_policies_written_before_count_push_was_public_still_count():
    state = ps.Async().state(2)
    state._count_push(1, 0)
    assert state.clocks == [0, 1]


def test_a_model_says_whether_its_labels_are_classes():
    assert ps.models.MLP([3, 4, 2]).classification
    assert not ps.models.LinearRegression(3).classification

    class Custom(ps.Model):
        def __init__(self):
            self.classification = True

    class Declared(ps.Model):
        classification = True

    assert Custom().classification and Declared().classification
    assert not ps.Model().classification
