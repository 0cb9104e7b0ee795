"""The Python API beside `psframe train --save`: train DATA.npz as the CLI test does, save params.

Run under mpiexec: python api_train.py DATA.npz OUT.npz
"""
import sys

import numpy as np

import psframe as ps
from user_model import build

data_path, out = sys.argv[1], sys.argv[2]
with np.load(data_path) as f:
    train = ps.data.ArrayDataset(f["X"], f["y"])
    test = ps.data.ArrayDataset(f["X_test"], f["y_test"])
result = ps.train(build(), train, eval_data=test, policy=ps.Sync(),
                  optimizer=ps.SGD(lr=0.05, momentum=0.9), batch_size=16, steps=12,
                  shuffle=False, seed=4, dtype="float64")
if result is not None:
    np.savez(out, **result.params)
