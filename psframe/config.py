"""Run options: one table behind the CLI flags and config files, merged flags > file > defaults."""
import json
import os
from dataclasses import dataclass

__all__ = ["Option", "OPTIONS", "defaults", "check", "load", "merge", "save"]


@dataclass(frozen=True)
class Option:
    """One run option. ``kind`` is int, float, str, bool, "floats" (a list of numbers) or
    "delays" (worker index -> seconds)."""

    kind: object
    default: object
    help: str
    choices: tuple = None

    @property
    def nullable(self):
        # An option whose default is None ("not set") may be null in a JSON config too.
        return self.default is None


# Every option of ps.train that a file or a flag can express (callbacks and comm are code,
# not configuration), plus how the CLI builds the model, data and optimizer and where it logs.
OPTIONS = {
    "model": Option(str, "mlp:784,128,10", "mlp:784,128,10 | softmax[:IN,CLASSES] | linear[:IN] "
                                           "| FILE.py:FUNC (FUNC() returns a ps.Model)"),
    "data": Option(str, "mnist", "digits | mnist | synthetic[:rows,features,classes] | FILE.npz "
                                 "(X, y, optional X_test, y_test) | FILE.csv (label column) | "
                                 "DIR of X.npy, y.npy (memory-mapped)"),
    "eval_data": Option(str, None, "evaluate on this file (same formats as data; its X_test, "
                                   "y_test if it has them, else X, y)"),
    "eval": Option(bool, True, "evaluate on the dataset's test split (or eval_data)"),
    "mode": Option(str, "data", "data, model (a pipeline of stages) or hybrid"),
    "policy": Option(str, "sync", "sync, sync:K (K backup workers), async, async:lr, ssp:S, "
                                  "mixed:STEPS[:THEN]; modifiers +raw (unweighted pushes), "
                                  "+scale=X, +dc[=LAMBDA] (delay compensation)"),
    "optimizer": Option(str, "sgd", "sgd or adam", ("sgd", "adam")),
    "lr": Option(float, None, "learning rate (default: sgd 0.1, adam 0.001)"),
    "momentum": Option(float, 0.0, "SGD momentum"),
    "nesterov": Option(bool, False, "SGD with Nesterov momentum"),
    "betas": Option("floats", (0.9, 0.999), "Adam's two betas, e.g. 0.9,0.999"),
    "eps": Option(float, 1e-8, "Adam's epsilon"),
    "weight_decay": Option(float, 0.0, "L2 weight decay"),
    "batch_size": Option(int, 32, "rows per worker step"),
    "epochs": Option(int, 1, "passes over the data"),
    "steps": Option(int, None, "steps per worker; overrides epochs"),
    "eval_every": Option(int, None, "steps between evaluations (default: once per epoch)"),
    "seed": Option(int, 0, "seed for the data split, shuffling and initial weights"),
    "dtype": Option(str, "float32", "weights' type end to end", ("float32", "float64")),
    "shuffle": Option(bool, True, "shuffle each worker's block every epoch"),
    "init": Option(str, None, "starting weights: a .npz file of name -> array"),
    "save": Option(str, None, "write the final weights to this .npz (name -> array; loads "
                              "with init)"),
    "threads": Option(int, None, "BLAS threads per rank (default: cores shared among ranks)"),
    "backend": Option(str, "auto", "worker array backend: auto, numpy or cupy (env PSFRAME_BACKEND)"),
    "shard_elems": Option(int, None, "elements per shard and per message frame (default 262144)"),
    "stages": Option(int, None, "pipeline stages (mode hybrid: stages per pipeline)"),
    "micro_batches": Option(int, 1, "micro-batches per pipeline step (modes model, hybrid)"),
    "dispatch": Option(str, "static", "static blocks per worker, or dynamic batches on request",
                       ("static", "dynamic")),
    "delay": Option("delays", None, "simulated stragglers: worker:seconds per step, e.g. 0:0.01"),
    "checkpoint_dir": Option(str, None, "write atomic checkpoints here (and at the end)"),
    "checkpoint_every": Option(int, None, "a checkpoint every K steps (needs checkpoint_dir)"),
    "checkpoint_keep": Option(int, 3, "how many of the newest checkpoints to keep"),
    "resume": Option(str, None, "continue from the newest checkpoint in DIR, or a ckpt-*.json"),
    "on_bad_gradient": Option(str, "raise", "what a non-finite gradient does", ("raise", "skip")),
    "transport": Option(str, "auto", "auto: shared memory with workers on the server's node; "
                        "mpi: every payload as a message", ("auto", "mpi")),
    "quiet": Option(bool, False, "print only the summary"),
    "progress": Option(str, "auto", "bar, lines, or auto: a bar on a terminal, else lines",
                       ("auto", "bar", "lines")),
    "log_dir": Option(str, None, "write metrics.jsonl, config.json and the summary here"),
    "log_every": Option(int, 100, "a metrics.jsonl record every N updates (0: evaluations only)"),
}


def defaults():
    return {name: opt.default for name, opt in OPTIONS.items()}


def _kind_name(opt):
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             "floats": "a list of numbers", "delays": "a table of worker index = seconds"}
    return names[opt.kind] + (" or null" if opt.nullable else "")


def _coerce(opt, value):
    """``value`` as the option's type, or None when it does not fit."""
    if value is None:
        return None
    if opt.kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):  # True is an int to Python, never a count or a rate here
        return None
    if opt.kind is int:
        return value if isinstance(value, int) else None
    if opt.kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    if opt.kind is str:
        return value if isinstance(value, str) else None
    if opt.kind == "delays":
        return _delays(value)
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        return tuple(float(v) for v in value)
    return None


def _delays(value):
    """{worker index: seconds} from a table whose keys may be strings (TOML and JSON keys are)."""
    if not isinstance(value, dict):
        return None
    out = {}
    for key, seconds in value.items():
        try:
            worker = int(key)
        except (TypeError, ValueError):
            return None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            return None
        out[worker] = float(seconds)
    return out


def check(values, source):
    """Validated options from a mapping (a parsed file); ``source`` names it in errors.

    Keys may use dashes like the flags (``batch-size``) or underscores (``batch_size``).
    """
    known = ", ".join(sorted(OPTIONS))
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            raise ValueError(f"unknown key {key!r} in {source}; known keys: {known}")
        opt = OPTIONS[name]
        if value is None and not opt.nullable:
            raise ValueError(f"key {key!r} in {source} must be {_kind_name(opt)}, got null")
        coerced = _coerce(opt, value)
        if value is not None and coerced is None:
            raise ValueError(f"key {key!r} in {source} must be {_kind_name(opt)}, got {value!r}")
        if opt.choices and coerced is not None and coerced not in opt.choices:
            raise ValueError(f"key {key!r} in {source} must be one of {opt.choices}, got {value!r}")
        out[name] = coerced
    return out


def _read_toml(path):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the same parser, from PyPI
        import tomli as tomllib
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from None


def load(path):
    """Options from a TOML file, or a JSON one (such as a saved config.json), validated."""
    try:
        if path.endswith(".json"):
            with open(path) as f:
                try:
                    values = json.load(f)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path} is not valid JSON: {exc}") from None
        else:
            values = _read_toml(path)
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a table of options, got {type(values).__name__}")
    return check(values, path)


def merge(file_values=None, cli_values=None):
    """Every option: flags given on the command line win over the file, the file over defaults."""
    merged = defaults()
    merged.update(file_values or {})
    merged.update(cli_values or {})
    return merged


def save(options, directory, name="config.json"):
    """Write the merged options as JSON (loadable again with --config); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                  f, indent=2, sort_keys=True)
        f.write("\n")
    # A reader (or a crash) never sees half a file.
    os.replace(tmp, path)
    return path
