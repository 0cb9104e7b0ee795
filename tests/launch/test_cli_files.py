"""`psframe train` with a user's data and model files and --save: the API's weights, exactly;
a bad file is one message and exit status 2 before any training."""
import os
import sys

import numpy as np
import pytest

from test_cli_launch import MPIEXEC, ROOT, needs_mpiexec, psframe, run

pytestmark = needs_mpiexec
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
MODEL = os.path.join(SCRIPTS, "user_model.py")
# Deterministic: Sync, no shuffling, float64. The API script uses the same options.
OPTIONS = ["--policy", "sync", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
           "--batch-size", "16", "--steps", "12", "--no-shuffle", "--seed", "4",
           "--dtype", "float64", "--quiet"]


def blobs(n_rows, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    return rng.normal(size=(3, 6))[y] + 0.6 * rng.normal(size=(n_rows, 6)), y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same data as an .npz, a directory of .npy files, and a CSV (eval set apart)."""
    d = tmp_path_factory.mktemp("user-data")
    (X, y), (X_test, y_test) = blobs(150, 1), blobs(40, 2)
    np.savez(d / "data.npz", X=X, y=y, X_test=X_test, y_test=y_test)
    (d / "npy").mkdir()
    for name, a in dict(X=X, y=y, X_test=X_test, y_test=y_test).items():
        np.save(d / "npy" / f"{name}.npy", a)
    header = ",".join([f"f{i}" for i in range(6)] + ["label"])
    # %.17g: every float64 back exactly, so the CSV run must match bit for bit too.
    np.savetxt(d / "train.csv", np.column_stack([X, y]), delimiter=",", fmt="%.17g",
               header=header, comments="")
    np.savetxt(d / "test.csv", np.column_stack([X_test, y_test]), delimiter=",", fmt="%.17g")
    proc = run([MPIEXEC, "-n", "3", sys.executable, "-m", "mpi4py",
                os.path.join(SCRIPTS, "api_train.py"), str(d / "data.npz"), str(d / "api.npz")])
    assert proc.returncode == 0, proc.stderr
    return d


def load(path):
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


@pytest.mark.parametrize("data, eval_data", [
    ("data.npz", None), ("npy", None), ("train.csv", "test.csv")])
def test_cli_with_user_files_saves_the_apis_weights(files, tmp_path, data, eval_data):
    out = tmp_path / "weights.npz"
    extra = ["--eval-data", str(files / eval_data)] if eval_data else []
    proc = psframe("-n", "3", "--data", str(files / data), "--model", f"{MODEL}:build",
                   "--save", str(out), *extra, *OPTIONS)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(f"weights saved to {out}") == 1  # rank 0 alone writes
    assert "test accuracy      n/a" not in proc.stdout  # the file's eval set was used
    saved, api = load(out), load(files / "api.npz")
    assert sorted(saved) == sorted(api) == ["0.W", "0.b", "2.W", "2.b"]
    for name in api:
        assert saved[name].dtype == np.float64
        np.testing.assert_array_equal(saved[name], api[name], err_msg=name)
    assert os.listdir(tmp_path) == ["weights.npz"]  # no temp file left


def test_saved_weights_start_the_next_run(files, tmp_path):
    out = tmp_path / "w.npz"
    proc = psframe("-n", "3", "--data", str(files / "data.npz"), "--model", f"{MODEL}:build",
                   "--init", str(files / "api.npz"), "--steps", "1", "--save", str(out),
                   "--dtype", "float64", "--lr", "1e-300", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # A step of lr 1e-300 moves nothing: the run ends where --init started it.
    for name, value in load(files / "api.npz").items():
        np.testing.assert_allclose(load(out)[name], value, rtol=0, atol=1e-200, err_msg=name)


def bad_cases(files, tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n1,two,1\n")
    np.savez(tmp_path / "noy.npz", X=np.zeros((4, 6)))
    np.savez(tmp_path / "short.npz", X=np.zeros((4, 6)), y=np.zeros(3))
    good = ["--data", str(files / "data.npz"), "--model", f"{MODEL}:build"]
    return {
        "missing data": (["--data", str(tmp_path / "nope.npz"), "--model", f"{MODEL}:build"],
                         f"data file {tmp_path}/nope.npz does not exist"),
        "no y": (["--data", str(tmp_path / "noy.npz"), "--model", f"{MODEL}:build"],
                 f"{tmp_path}/noy.npz has no y (it holds X)"),
        "length mismatch": (["--data", str(tmp_path / "short.npz")],
                            f"{tmp_path}/short.npz: X/y: y must have one entry per row of X"),
        "non-numeric csv": (["--data", str(tmp_path / "bad.csv")],
                            f"{tmp_path}/bad.csv is not a numeric CSV: line 3, column 2 is 'two'"),
        "bad eval file": (good + ["--eval-data", str(tmp_path / "noy.npz")],
                          f"{tmp_path}/noy.npz has no y"),
        "missing FUNC": (["--data", str(files / "data.npz"), "--model", f"{MODEL}:nope"],
                         f"model file {MODEL} has no function 'nope'"),
        "FUNC raises": (["--data", str(files / "data.npz"), "--model", f"{MODEL}:broken"],
                        f"{MODEL}:broken() raised RuntimeError: cannot build"),
        "not a model": (["--data", str(files / "data.npz"), "--model", f"{MODEL}:not_a_model"],
                        f"{MODEL}:not_a_model() must return a ps.Model, ps.Sequential or "
                        "ps.TorchModel, got list"),
        "save dir missing": (good + ["--save", str(tmp_path / "no" / "w.npz")],
                             f"--save {tmp_path}/no/w.npz: directory {tmp_path}/no does not "
                             "exist (on rank 0)"),
    }


CASES = ["missing data", "no y", "length mismatch", "non-numeric csv", "bad eval file",
         "missing FUNC", "FUNC raises", "not a model", "save dir missing"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_file_is_one_error_and_status_2(files, tmp_path, case):
    argv, message = bad_cases(files, tmp_path)[case]
    proc = psframe("-n", "3", *argv, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("psframe: error:") == 1, proc.stderr  # said once, by rank 0
    assert f"psframe: error: {message}" in proc.stderr, proc.stderr
    assert "psframe run summary" not in proc.stdout and "Traceback" not in proc.stderr
