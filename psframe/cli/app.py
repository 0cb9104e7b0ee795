"""Command line: `psframe train ...` (with -n N it starts mpiexec itself, else it is one rank),
`psframe bench ...` and `psframe report ...`."""
import argparse
import contextlib
import os
import shlex
import sys

from .. import callbacks
from .. import env as environ
from ..bench import grid as bench
from ..bench import report
from ..cluster import commands as cluster_commands
from ..errors import TrainingInterrupted
from ..training import config, launch, supervisor
from . import progress

__all__ = ["main", "build_parser", "resolve", "parse_model", "parse_data", "load_model_file",
           "save_weights"]


def is_model_file(spec):
    """``FILE.py:FUNC`` (or a bare ``FILE.py``, refused later with a hint)."""
    return spec.endswith(".py") or spec.rpartition(":")[0].endswith(".py")


def load_model_file(spec):
    """``FILE.py:FUNC``: import FILE from its path (not by module name) and return FUNC()."""
    import importlib.util

    from ..nn.models import Model

    path, _, func = spec.rpartition(":")
    if not path.endswith(".py") or not func:
        raise ValueError(f"--model {spec}: name the function that builds the model, "
                         f"e.g. {spec.rstrip(':')}:build")
    if not os.path.isfile(path):
        raise ValueError(f"model file {path} does not exist")
    name = "psframe_user_model_" + os.path.splitext(os.path.basename(path))[0]
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
    sys.modules[name] = module  # what dataclasses and pickle in the user's file look up
    # SystemExit too: a user's file that calls exit() must not end one rank alone.
    try:
        module.__spec__.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: B902 - any failure of the user's code
        raise ValueError(
            f"model file {path} failed to import: {type(exc).__name__}: {exc}") from None
    build = getattr(module, func, None)
    if not callable(build):
        raise ValueError(f"model file {path} has no function {func!r}")
    try:
        model = build()
    except (Exception, SystemExit) as exc:  # noqa: B902
        raise ValueError(f"{path}:{func}() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, Model):
        raise ValueError(f"{path}:{func}() must return a ps.Model, ps.Sequential or "
                         f"ps.TorchModel, got {type(model).__name__}")
    return model


def parse_model(spec, n_features=None, n_classes=None, data=None):
    """``mlp:784,128,10``, ``softmax`` or ``softmax:64,10``, ``linear`` or ``linear:13``,
    ``cnn`` or ``cnn:16,32``, ``dlrm`` or ``dlrm:DIM`` (sized for ``data``, a dataset of
    several inputs such as --data clicklog's)."""
    from ..nn import models

    if is_model_file(spec):  # a user's file first, then the built-in specs
        return load_model_file(spec)
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
    if name == "cnn":  # cnn, or cnn:C1,C2,... convolution channels; MNIST's shape
        return models.CNN(channels=sizes) if sizes else models.CNN()
    if name == "dlrm":
        return _dlrm(models, data, *sizes[:1])
    raise ValueError(f"unknown model {spec!r}; use mlp:SIZES, softmax[:IN,CLASSES], linear[:IN], "
                     "cnn[:CHANNELS] or dlrm[:DIM]")


def _dlrm(models, data, dim=16):
    """A DLRM for a dataset of inputs "dense" and id fields: each table as many rows as the
    dataset's ``vocab`` says (else the training data's largest id + 1)."""
    widths = getattr(data, "n_features", None)
    if not isinstance(widths, dict) or "dense" not in widths:
        raise ValueError("--model dlrm needs data of several inputs, a 'dense' one and id "
                         "fields, such as --data clicklog")
    vocab = data.vocab or {name: int(a.max()) + 1 for name, a in data.X.items()
                           if name != "dense"}
    return models.DLRM(widths["dense"], vocab, dim=dim)


def parse_data(spec, seed=0):
    """``digits``, ``mnist``, ``synthetic[:rows,features,classes]``, ``clicklog[:rows]`` or a
    file (see ps.data.from_file); returns (train, test), test None for a file with no test
    split."""
    from .. import data

    name, _, args = spec.partition(":")
    if name == "digits":
        return data.digits(seed=seed)
    if name == "mnist":
        return data.mnist(seed=seed)
    if name == "synthetic":
        dims = [int(s) for s in args.split(",")] if args else []
        keys = ("n_rows", "n_features", "n_classes")
        return data.synthetic(seed=seed, **dict(zip(keys, dims)))
    if name == "clicklog":
        rows = [int(s) for s in args.split(",")] if args else []
        return data.click_log(*rows[:1], seed=seed)
    if _looks_like_file(spec):
        return data.from_file(spec)
    raise ValueError(
        f"unknown dataset {spec!r}; use digits, mnist, synthetic[:rows,features,classes], "
        "clicklog[:rows], a .npz or .csv file, or a directory of X.npy and y.npy"
    )


def _looks_like_file(spec):
    return (os.path.exists(spec) or os.sep in spec
            or os.path.splitext(spec)[1].lower() in (".npz", ".csv", ".npy"))


def parse_eval_data(path):
    """The eval set of ``--eval-data``: the file's test split if it has one, else its X, y."""
    from .. import data

    train, test = data.from_file(path)
    return train if test is None else test


def save_weights(path, params):
    """Write name -> array as an .npz (loadable with --init), atomically: temp file, rename."""
    import zipfile

    import numpy as np

    from ..server.checkpoints import write_atomic

    def write(f):
        # The layout np.savez writes, done by hand: np.savez(f, **params) would take a
        # parameter named "file" or "allow_pickle" for its own argument.
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in params.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(value), allow_pickle=False)

    write_atomic(path, write)
    return path


def _check_save(path):
    """--save fails before training, not after it."""
    if os.path.isdir(path):
        raise ValueError(f"--save {path} is a directory; give a file, e.g. {path}/weights.npz")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"--save {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--save {path}: directory {parent} is not writable")


def _numbers(text):
    try:
        return tuple(float(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")


def _delays(text):
    try:
        pairs = (item.split(":") for item in text.split(",") if item.strip())
        return {int(w): float(s) for w, s in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker:seconds pairs such as 0:0.01,2:0.05, "
                                         f"got {text!r}")


def _add_option(group, name, opt):
    # No defaults in the parser: an option is in the namespace only when typed, so a config
    # file can fill the rest and a typed flag always wins over the file.
    flag = "--" + name.replace("_", "-")
    shown = "" if opt.default is None else f" (default: {_show(opt.default)})"
    kwargs = dict(dest=name, default=argparse.SUPPRESS, help=opt.help + shown)
    if opt.kind is bool:
        # --shuffle/--no-shuffle, --quiet/--no-quiet: either way can override a file.
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    kind = {"floats": _numbers, "delays": _delays}.get(opt.kind, opt.kind)
    group.add_argument(flag, type=kind, choices=opt.choices, metavar=name.upper(), **kwargs)


def _show(value):
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


def build_parser():
    """The parser; run options appear in the namespace only when given on the command line."""
    parser = argparse.ArgumentParser(prog="psframe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a model",
        description="Train a model. With -n N, starts N MPI ranks itself (--servers S "
                    "servers, default 1, and N-S workers); under mpiexec, each rank runs "
                    "this same command.",
    )
    run = t.add_argument_group("launch")
    run.add_argument("-n", "--nprocs", type=int, default=None, metavar="N",
                     help="start N ranks with mpiexec (when not already under MPI)")
    run.add_argument("--dry-run", action="store_true",
                     help="print the mpiexec command -n N would run, and exit")
    run.add_argument("--config", default=None, metavar="FILE",
                     help="TOML (or JSON) file of options; flags given here override it")
    opts = t.add_argument_group("run options (also config-file keys, with _ for -)")
    for name, opt in config.OPTIONS.items():
        _add_option(opts, name, opt)
    b = sub.add_parser(
        "bench", help="run a benchmark grid",
        description="Run a grid of policies x modes x workers x stragglers x workloads (and "
                    "baselines), each cell its own mpiexec job, appending one JSON record per "
                    "run; a second run resumes, skipping cells already recorded.",
    )
    bench.add_arguments(b)
    r = sub.add_parser(
        "report", help="tables and plots from bench results",
        description="Write a Markdown table (median and spread over seeds) and PNG plots from "
                    "the JSON lines of psframe bench.",
    )
    report.add_arguments(r)
    c = sub.add_parser(
        "cluster", help="a simulated cluster on this machine",
        description="Hosts as network namespaces on this machine (root and iproute2 needed), "
                    "for trying and testing multi-node jobs: up, run, status, down.",
    )
    cluster_commands.add_arguments(c)
    return parser


def resolve(args):
    """The run's options: defaults, then the --config file, then the flags typed."""
    typed = {name: getattr(args, name) for name in config.OPTIONS if hasattr(args, name)}
    from_file = config.load(args.config) if args.config else {}
    return config.merge(from_file, typed)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command != "train":
        return _tool(args)
    launching = args.nprocs is not None and not launch.under_mpi()
    try:
        if launching:  # a bad config file fails here, before any rank starts
            return _launch(args, argv, resolve(args))
        if args.dry_run:
            if _is_rank0():
                print("psframe: nothing to launch: under MPI already, or no -n N given; "
                      "without --dry-run this command trains in this process", flush=True)
            return 0
        return _run(args)
    except ValueError as exc:  # ConfigError included: same message on every rank, say it once
        if launching or _is_rank0():
            print(f"psframe: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except TrainingInterrupted as exc:  # every rank stopped cleanly after SIGINT/SIGTERM
        if _is_rank0():
            print(f"psframe: {exc}", file=sys.stderr, flush=True)
        return 130


def _tool(args):
    """bench, report and cluster: one plain process each (bench starts its own jobs)."""
    try:
        return {"bench": bench.main, "report": report.main,
                "cluster": cluster_commands.main}[args.command](args)
    except ValueError as exc:  # a bad spec or results file: one line, status 2
        print(f"psframe: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # bench has ended the running job; its records are whole
        print("psframe: interrupted; the same command resumes where this stopped",
              file=sys.stderr, flush=True)
        return 130


def _is_rank0():
    rank = launch.env_rank()
    if rank is not None:
        return rank == 0
    from mpi4py import MPI  # an MPI whose variables we do not know: ask it

    return MPI.COMM_WORLD.Get_rank() == 0


def _launch(args, argv, o):
    if args.nprocs < 2:
        raise ValueError(f"-n {args.nprocs}: psframe needs at least 2 ranks (1 server + 1 worker)")
    _check_restarts(o)
    cmd = launch.command(args.nprocs, argv)
    if args.dry_run:
        print(shlex.join(cmd), flush=True)
        return 0
    sys.stdout.flush()
    return supervisor.supervise(cmd, max_restarts=o["max_restarts"],
                                checkpoint_dir=o["checkpoint_dir"],
                                env=launch.child_env()).returncode


def _check_restarts(o):
    supervisor.check_restarts(o["max_restarts"], o["checkpoint_dir"])
    if o["max_restarts"] and not o["checkpoint_every"]:
        # Without it the only checkpoint is the last one: every restart would start over.
        raise ValueError("max_restarts needs checkpoint_every K, a checkpoint every K steps "
                         "to restart from")


def _agree(world, error):
    """Raise the first rank's error on every rank: a rank that quit alone would leave the
    others waiting for it in MPI forever (Hydra does not end a job when a rank exits 2)."""
    errors = world.allgather(error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise ValueError(message if len(failed) == len(errors) else f"{message} (on rank {rank})")


def _run(args):
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    job = error = None
    try:
        job = _prepare(resolve(args), args.nprocs, rank)
    except Exception as exc:  # noqa: B902 - every rank must hear of it, see _agree
        error = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    _agree(world, error)
    o = job["options"]
    record = (progress.worker_log(o["log_dir"], rank) if o["log_dir"] and rank
              else contextlib.nullcontext())
    with record:
        result = _train(job, rank)
    if result is not None:
        print(result.summary(), flush=True)
        if o["save"]:
            print(f"weights saved to {save_weights(o['save'], result.params)}", flush=True)
    return 0


def _check_world(nprocs):
    size = launch.env_size()
    if nprocs is not None and size is not None and size != nprocs:
        raise ValueError(f"-n {nprocs} given, but this job was started with {size} ranks")


def _optimizer(ps, o):
    def unset(key, default):  # lr and eps default per optimizer
        return default if o[key] is None else o[key]

    if o["optimizer"] == "sgd":
        return ps.SGD(lr=unset("lr", ps.SGD.DEFAULT_LR), momentum=o["momentum"],
                      weight_decay=o["weight_decay"], nesterov=o["nesterov"])
    if o["optimizer"] == "adagrad":
        return ps.Adagrad(lr=unset("lr", ps.Adagrad.DEFAULT_LR),
                          eps=unset("eps", ps.Adagrad.DEFAULT_EPS),
                          weight_decay=o["weight_decay"])
    return ps.Adam(lr=unset("lr", ps.Adam.DEFAULT_LR), betas=tuple(o["betas"]),
                   eps=unset("eps", ps.Adam.DEFAULT_EPS), weight_decay=o["weight_decay"])


def _init(path):
    if path is None:
        return None
    import numpy as np

    # allow_pickle=False: loading weights must never run code from the file.
    try:
        with np.load(path, allow_pickle=False) as f:
            return {name: f[name] for name in f.files}
    except OSError as exc:
        raise ValueError(f"cannot read init weights {path}: {exc}") from None


def _prepare(o, nprocs, rank):
    """Everything that can fail before training: data, model, optimizer, weights, log dir."""
    import psframe as ps

    _check_world(nprocs)
    if o["max_restarts"] and not environ.launched():
        raise ValueError("max_restarts needs psframe to start the job (psframe train -n N): "
                         "under mpiexec or srun there is no launcher to restart it")
    if o["log_every"] < 0:
        raise ValueError(f"log_every must be >= 0, got {o['log_every']}")
    if o["log_dir"]:
        os.makedirs(o["log_dir"], exist_ok=True)
        if rank == 0:
            config.save(o, o["log_dir"])
    if o["save"] and rank == 0:  # only rank 0 writes it
        _check_save(o["save"])
    train_set, test_set = parse_data(o["data"], seed=o["seed"])
    if o["eval_data"]:
        test_set = parse_eval_data(o["eval_data"])
    # A model file needs no class count: skip reading every label (a memmap's, too).
    n_classes = (int(train_set.y.max()) + 1 if train_set.y.dtype.kind in "iu"
                 and not is_model_file(o["model"]) else None)
    return {
        "options": o, "train": train_set, "test": test_set if o["eval"] else None,
        "model": parse_model(o["model"], train_set.n_features, n_classes, data=train_set),
        "optimizer": _optimizer(ps, o), "init": _init(o["init"]),
    }


def _callbacks(o, n_rows):
    hooks = []
    mode = progress.display_mode(o["progress"], o["quiet"])
    if mode == "bar":
        hooks.append(progress.ProgressBar(n_rows=n_rows, batch_size=o["batch_size"],
                                          dispatch=o["dispatch"]))
    elif mode == "lines":
        hooks.append(callbacks.PrintProgress())
    if o["log_dir"]:
        hooks.append(progress.MetricsLog(o["log_dir"], every=o["log_every"], n_rows=n_rows,
                                         batch_size=o["batch_size"], dispatch=o["dispatch"]))
    return hooks


def _train(job, rank):
    import psframe as ps

    o = job["options"]
    return ps.train(
        job["model"], job["train"], eval_data=job["test"], optimizer=job["optimizer"],
        init=job["init"], callbacks=_callbacks(o, len(job["train"])) if rank == 0 else None,
        **{name: o[name] for name in config.RUN_OPTIONS},
    )


if __name__ == "__main__":
    sys.exit(main())
