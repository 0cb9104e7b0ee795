"""Row load per server of a table split by id range or by hash, under Zipf-distributed ids.

A step's work and bytes on a server are the distinct rows of the batch it holds. This counts
them for each server, per step, and prints the skew: the busiest server's rows over the
mean (1.00 is perfect balance). Two id orders: "shuffled", where an id's popularity has
nothing to do with its value (hashed feature ids, and ps.data.click_log), and "sorted", where
id 0 is the most frequent (a vocabulary numbered by frequency).

    python benchmarks/sparse_partition.py [--rows 1000000] [--batch 256] [--k 4]
"""
import argparse

import numpy as np

from psframe.sparse.placement import RowPlacement


def zipf_ranks(rng, n, s, size):
    """0-based Zipf ranks: P(r) proportional to (r + 1) ** -s."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -s)
    cdf /= cdf[-1]
    return np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n - 1)


def owner_by_range(ids, n_rows, servers):
    return ids * servers // n_rows


def owner_by_hash(ids, n_rows, servers):
    return ids % servers


def owner_by_placed_range(ids, n_rows, servers):
    """psframe's split: row ranges of the storage, where RowPlacement puts each id."""
    return RowPlacement(n_rows).position(ids) * servers // n_rows


def skew(ids_per_step, n_rows, servers, owner):
    """(mean over steps of max/mean distinct rows per server, busiest server's share)."""
    ratios, totals = [], np.zeros(servers)
    for ids in ids_per_step:
        load = np.bincount(owner(np.unique(ids), n_rows, servers), minlength=servers)
        ratios.append(load.max() / load.mean())
        totals += load
    return float(np.mean(ratios)), float(totals.max() / totals.sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--k", type=int, default=4, help="ids per sample")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--zipf", type=float, default=1.1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    perm = rng.permutation(args.rows)
    steps = [zipf_ranks(rng, args.rows, args.zipf, args.batch * args.k)
             for _ in range(args.steps)]
    print(f"{args.rows:,} rows, Zipf {args.zipf}, {args.batch} x {args.k} ids per step, "
          f"{args.steps} steps: busiest server's distinct rows / mean (its share of all)")
    print(f"{'ids':9} {'servers':>7} {'by id range':>16} {'by hash (id % S)':>18} "
          f"{'psframe (placed range)':>24}")
    for order, ids in (("shuffled", [perm[r] for r in steps]), ("sorted", steps)):
        for servers in (2, 4, 8):
            by_range = skew(ids, args.rows, servers, owner_by_range)
            by_hash = skew(ids, args.rows, servers, owner_by_hash)
            placed = skew(ids, args.rows, servers, owner_by_placed_range)
            print(f"{order:9} {servers:>7} {by_range[0]:>9.2f} ({by_range[1]:.2f}) "
                  f"{by_hash[0]:>11.2f} ({by_hash[1]:.2f}) {placed[0]:>17.2f} ({placed[1]:.2f})")


if __name__ == "__main__":
    main()
