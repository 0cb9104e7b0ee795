"""Serial baseline: one process, the same MLP, data and SGD, a plain NumPy training loop."""
import sys
import time

import numpy as np

import common
from mlp import MLP, SGD


def main(argv):
    options, _, _, out = common.load_spec(argv)
    sizes = common.mlp_sizes(options)
    X, y, X_test, y_test = common.load_data(options)
    threads, limit = common.thread_limit(options, ranks_here=1)
    model = MLP(sizes, options["dtype"])
    w = model.init(np.random.default_rng(options["seed"]))
    g = np.empty_like(w)
    opt = SGD(model.size, w.dtype, options["lr"], options["momentum"],
              options["weight_decay"], options["nesterov"])
    b = options["batch_size"]
    shard = common.Shard(len(X), 1, 0, b, options["shuffle"], options["seed"])
    steps = common.total_steps(options, len(X), 1)
    evaluate = (lambda: model.evaluate(w, X_test, y_test)) if options["eval"] else None
    history = common.History(evaluate, options["eval_every"],
                             common.steps_per_epoch(len(X), 1, b) * b)
    with limit:
        history.start()
        for t in range(steps):
            rows = shard.rows(t)
            loss = model.loss_and_grad(w, X[rows], y[rows], g)
            opt.step(w, g)
            history.step(t + 1, (t + 1) * b, loss, b)
        wall = time.perf_counter() - history.t0
        history.record(steps, steps * b)
    stats = {"wall_s": wall, "samples": steps * b, "samples_per_s": steps * b / wall,
             "updates_applied": steps, "steps_per_worker": [steps], "n_workers": 1,
             "n_params": model.size}
    common.write_result(out, stats, history.rows, {"threads": threads, "sizes": sizes})


if __name__ == "__main__":
    main(sys.argv)
