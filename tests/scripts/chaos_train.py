"""ps.train on the chaos model (see chaos_model.py), for ps.launch's restart tests.
Arguments: the checkpoint directory, a directory for rank 0's results, shuffle or noshuffle,
and optionally the steps (default 20). Rank 0 writes weights.npz and history.json there."""
import json
import os
import sys

import numpy as np

import psframe as ps
from chaos_model import BATCH, Chaos

ckpt_dir, out_dir, shuffle = sys.argv[1], sys.argv[2], sys.argv[3] == "shuffle"
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 20
train, test = ps.data.synthetic(n_rows=400, n_features=16, n_classes=4, seed=0)
result = ps.train(Chaos(), train, eval_data=test, batch_size=BATCH, steps=steps, eval_every=1,
                  shuffle=shuffle, optimizer=ps.SGD(lr=0.05, momentum=0.9),
                  checkpoint_dir=ckpt_dir, checkpoint_every=2)
if result is not None:
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "weights.npz"), **result.params)
    with open(os.path.join(out_dir, "history.json"), "w") as f:
        json.dump(result.history, f)
