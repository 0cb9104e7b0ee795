"""Parameter layout: offsets, shards, frames, views."""
import numpy as np
import pytest

from psframe.params import ParamLayout

SHAPES = {"a": (3, 4), "b": (4,), "c": (10,), "d": (2,)}


def test_offsets_and_views_round_trip():
    layout = ParamLayout(SHAPES, "float64", shard_elems=8)
    assert layout.size == 28 and layout.nbytes == 28 * 8
    assert [layout.offsets[n] for n in SHAPES] == [0, 12, 16, 26]
    params = {n: np.random.default_rng(0).normal(size=s) for n, s in SHAPES.items()}
    flat = layout.flatten(params)
    views = layout.views(flat)
    for n in SHAPES:
        np.testing.assert_array_equal(views[n], params[n])
        assert np.shares_memory(views[n], flat)
    views["c"][0] = 42.0
    assert flat[16] == 42.0


def test_shards_cover_each_tensor_and_split_large_ones():
    layout = ParamLayout(SHAPES, shard_elems=8)
    # a (12) splits into 8 + 4; b, c (10 -> 8 + 2), d: one shard per tensor at least.
    assert layout.shard_bounds.tolist() == [0, 8, 12, 16, 24, 26, 28]
    for name, (lo, hi) in layout.tensor_shards.items():
        start, stop = layout.shard_range(lo, hi)
        assert (start, stop) == (layout.offsets[name], layout.offsets[name] + layout.sizes[name])
    assert all(np.diff(layout.shard_bounds) <= 8)


@pytest.mark.parametrize("shard_elems", [1, 3, 8, 100])
def test_frames_tile_the_range_without_gaps(shard_elems):
    layout = ParamLayout(SHAPES, shard_elems=shard_elems)
    for lo in range(layout.n_shards):
        for hi in range(lo + 1, layout.n_shards + 1):
            frames = layout.frames(lo, hi)
            start, stop = layout.shard_range(lo, hi)
            assert frames[0][0] == start and frames[-1][1] == stop
            assert all(a[1] == b[0] for a, b in zip(frames, frames[1:]))
            # Coalescing never builds a frame beyond the shard size unless one shard is alone.
            for a, b in frames:
                assert b - a <= shard_elems or layout.shards_of_range(a, b)[1] - layout.shards_of_range(a, b)[0] == 1


def test_small_tensors_coalesce_into_one_frame():
    layout = ParamLayout({f"t{i}": (3,) for i in range(10)}, shard_elems=1000)
    assert layout.n_shards == 10
    assert layout.frames() == [(0, 30)]


def test_flatten_checks_names_and_shapes():
    layout = ParamLayout(SHAPES)
    params = {n: np.zeros(s) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match="missing"):
        layout.flatten({k: v for k, v in params.items() if k != "b"})
    with pytest.raises(ValueError, match="shape"):
        layout.flatten(dict(params, a=np.zeros((4, 3))))


def test_bad_dtype_and_shard_size():
    with pytest.raises(ValueError, match="dtype"):
        ParamLayout(SHAPES, "float16")
    with pytest.raises(ValueError, match="shard_elems"):
        ParamLayout(SHAPES, shard_elems=0)


def test_signature_identifies_layout():
    assert ParamLayout(SHAPES).signature() == ParamLayout(dict(SHAPES)).signature()
    assert ParamLayout(SHAPES).signature() != ParamLayout(SHAPES, "float64").signature()


def test_cuts_for_servers_balance_elements_and_split_tensors():
    from psframe.params import server_ranges

    layout = ParamLayout({"W": (64, 48), "b": (48,), "V": (48, 10), "c": (10,)})
    assert layout.n_shards == 4 and layout.size == 3610
    for n in (1, 2, 3, 4, 7):
        cut = layout.cut_for(n)
        ranges = server_ranges(cut, n)
        assert ranges[0][0] == 0 and ranges[-1][1] == cut.n_shards
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
        sizes = [cut.shard_range(*r)[1] - cut.shard_range(*r)[0] for r in ranges]
        assert sum(sizes) == 3610 and max(sizes) - min(sizes) <= 1
        # The tensors are where they were: only the shard bounds changed.
        assert cut.offsets == layout.offsets and cut.size == layout.size
    assert layout.cut_for(1) is layout
    assert layout.cut_for(2).signature() != layout.signature()  # a resume must match it
    with pytest.raises(ValueError, match="too few"):
        ParamLayout({"w": (2,)}).cut_for(3)


def test_overlap_of_shard_ranges():
    from psframe.params import overlap

    assert overlap((0, 5), (3, 9)) == (3, 5)
    assert overlap((3, 9), (0, 5)) == (3, 5)
    lo, hi = overlap((0, 3), (5, 9))
    assert lo == hi and 0 <= lo <= 3


def test_shard_counts_follow_the_cuts_of_another_server_count():
    from psframe.params import recount_shards

    base = ParamLayout({"W": (64, 48), "b": (48,)}, shard_elems=1000)
    two, three = base.cut_for(2), base.cut_for(3)
    counts = np.full(two.n_shards, 7)
    assert recount_shards(counts, two, three).tolist() == [7] * three.n_shards
    assert recount_shards(counts, two, base).tolist() == [7] * base.n_shards
    uneven = counts.copy()
    uneven[0] = 6  # one shard behind the rest: no layout may put it with the others
    with pytest.raises(ValueError, match="cannot share one shard"):
        recount_shards(uneven, two, ParamLayout({"W": (64, 48), "b": (48,)}, shard_elems=4000))


def test_balance_is_the_cut_factors_and_weights_its_old_name():
    shapes = {"dense": (1000,), "table": (10_000, 10)}
    layout = ParamLayout(shapes, "float32", balance={"table": 0})
    assert layout.balance == layout.weights == {"table": 0}
    assert layout.cut_for(4).cuts == ParamLayout(shapes, weights={"table": 0}).cut_for(4).cuts
    assert ParamLayout.from_params({n: np.zeros(s) for n, s in shapes.items()},
                                   balance={"table": 0}).cut_for(4).cuts == (250, 500, 750)
    with pytest.raises(TypeError, match="balance"):
        ParamLayout(shapes, balance={"table": 0}, weights={"table": 0})


def test_the_layout_delegates_to_its_parts():
    layout = ParamLayout(SHAPES, shard_elems=8).cut_for(2)
    assert layout.offsets is layout.tensors.offsets and layout.size == layout.tensors.size
    assert layout.shard_bounds is layout.frame_plan.bounds
    assert layout.frames(0, layout.n_shards) == layout.frame_plan.frames(0, layout.n_shards)
    assert layout.cuts == layout.server_cuts.cuts == (14,)
