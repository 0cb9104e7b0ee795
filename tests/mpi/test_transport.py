"""The shared-memory path against the message path and serial SGD: which workers use it, and
that every way of using it (reading the server's weights, or a copy of them) is exact."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
import psframe.transport.shm
from serial_reference import SerialSGD, mlp_init, mlp_loss_and_grad, serial_sync

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
SIZES = [6, 9, 7, 3]


def blobs(n_rows=83, seed=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    return rng.normal(size=(3, 6))[y] + 0.7 * rng.normal(size=(n_rows, 6)), y


class CopyingSync(ps.Sync):
    """Sync's steps, but not declared lockstep: workers get their own copy of the weights
    instead of reading the server's (only a lockstep policy's may), so the copy path is checked
    against serial SGD at every world size."""

    lockstep = False


def run_and_compare(policy, transport, steps=8, batch=6):
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(7))
    result = ps.train(ps.models.MLP(SIZES), (X, y), policy=policy, transport=transport,
                      optimizer=ps.SGD(lr=0.3, momentum=0.9), batch_size=batch, steps=steps,
                      shuffle=True, seed=3, dtype="float64", init=init)
    if WORLD.Get_rank():
        assert result is None
        return None
    expected = serial_sync(lambda p, a, b: mlp_loss_and_grad(p, a, b, len(SIZES) - 1), init,
                           X, y, N_WORKERS, batch, steps, SerialSGD(0.3, 0.9), shuffle=True,
                           seed=3)
    for k in expected:
        np.testing.assert_allclose(result.params[k], expected[k], rtol=1e-10, atol=1e-10,
                                   err_msg=k)
    return result


def paths_expected(result, path):
    """``path`` for NumPy workers; GPU workers (PSFRAME_BACKEND=cupy) always use messages."""
    return [path if b["backend"] == "numpy" else "mpi" for b in result.stats["worker_backends"]]


def test_sync_workers_read_the_servers_weights():
    result = run_and_compare(ps.Sync(), "auto")
    if result is not None:
        assert result.stats["worker_transport"] == paths_expected(result, "shared-read")


def test_other_policies_get_a_copy_and_stay_exact():
    result = run_and_compare(CopyingSync(), "auto")
    if result is not None:
        assert result.stats["worker_transport"] == paths_expected(result, "shared-copy")


def test_transport_mpi_sends_every_payload():
    result = run_and_compare(ps.Sync(), "mpi")
    if result is not None:
        assert result.stats["worker_transport"] == ["mpi"] * N_WORKERS


@pytest.mark.mpi(min_size=2)
def test_async_one_worker_copy_path_equals_serial():
    if N_WORKERS != 1:
        pytest.skip("Async is deterministic with one worker only")
    result = run_and_compare(ps.Async(), "auto")
    assert result is None or result.stats["worker_transport"] == paths_expected(result,
                                                                                 "shared-copy")


def test_no_room_in_shared_memory_falls_back_to_messages(monkeypatch):
    monkeypatch.setattr(psframe.transport.shm, "_shm_free_bytes", lambda: 0)
    result = run_and_compare(ps.Sync(), "auto")
    if result is not None:
        assert result.stats["worker_transport"] == ["mpi"] * N_WORKERS


def test_workers_cannot_write_the_servers_weights():
    # A model writing into its parameters would change every worker's weights under
    # shared-read; the arrays are read-only, so it fails loudly instead (checked in-process:
    # the worker-side views are what a model receives).
    X, y = blobs()
    seen = []

    class Peek(ps.models.MLP):
        def loss_and_grad(self, params, Xb, yb):
            if len(Xb) == 6:  # a training batch, not the start-up probe
                on_host = all(isinstance(v, np.ndarray) for v in params.values())
                seen.append((on_host, all(not v.flags.writeable
                                          for v in params.values()) if on_host else None))
            return super().loss_and_grad(params, Xb, yb)

    ps.train(Peek(SIZES), (X, y), batch_size=6, steps=2, transport="auto")
    if WORLD.Get_rank():
        assert seen  # every worker trained
        # NumPy workers compute on the server's weights, read-only; a GPU worker computes on
        # its own device copy (PSFRAME_BACKEND=cupy), which is its own to write.
        assert all(read_only for on_host, read_only in seen if on_host)


def test_unknown_transport_is_refused():
    with pytest.raises(ps.ConfigError, match="transport must be one of"):
        ps.train(ps.models.MLP(SIZES), blobs(), transport="tcp")
