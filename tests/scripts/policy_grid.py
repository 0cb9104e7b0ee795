"""One row of the policy grid: every policy at one worker count, SGD and Adam as tuned for Sync.

Run under mpiexec; rank 0 prints one line, ``GRID {json}``: the mean final test accuracy over
the seeds of each (optimizer, policy), plus one raw (unweighted) Async run to show the default
is what makes the difference. Arguments: EPOCHS SEEDS [dc], where ``dc`` adds the
delay-compensated rows (docs/policies.md measures them; the test leaves them out).
"""
import json
import statistics
import sys

from mpi4py import MPI

import psframe as ps

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 25
SEEDS = range(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
WITH_DC = len(sys.argv) > 3 and sys.argv[3] == "dc"

POLICIES = {
    "sync": ps.Sync,
    "async": ps.Async,
    "ssp2": lambda: ps.SSP(2),
    "mixed": lambda: ps.Mixed(sync_steps=20, then=ps.Async()),
    "backup1": lambda: ps.Sync(backup=1),
}
if WITH_DC:
    POLICIES["async+dc"] = lambda: ps.Async(compensation="dc")
    POLICIES["ssp2+dc"] = lambda: ps.SSP(2, compensation="dc")
OPTIMIZERS = {  # PyTorch's usual settings, which is what a user tunes Sync with
    "sgd": lambda: ps.SGD(lr=0.1, momentum=0.9),
    "adam": lambda: ps.Adam(lr=0.003),
}


def final_accuracy(policy, optimizer, seed, train, test):
    result = ps.train(ps.models.MLP([64, 64, 10]), train, eval_data=test, policy=policy,
                      optimizer=optimizer, batch_size=32, epochs=EPOCHS, seed=seed,
                      shuffle=True, on_bad_gradient="skip")
    return None if result is None else result.history[-1]["eval_accuracy"]


def main():
    train, test = ps.data.digits(seed=0)
    accuracy = {}
    for opt_name, make_opt in OPTIMIZERS.items():
        for name, make_policy in POLICIES.items():
            accs = [final_accuracy(make_policy(), make_opt(), seed, train, test) for seed in SEEDS]
            if MPI.COMM_WORLD.Get_rank() == 0:
                accuracy[f"{opt_name}/{name}"] = statistics.mean(accs)
    # Today's raw behaviour, for contrast: every push a full SGD step.
    raw = final_accuracy(ps.Async(scale="none"), OPTIMIZERS["sgd"](), 0, train, test)
    if MPI.COMM_WORLD.Get_rank() == 0:
        accuracy["sgd/async-raw"] = raw
        print("GRID " + json.dumps({"workers": MPI.COMM_WORLD.Get_size() - 1,
                                    "accuracy": accuracy}), flush=True)


if __name__ == "__main__":
    main()
