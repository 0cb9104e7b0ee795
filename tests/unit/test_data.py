"""Data sharding and batch streams follow the documented contract exactly."""
import numpy as np
import pytest

import psframe as ps
from psframe.data import BatchStream, steps_per_epoch, worker_block


def test_blocks_are_array_split():
    for n_rows, n_workers in [(10, 3), (7, 7), (1797, 4)]:
        blocks = [worker_block(n_rows, n_workers, w) for w in range(n_workers)]
        expected = np.array_split(np.arange(n_rows), n_workers)
        for got, want in zip(blocks, expected):
            np.testing.assert_array_equal(got, want)


def test_unshuffled_stream_wraps_around_the_block():
    block = np.arange(20, 27)
    stream = BatchStream(block, 3, shuffle=False, seed=0, worker=0)
    for t in range(10):
        np.testing.assert_array_equal(stream.rows(t), block[(t * 3 + np.arange(3)) % 7])


def test_shuffled_stream_visits_each_row_once_per_pass():
    block = np.arange(100, 130)
    stream = BatchStream(block, 5, shuffle=True, seed=7, worker=2)
    rows = np.concatenate([stream.rows(t) for t in range(12)])  # two passes of 30 rows
    assert sorted(rows[:30]) == list(block) and sorted(rows[30:]) == list(block)
    assert not np.array_equal(rows[:30], rows[30:])
    again = BatchStream(block, 5, shuffle=True, seed=7, worker=2)
    np.testing.assert_array_equal(again.rows(7), stream.rows(7))
    other = BatchStream(block, 5, shuffle=True, seed=7, worker=3)
    assert not np.array_equal(other.rows(0), stream.rows(0))


def test_batch_larger_than_block_spans_passes():
    stream = BatchStream(np.arange(4), 10, shuffle=True, seed=0, worker=0)
    rows = stream.rows(0)
    assert len(rows) == 10 and sorted(rows[:4]) == [0, 1, 2, 3]


def test_steps_per_epoch():
    assert steps_per_epoch(100, 3, 10) == 4  # the largest block has 34 rows
    assert steps_per_epoch(5, 5, 32) == 1


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="2-D"):
        ps.data.ArrayDataset(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="one entry per row"):
        ps.data.ArrayDataset(np.zeros((5, 2)), np.zeros(4))
    d = ps.data.ArrayDataset(np.array([[1.0, np.nan]]), np.array([0]))
    with pytest.raises(ValueError, match="non-finite"):
        d.check_finite()


def test_digits_and_synthetic_shapes():
    train, test = ps.data.digits(test_fraction=0.25, seed=0)
    assert train.n_features == 64 and len(train) + len(test) == 1797
    assert 0.0 <= train.X.min() and train.X.max() <= 1.0
    assert set(np.unique(train.y)) == set(range(10))
    a, _ = ps.data.synthetic(n_rows=50, n_features=3, n_classes=2, seed=1)
    b, _ = ps.data.synthetic(n_rows=50, n_features=3, n_classes=2, seed=1)
    np.testing.assert_array_equal(a.X, b.X)


def test_mnist_subset_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PSFRAME_CACHE", str(tmp_path))
    train, test = ps.data.mnist(seed=0)
    assert train.n_features == 784 and len(train) + len(test) == 5000
    assert train.X.max() <= 1.0 and set(np.unique(test.y)) == set(range(10))
    assert (tmp_path / "mnist5k_X.npy").exists()
    train2, _ = ps.data.mnist(seed=0)
    np.testing.assert_array_equal(train.X, train2.X)


@pytest.mark.parametrize("batch", [1, 3, 7, 11, 25])
def test_stream_rows_follow_the_contract_step_by_step(batch):
    """The slice fast path and the wrapping path give the formula's rows, shuffled or not."""
    block = np.arange(100, 111)  # 11 rows
    plain = BatchStream(block, batch, shuffle=False, seed=0, worker=0)
    mixed = BatchStream(block, batch, shuffle=True, seed=3, worker=1)
    for t in range(40):
        positions = t * batch + np.arange(batch)
        np.testing.assert_array_equal(plain.rows(t), block[positions % len(block)])
        orders = [mixed._order(int(e)) for e in positions // len(block)]
        expected = [o[p % len(block)] for o, p in zip(orders, positions)]
        np.testing.assert_array_equal(mixed.rows(t), expected)
