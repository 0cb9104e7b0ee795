"""RunOptions: every option of ps.train, typed, with its default and help, in one table.

The same table gives train() its keywords and signature, the CLI its flags, config files
their keys (psframe.training.config adds only the CLI's job options: model, data, optimizer,
logs) and TrainResult.config its settings. Adding a run option is one field here, and its
check in psframe.training.checks.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["RunOptions", "MODES", "TRANSPORTS", "DISPATCH", "BAD_GRADIENT_ACTIONS",
           "option_fields", "cli_fields", "train_signature"]

MODES = ("data", "model", "hybrid")
# "auto": workers on the server's node exchange gradients and weights through a shared-memory
# window (psframe.transport.shm), with only the int64 headers sent as messages; "mpi": all by
# message.
TRANSPORTS = ("auto", "mpi")
DISPATCH = ("static", "dynamic")
BAD_GRADIENT_ACTIONS = ("raise", "skip")


def option(default: Any, help: str, *, cli: Any = None, cli_help: Optional[str] = None,
           choices: Optional[tuple] = None, shown: bool = False) -> Any:
    """One run option. ``cli``: how a flag or config key spells it (int, float, str, bool,
    "floats", "delays"), None when only Python can give it (a dataset, an optimizer object);
    ``cli_help``: its help there, where the Python forms do not apply. ``shown``: part of
    TrainResult.config (and so of the logs), as its plain value."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices,
                                            "shown": shown, "cli_help": cli_help or help})


@dataclass(frozen=True)
class RunOptions:
    """The options of one ps.train call, as given; psframe.training.checks validates them."""

    eval_data: Any = option(None, "a ps.data.ArrayDataset or (X, y) to evaluate on")
    mode: str = option("data", "data, model (a pipeline of stages) or hybrid", cli=str,
                       shown=True)
    policy: Any = option("sync", "a ps.Policy, or a spec as the CLI takes it", cli=str,
                         cli_help="sync, sync:K (K backup workers), async, async:lr, ssp:S, "
                                  "mixed:STEPS[:THEN], hybrid[:DENSE] (embedding rows on "
                                  "arrival); modifiers +raw (unweighted pushes), "
                                  "+scale=X, +dc[=LAMBDA] (delay compensation)")
    optimizer: Any = option(None, "a psframe optimizer (default ps.SGD())")
    batch_size: int = option(32, "rows per worker step", cli=int, shown=True)
    epochs: int = option(1, "passes over the data", cli=int)
    steps: Optional[int] = option(None, "steps per worker; overrides epochs", cli=int)
    shuffle: bool = option(True, "shuffle each worker's block every epoch", cli=bool, shown=True)
    seed: int = option(0, "seed for the data split, shuffling and initial weights", cli=int,
                       shown=True)
    dtype: str = option("float32", "weights' type end to end", cli=str,
                        choices=("float32", "float64"), shown=True)
    init: Optional[Dict[str, Any]] = option(None, "starting weights: a dict name -> array")
    eval_every: Optional[int] = option(None, "steps between evaluations (default: once per "
                                             "epoch)", cli=int)
    threads: Optional[int] = option(None, "BLAS threads per rank (default: cores shared among "
                                          "ranks)", cli=int)
    backend: str = option("auto", "worker array backend: auto, numpy or cupy (env "
                                  "PSFRAME_BACKEND)", cli=str)
    shard_elems: Optional[int] = option(None, "elements per shard and per message frame "
                                              "(default 262144)", cli=int)
    dispatch: str = option("static", "static blocks per worker, or dynamic batches on request",
                           cli=str, choices=DISPATCH)
    delay: Optional[Dict[int, float]] = option(None, "simulated stragglers: worker:seconds per "
                                                     "step, e.g. 0:0.01", cli="delays")
    micro_batches: int = option(1, "micro-batches per pipeline step (modes model, hybrid)",
                                cli=int, shown=True)
    stages: Union[None, int, List[List[int]]] = option(
        None, "pipeline stages (mode hybrid: stages per pipeline), or a list of each stage's "
              "layer indices", cli=int,
        cli_help="pipeline stages (mode hybrid: stages per pipeline)")
    checkpoint_dir: Optional[str] = option(None, "write atomic checkpoints here (and at the "
                                                 "end)", cli=str)
    checkpoint_every: Optional[int] = option(None, "a checkpoint every K steps (needs "
                                                   "checkpoint_dir)", cli=int)
    checkpoint_keep: int = option(3, "how many of the newest checkpoints to keep", cli=int)
    resume: Optional[str] = option(None, "continue from the newest checkpoint in DIR, or a "
                                         "ckpt-*.json", cli=str)
    on_bad_gradient: str = option("raise", "what a non-finite gradient does", cli=str,
                                  choices=BAD_GRADIENT_ACTIONS)
    transport: str = option("auto", "auto: shared memory with workers on the server's node; "
                                    "mpi: every payload as a message", cli=str,
                            choices=TRANSPORTS)
    overlap: bool = option(False, "layer-wise overlap (P3): each layer's gradient leaves as "
                                  "backward makes it, and the next forward starts when the "
                                  "first layer's weights arrive (mode data, Sync, a "
                                  "Sequential model)", cli=bool)
    stall_timeout: Optional[float] = option(
        300.0, "seconds without progress before a rank reports what it waits for, with its "
               "stack, and ends the job (0 or None: never)", cli=float)
    stop_timeout: float = option(10.0, "seconds a clean stop after SIGINT/SIGTERM may take "
                                       "before the job aborts, saying so", cli=float)
    servers: int = option(1, "server ranks (0..S-1), each updating its range of the weights "
                             "with its own optimizer state", cli=int, shown=True)

    @classmethod
    def from_keywords(cls, options: Dict[str, Any]) -> "RunOptions":
        """The options of a train() call; an unknown name is a TypeError naming the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}; "
                            f"its options are: {', '.join(sorted(known))}")
        return cls(**options)

    def shown(self) -> Dict[str, Any]:
        """The options marked ``shown``, as plain values (for TrainResult.config)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["shown"]}


def option_fields() -> Tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunOptions)


def cli_fields() -> List[dataclasses.Field]:
    """The run options a flag or a config file can give."""
    return [f for f in option_fields() if f.metadata["cli"] is not None]


def train_signature(func) -> inspect.Signature:
    """``func``'s signature with every run option spelled out as a keyword, so that help()
    and editors show train()'s options although it takes them as ``**options``."""
    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    head = [p for p in params if p.kind is not p.KEYWORD_ONLY]
    tail = [p for p in params if p.kind is p.KEYWORD_ONLY]
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for f in option_fields()]
    return sig.replace(parameters=head + options + tail)
