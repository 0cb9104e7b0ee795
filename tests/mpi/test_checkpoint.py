"""Checkpoints: an interrupted and resumed Sync run ends exactly where an uninterrupted one does."""
import glob
import os

import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from psframe.server.checkpoints import load_checkpoint

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD


@pytest.fixture
def shared_dir(tmp_path):
    """One directory for all ranks: rank 0's tmp_path, broadcast."""
    return WORLD.bcast(str(tmp_path) if WORLD.Get_rank() == 0 else None)


def data():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 90)
    return rng.normal(size=(3, 5))[y] + rng.normal(size=(90, 5)), y


def run(**kw):
    return ps.train(ps.models.MLP([5, 12, 3]), data(), batch_size=4, steps=10, seed=3,
                    dtype="float64", **kw)


@pytest.mark.parametrize("optimizer", [ps.SGD(lr=0.1, momentum=0.9), ps.Adam(lr=0.01)],
                         ids=["sgd", "adam"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_from_first_checkpoint_ends_with_the_same_weights(shared_dir, optimizer, shuffle):
    full = run(optimizer=optimizer, shuffle=shuffle, checkpoint_dir=shared_dir,
               checkpoint_every=4, checkpoint_keep=5)
    first = os.path.join(shared_dir, "ckpt-00000004.json")
    WORLD.Barrier()
    resumed = run(optimizer=optimizer, shuffle=shuffle, resume=first)
    if WORLD.Get_rank():
        return
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k], err_msg=k)
    assert resumed.stats["updates_applied"] == 10 - 4
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    manifests = sorted(os.path.basename(p) for p in glob.glob(os.path.join(shared_dir, "*.json")))
    assert manifests == ["ckpt-00000004.json", "ckpt-00000008.json", "ckpt-00000010.json"]


def test_only_the_last_few_checkpoints_are_kept(shared_dir):
    run(optimizer=ps.SGD(lr=0.1), checkpoint_dir=shared_dir, checkpoint_every=1, checkpoint_keep=2)
    if WORLD.Get_rank() == 0:
        names = sorted(os.listdir(shared_dir))
        assert names == ["ckpt-00000009.json", "ckpt-00000009.npz",
                         "ckpt-00000010.json", "ckpt-00000010.npz"]
        manifest, arrays = load_checkpoint(shared_dir)
        assert manifest["version"] == 10 and arrays["weights"].dtype == np.float64


def refused(match, **kw):
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(kw.pop("model", ps.models.MLP([5, 12, 3])), data(), batch_size=4, steps=10,
                 seed=3, **kw)
    WORLD.Barrier()


def test_resume_with_another_model_or_dtype_is_refused(shared_dir):
    run(optimizer=ps.SGD(lr=0.1), checkpoint_dir=shared_dir, checkpoint_every=5)
    refused("different model layout", resume=shared_dir, dtype="float64",
            model=ps.models.MLP([5, 7, 3]))
    refused("different model layout", resume=shared_dir, dtype="float32")
    refused("optimizer", resume=shared_dir, dtype="float64", optimizer=ps.Adam())


def test_corrupt_checkpoint_is_refused_and_an_earlier_one_offered(shared_dir):
    run(optimizer=ps.SGD(lr=0.1), checkpoint_dir=shared_dir, checkpoint_every=5)
    if WORLD.Get_rank() == 0:
        newest = os.path.join(shared_dir, "ckpt-00000010.npz")
        with open(newest, "r+b") as f:
            f.truncate(os.path.getsize(newest) // 2)
    WORLD.Barrier()
    refused("corrupt or truncated.*ckpt-00000005.json", resume=shared_dir, dtype="float64",
            optimizer=ps.SGD(lr=0.1))


def test_checkpoint_options_are_checked(shared_dir):
    refused("checkpoint_every needs checkpoint_dir", checkpoint_every=3)
    refused("dispatch='static'", checkpoint_dir=shared_dir, dispatch="dynamic")
    refused("no checkpoint", resume=os.path.join(shared_dir, "nothing-here"))
