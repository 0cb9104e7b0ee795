"""Command line: `python -m psframe train ...`, run on every rank under mpiexec."""
import argparse
import sys

__all__ = ["main", "build_parser", "parse_model", "parse_data"]


def parse_model(spec, n_features=None, n_classes=None):
    """``mlp:784,128,10``, ``softmax`` or ``softmax:64,10``, ``linear`` or ``linear:13``."""
    from . import models

    name, _, args = spec.partition(":")
    sizes = [int(s) for s in args.split(",") if s.strip()] if args else []
    if name == "mlp":
        if len(sizes) < 2:
            raise ValueError("--model mlp needs sizes, e.g. mlp:784,128,10")
        return models.MLP(sizes)
    if name == "softmax":
        n_in, n_out = sizes if sizes else (n_features, n_classes)
        return models.SoftmaxRegression(n_in, n_out)
    if name == "linear":
        return models.LinearRegression(sizes[0] if sizes else n_features)
    raise ValueError(f"unknown model {spec!r}; use mlp:SIZES, softmax[:IN,CLASSES] or linear[:IN]")


def parse_data(spec, seed=0):
    """``digits``, ``mnist`` or ``synthetic[:rows,features,classes]``; returns (train, test)."""
    from . import data

    name, _, args = spec.partition(":")
    if name == "digits":
        return data.digits(seed=seed)
    if name == "mnist":
        return data.mnist(seed=seed)
    if name == "synthetic":
        dims = [int(s) for s in args.split(",")] if args else []
        keys = ("n_rows", "n_features", "n_classes")
        return data.synthetic(seed=seed, **dict(zip(keys, dims)))
    raise ValueError(f"unknown dataset {spec!r}; use digits, mnist or synthetic[:rows,features,classes]")


def build_parser():
    parser = argparse.ArgumentParser(prog="psframe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model; launch under mpiexec -n N")
    t.add_argument("--model", default="mlp:784,128,10", help="mlp:784,128,10 | softmax | linear")
    t.add_argument("--data", default="mnist", help="digits | mnist | synthetic:rows,features,classes")
    t.add_argument("--mode", default="data", help="data (model and hybrid come later)")
    t.add_argument("--policy", default="sync", help="sync")
    t.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    t.add_argument("--lr", type=float, default=None, help="learning rate (sgd 0.1, adam 0.001)")
    t.add_argument("--momentum", type=float, default=0.0)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--steps", type=int, default=None, help="steps per worker; overrides --epochs")
    t.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    t.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    t.add_argument("--threads", type=int, default=None, help="BLAS threads per rank")
    t.add_argument("--on-bad-gradient", default="raise", choices=["raise", "skip"])
    t.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return _train(args)
    except ValueError as exc:  # ConfigError included: same message on every rank, say it once
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"psframe: error: {exc}", file=sys.stderr, flush=True)
        return 2


def _train(args):
    import psframe as ps

    train_set, test_set = parse_data(args.data, seed=args.seed)
    n_classes = int(train_set.y.max()) + 1 if train_set.y.dtype.kind in "iu" else None
    model = parse_model(args.model, train_set.n_features, n_classes)
    if args.optimizer == "sgd":
        opt = ps.SGD(lr=args.lr or 0.1, momentum=args.momentum, weight_decay=args.weight_decay)
    else:
        opt = ps.Adam(lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    result = ps.train(
        model, train_set, eval_data=test_set, mode=args.mode, policy=args.policy,
        optimizer=opt, batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
        shuffle=args.shuffle, seed=args.seed, dtype=args.dtype, eval_every=args.eval_every,
        threads=args.threads, on_bad_gradient=args.on_bad_gradient, verbose=not args.quiet,
    )
    if result is not None:
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
