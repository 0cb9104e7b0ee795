"""ps.data.NpyDataset under MPI: each worker reads only its block, and trains as in memory."""
import os
import shutil
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from mapped_memory import mapped_bytes
from psframe.data import block_range

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, N_WORKERS = WORLD.Get_rank(), WORLD.Get_size() - 1
MIB = 1 << 20
# Pages reach a mapping in folios of up to 2 MiB (fault-around, large folios): reading a
# range maps it plus at most that much at each end; a worker also reads the first rows.
SLACK = 6 * MIB


@pytest.fixture(scope="module")
def shared_dir():
    path = WORLD.bcast(tempfile.mkdtemp(prefix="psframe-npy-") if RANK == 0 else None)
    yield path
    WORLD.Barrier()
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)


def write(directory, name, X, y):
    path = os.path.join(directory, name)
    if RANK == 0:
        os.makedirs(path)
        np.save(os.path.join(path, "X.npy"), X)
        np.save(os.path.join(path, "y.npy"), y)
    WORLD.Barrier()
    return path


def blobs(n_rows, n_features, n_classes=4, seed=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_rows)
    X = rng.normal(size=(n_classes, n_features))[y] + 0.5 * rng.normal(size=(n_rows, n_features))
    return X, y


OPTIONS = dict(policy=ps.Sync(), optimizer=ps.SGD(lr=0.1, momentum=0.9), batch_size=16,
               steps=6, shuffle=False, seed=5, dtype="float64")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
@pytest.mark.mpi(min_size=3)  # with one worker its block is the whole file: nothing to bound
def test_each_worker_reads_its_block_and_trains_as_in_memory(shared_dir):
    X, y = blobs(49152, 128)  # 48 MiB of float64 features
    path = write(shared_dir, "big", X, y)
    data = ps.data.NpyDataset(path)
    x_file = os.path.join(path, "X.npy")
    result = ps.train(ps.models.MLP([128, 16, 4]), data, **OPTIONS)
    touched = WORLD.gather(mapped_bytes(x_file))
    in_memory = ps.train(ps.models.MLP([128, 16, 4]), ps.data.ArrayDataset(X, y), **OPTIONS)
    if RANK:
        assert result is None
        return
    # The server read the first rows only (its checks of their shape, one probe).
    assert touched[0] <= SLACK, touched
    for w in range(N_WORKERS):
        lo, hi = block_range(len(X), N_WORKERS, w)
        block = (hi - lo) * X.shape[1] * 8
        # Every row of its block (its share of the checks), and not the others' blocks.
        assert block <= touched[w + 1] <= block + SLACK < X.nbytes, (w, touched)
    assert set(result.params) == set(in_memory.params)
    for name, value in in_memory.params.items():
        np.testing.assert_array_equal(result.params[name], value, err_msg=name)


def expect_error(path, match, model=None):
    with pytest.raises(ps.ConfigError, match=match) as err:
        ps.train(model or ps.models.MLP([6, 8, 3]), ps.data.NpyDataset(path), steps=2)
    WORLD.Barrier()  # every rank raised: nobody is left in training
    return str(err.value)


def test_a_bad_row_in_one_block_fails_every_rank(shared_dir):
    X, y = blobs(200, 6, 3)
    X[-1, 2] = np.inf  # in the last worker's block only
    path = write(shared_dir, "nonfinite", X, y)
    lo, hi = block_range(200, N_WORKERS, N_WORKERS - 1)
    message = expect_error(path, r"training data X has 1 non-finite values")
    assert f"in rows {max(lo, 64)}..{hi - 1}" in message
    assert message.endswith(f"(on rank {N_WORKERS})")  # only the reader of those rows saw it


def test_labels_out_of_range_past_the_first_rows(shared_dir):
    X, y = blobs(200, 6, 3)
    y[150] = 7
    expect_error(write(shared_dir, "labels", X, y), r"labels must be integers in \[0, 3\)")


def test_a_feature_mismatch_reads_the_same_on_every_rank(shared_dir):
    X, y = blobs(200, 5, 3)
    message = expect_error(write(shared_dir, "features", X, y), "features")
    assert "(on rank" not in message  # every rank checks the first rows
