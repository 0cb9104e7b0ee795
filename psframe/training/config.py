"""Job options (`psframe train` flags, config files): RunOptions plus how a job names its model,
data and optimizer and where it logs; merged flags > file > defaults."""
import json
import os
from dataclasses import dataclass
from typing import Optional

from ..nn.optim import SGD, Adagrad, Adam
from .options import cli_fields

__all__ = ["Option", "OPTIONS", "RUN_OPTIONS", "defaults", "check", "load", "merge", "save"]


@dataclass(frozen=True)
class Option:
    """One run option. ``kind`` is int, float, str, bool, "floats" (a list of numbers) or
    "delays" (worker index -> seconds)."""

    kind: object
    default: object
    help: str
    choices: Optional[tuple] = None

    @property
    def nullable(self):
        # An option whose default is None ("not set") may be null in a JSON config too.
        return self.default is None


# The CLI's own options: how it builds the model, data and optimizer, and where it logs.
# Every run option of ps.train that a flag or a file can give joins them from RunOptions.
_CLI_OPTIONS = {
    "model": Option(str, "mlp:784,128,10", "mlp:784,128,10 | softmax[:IN,CLASSES] | linear[:IN] "
                                           "| cnn[:CHANNELS] | dlrm[:DIM] (for clicklog) "
                                           "| FILE.py:FUNC (FUNC() returns a ps.Model)"),
    "data": Option(str, "mnist", "digits | mnist | synthetic[:rows,features,classes] | "
                                 "clicklog[:rows] (Zipf ids, dense features) | FILE.npz "
                                 "(X, y, optional X_test, y_test) | FILE.csv (label column) | "
                                 "DIR of X.npy, y.npy (memory-mapped)"),
    "eval_data": Option(str, None, "evaluate on this file (same formats as data; its X_test, "
                                   "y_test if it has them, else X, y)"),
    "eval": Option(bool, True, "evaluate on the dataset's test split (or eval_data)"),
    "optimizer": Option(str, "sgd", "sgd, adam or adagrad", ("sgd", "adam", "adagrad")),
    "lr": Option(float, None, f"learning rate (default: sgd {SGD.DEFAULT_LR:g}, "
                              f"adam {Adam.DEFAULT_LR:g}, adagrad {Adagrad.DEFAULT_LR:g})"),
    "momentum": Option(float, 0.0, "SGD momentum"),
    "nesterov": Option(bool, False, "SGD with Nesterov momentum"),
    "betas": Option("floats", (0.9, 0.999), "Adam's two betas, e.g. 0.9,0.999"),
    "eps": Option(float, None, f"epsilon of Adam (default {Adam.DEFAULT_EPS:g}) or Adagrad "
                               f"(default {Adagrad.DEFAULT_EPS:g})"),
    "weight_decay": Option(float, 0.0, "L2 weight decay"),
    "init": Option(str, None, "starting weights: a .npz file of name -> array"),
    "save": Option(str, None, "write the final weights to this .npz (name -> array; loads "
                              "with init)"),
    "quiet": Option(bool, False, "print only the summary"),
    "progress": Option(str, "auto", "bar, lines, or auto: a bar on a terminal, else lines",
                       ("auto", "bar", "lines")),
    "log_dir": Option(str, None, "write metrics.jsonl, config.json and the summary here"),
    "log_every": Option(int, 100, "a metrics.jsonl record every N updates (0: evaluations only)"),
    "max_restarts": Option(int, 0, "with -n N: when the job dies, start it again from its "
                                   "newest checkpoint, up to K times (needs checkpoint_dir and "
                                   "checkpoint_every)"),
}

# The run options the CLI passes to ps.train as they are (eval_data and init are read from
# the files the CLI options name; optimizer is built from its name and settings).
RUN_OPTIONS = tuple(f.name for f in cli_fields())

OPTIONS = {**_CLI_OPTIONS, **{
    f.name: Option(f.metadata["cli"], f.default, f.metadata["cli_help"], f.metadata["choices"])
    for f in cli_fields()
}}


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
