"""Row-sparse bookkeeping without MPI: placement, server row ranges, batch ids, the ids wire."""
import numpy as np
import pytest

import psframe as ps
from psframe.params import ParamLayout, server_ranges
from psframe.sparse import batch_ids, sparse_tables
from psframe.sparse.placement import RowPlacement
from psframe.sparse.worker_rows import ids_message


@pytest.mark.parametrize("n", [1, 2, 3, 40, 1024, 999_983])
def test_placement_is_a_bijection_and_round_trips(n):
    p = RowPlacement(n)
    assert np.array_equal(np.sort(p.position(np.arange(n))), np.arange(n))
    table = np.random.default_rng(0).normal(size=(n, 2))
    np.testing.assert_array_equal(p.from_storage(p.to_storage(table)), table)


def test_placement_spreads_a_frequency_sorted_vocabulary_over_row_ranges():
    n, servers = 100_000, 4
    hot = np.arange(1000)  # the most frequent ids of a vocabulary numbered by frequency
    owner = RowPlacement(n).position(hot) * servers // n
    counts = np.bincount(owner, minlength=servers)
    assert counts.max() / counts.mean() < 1.1  # by raw id range: all 1000 on server 0


def model(rows=40, dim=3):
    return ps.Sequential([ps.layers.Embedding(rows, dim, "sum"), ps.layers.Dense(dim, 2)],
                         ps.losses.SoftmaxCrossEntropy())


def layout_for(m, servers=1):
    params = m.init_params(np.random.default_rng(0))
    params = {**{k: v for k, v in params.items() if k != "0.W"}, "0.W": params["0.W"]}
    layout = ParamLayout.from_params(params, "float64", shard_elems=16)
    layout.weights = {"0.W": 0}
    return layout.cut_for(servers)


def test_servers_split_the_dense_weights_by_range_and_every_table_by_rows():
    layout = layout_for(model(), servers=3)
    tables = sparse_tables(model(), layout, np.zeros((5, 4), np.int64), batch_size=8,
                           n_servers=3)
    assert tables.names == ["0.W"] and tables.dense_shards[0] == 0
    # The dense weights (3 x 2 + 2 = 8) by range; the cuts never fall in the table.
    assert all(0 < c <= tables.dense_end for c in layout.cuts)
    ranges = [layout.shard_range(*r) for r in server_ranges(layout, 3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == layout.size
    # Each server a block of the table's 40 rows, in order, covering it.
    blocks = [b["0.W"] for b in tables.row_blocks]
    assert blocks == [(0, 13), (13, 26), (26, 40)]
    assert tables.capacity["0.W"] == 32  # 8 samples x 4 ids, under the table's 40 rows
    # Each server's rows lie in its own region of the shared segments, inside the tables'.
    room = [min(32, hi - lo) * 3 for lo, hi in blocks]
    assert tables.bases == [tables.dense_end, tables.dense_end + room[0],
                            tables.dense_end + room[0] + room[1]]
    assert tables.bases[-1] + room[-1] <= layout.size


def test_batch_ids_remap_to_the_compact_table():
    m = model()
    layout = layout_for(m)
    tables = sparse_tables(m, layout, np.zeros((1, 4), np.int64), batch_size=4)
    X = np.array([[3, 3, 7, 0], [7, 9, 9, 9]])
    ids = batch_ids(tables, X)
    placed = tables.placement["0.W"].position(X)
    assert np.array_equal(ids.unique["0.W"], np.unique(placed))
    # The compact table's rows, looked up by the remapped ids, are the placed rows.
    assert np.array_equal(ids.unique["0.W"][ids.X], placed)


def test_the_ids_message_lists_counts_then_push_then_pull_ids():
    out = np.zeros(16, np.int64)
    n = ids_message(out, ["a", "b"], {"a": np.array([1, 4]), "b": np.array([2])},
                    {"a": np.array([5]), "b": np.array([], np.int64)})
    assert out[:n].tolist() == [2, 1, 1, 0, 1, 4, 2, 5]
    assert ids_message(out, ["a", "b"], None, {"a": np.array([3]), "b": np.array([6])}) == 6


def test_weighted_cuts_split_only_what_counts():
    shapes = {"dense": (1000,), "table": (10_000, 10)}
    layout = ParamLayout(shapes, "float32", weights={"table": 0})
    assert list(layout.cut_for(4).cuts) == [250, 500, 750]
    assert ParamLayout(shapes, "float32").cut_for(2).cuts[0] == 50_500  # every element
    with pytest.raises(ValueError, match="1000 weights to split by range"):
        layout.cut_for(1001)
