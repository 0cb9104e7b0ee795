"""A user's files: data loaders (.npz, .csv, .npy directories), model files, saved weights."""
import os

import numpy as np
import pytest

import psframe as ps
from mapped_memory import mapped_bytes
from psframe.cli import app as cli
from psframe.training import config
from psframe.data import NpyDataset, block_range, from_file

RNG = np.random.default_rng(0)
X = RNG.normal(size=(30, 4))
Y = np.arange(30) % 3


needs_smaps = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")


def npy_dir(tmp_path, X=X, y=Y, **more):
    for name, a in dict(X=X, y=y, **more).items():
        np.save(tmp_path / f"{name}.npy", a)
    return str(tmp_path)


# -- formats -------------------------------------------------------------------------------------
def test_npz_with_and_without_a_test_split(tmp_path):
    np.savez(tmp_path / "a.npz", X=X, y=Y)
    train, test = from_file(str(tmp_path / "a.npz"))
    assert test is None and type(train) is ps.data.ArrayDataset
    np.testing.assert_array_equal(train.X, X)
    np.testing.assert_array_equal(train.y, Y)
    np.savez(tmp_path / "b.npz", X=X, y=Y, X_test=X[:5], y_test=Y[:5] + 1)
    train, test = from_file(str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(test.X, X[:5])
    np.testing.assert_array_equal(test.y, Y[:5] + 1)
    assert len(train) == 30


def test_csv_label_column_by_header_or_last(tmp_path):
    (tmp_path / "h.csv").write_text("f1,Label,f2\n1.5,0,2\n3,2,4.25\n")
    train, test = from_file(str(tmp_path / "h.csv"))
    assert test is None
    np.testing.assert_array_equal(train.X, [[1.5, 2.0], [3.0, 4.25]])
    assert train.y.tolist() == [0, 2] and train.y.dtype == np.int64  # whole numbers: labels
    (tmp_path / "n.csv").write_text("1,2,0.5\n3,4,-1.25\n5,6,7\n")
    train, _ = from_file(str(tmp_path / "n.csv"))  # no header: the last column is y
    np.testing.assert_array_equal(train.X, [[1, 2], [3, 4], [5, 6]])
    assert train.y.tolist() == [0.5, -1.25, 7.0] and train.y.dtype == np.float64


def test_directory_of_npy_files_is_memory_mapped(tmp_path):
    path = npy_dir(tmp_path, X_test=X[:4], y_test=Y[:4])
    train, test = from_file(path)
    assert isinstance(train, NpyDataset) and train.lazy and not ps.data.ArrayDataset.lazy
    assert isinstance(train.X, np.memmap) and isinstance(train.y, np.memmap)
    assert not train.X.flags.writeable  # opened read-only: training never writes the file
    np.testing.assert_array_equal(train.X, X)
    np.testing.assert_array_equal(test.X, X[:4])
    assert test.names == ("X_test", "y_test") and len(test) == 4


def test_builtin_data_and_models_still_parse():
    train, test = cli.parse_data("synthetic:50,3,2")
    assert (len(train), len(test), train.n_features) == (40, 10, 3)
    assert isinstance(cli.parse_model("mlp:4,5,3"), ps.models.MLP)
    assert isinstance(cli.parse_model("softmax", 4, 3), ps.models.SoftmaxRegression)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.* a .npz or .csv file"):
        cli.parse_data("cifar")
    with pytest.raises(ValueError, match="unknown model"):
        cli.parse_model("resnet")


def test_eval_data_takes_the_test_split_when_there_is_one(tmp_path):
    np.savez(tmp_path / "a.npz", X=X, y=Y)
    np.savez(tmp_path / "b.npz", X=X, y=Y, X_test=X[:3], y_test=Y[:3])
    assert len(cli.parse_eval_data(str(tmp_path / "a.npz"))) == 30
    assert len(cli.parse_eval_data(str(tmp_path / "b.npz"))) == 3


def test_new_options_are_config_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('data = "d.npz"\neval_data = "e.csv"\nmodel = "m.py:build"\n'
                    'save = "out.npz"\n')
    o = cli.resolve(cli.build_parser().parse_args(["train", "--config", str(path),
                                                   "--save", "w.npz"]))
    assert (o["data"], o["eval_data"], o["model"], o["save"]) == (
        "d.npz", "e.csv", "m.py:build", "w.npz")
    assert config.defaults()["save"] is None and config.defaults()["eval_data"] is None


# -- NpyDataset: rows read where indexed --------------------------------------------------------
def test_block_range_is_array_split():
    for n, k in [(10, 3), (7, 7), (1797, 4), (5, 8), (100, 1)]:
        for w, block in enumerate(np.array_split(np.arange(n), k)):
            lo, hi = block_range(n, k, w)
            np.testing.assert_array_equal(np.arange(lo, hi), block)
            np.testing.assert_array_equal(ps.data.worker_block(n, k, w), block)


# Pages reach a mapping in folios of up to 2 MiB (fault-around, large folios): a read of a
# block maps the block plus at most that much at each end.
SLACK = 4 << 20


@needs_smaps
def test_a_block_reads_only_its_rows(tmp_path):
    # 32 MiB of features: each 8 MiB block is what one worker of 4 reads.
    big = np.arange(32768 * 128, dtype=np.float64).reshape(32768, 128)
    ds = NpyDataset(npy_dir(tmp_path, X=big, y=np.zeros(32768, np.int64)))
    x_file, block_bytes = os.path.join(ds.path, "X.npy"), big.nbytes // 4
    assert mapped_bytes(x_file) == 0  # opening maps the file but reads no rows
    lo, hi = block_range(len(ds), 4, 2)
    rows = np.array(ds.X[lo:hi])  # a copy: every row of the block read once
    np.testing.assert_array_equal(rows, big[lo:hi])
    touched = mapped_bytes(x_file)
    assert block_bytes <= touched <= block_bytes + SLACK < big.nbytes, touched
    model = ps.models.MLP([128, 4, 2])
    ds.check(model, "training data", (lo, hi))  # checking the same rows reads nothing new
    assert mapped_bytes(x_file) == touched


def test_check_goes_in_chunks_and_names_the_rows(tmp_path, monkeypatch):
    bad = X.copy()
    bad[23, 1] = np.nan
    ds = NpyDataset(npy_dir(tmp_path, X=bad))
    monkeypatch.setattr(ps.data, "CHUNK_BYTES", 10 * 4 * 8)  # 10 rows of 4 float64
    assert ds.chunk_rows == 10
    model = ps.models.MLP([4, 5, 3])
    ds.check(model, "training data", (0, 20))  # rows 0..19 are fine
    with pytest.raises(ValueError, match=r"training data X has 1 non-finite .* rows 20\.\.29"):
        ds.check(model, "training data")
    (tmp_path / "labels").mkdir()  # not over the files ds maps
    ds_labels = NpyDataset(npy_dir(tmp_path / "labels", X=X, y=Y + 5))
    with pytest.raises(ValueError, match=r"labels must be integers in \[0, 3\).* rows 0\.\.9"):
        ds_labels.check(model, "training data")
    # In memory: one pass over everything and the message it always had.
    whole = r"^training data X has 1 non-finite values \(NaN or inf\)$"
    with pytest.raises(ValueError, match=whole):
        ps.data.ArrayDataset(bad, Y).check(model, "training data")


# -- every bad data file: one clear ValueError ---------------------------------------------------
def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


BAD_FILES = [
    ("missing.npz", None, r"data file .*missing.npz does not exist"),
    ("text.npz", "X,y\n1,2\n", r"text.npz is not an .npz file"),
    ("noX.npz", dict(y=Y), r"noX.npz has no X \(it holds y\); an .npz data file needs X and y"),
    ("noy.npz", dict(X=X, z=Y), r"noy.npz has no y \(it holds X, z\)"),
    ("short.npz", dict(X=X, y=Y[:29]), r"short.npz: X/y: y must have one entry per row of X"),
    ("flat.npz", dict(X=Y, y=Y), r"flat.npz: X/y: X must be 2-D"),
    ("words.npz", dict(X=np.array([["a", "b"]]), y=np.zeros(1)),
     r"words.npz: X must be numeric, got dtype <U1"),
    ("objects.npz", dict(X=np.array([[1, None]], dtype=object), y=np.zeros(1)),
     r"objects.npz: Object arrays cannot be loaded"),
    ("halftest.npz", dict(X=X, y=Y, X_test=X), r"halftest.npz has X_test alone"),
    ("badtest.npz", dict(X=X, y=Y, X_test=X, y_test=Y[:3]),
     r"badtest.npz: X_test/y_test: y must have one entry per row"),
    ("words.csv", "a,b,label\n1,2,0\n3,four,1\n",
     r"words.csv is not a numeric CSV: line 3, column 2 is 'four'"),
    ("ragged.csv", "1,2,0\n3,1\n",
     r"ragged.csv is not a numeric CSV: line 2 has 2 columns, expected 3"),
    ("empty.csv", "", r"empty.csv is empty"),
    ("header.csv", "a,b,label\n", r"header.csv has no data rows"),
    ("one.csv", "1\n2\n", r"one.csv needs at least 2 columns"),
    ("data.txt", "1,2\n", r"data.txt: use a .npz, a .csv, or a directory of X.npy and y.npy"),
    ("X.npy", b"\x93NUMPY", r"X.npy: give the directory holding X.npy and y.npy"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_file_is_one_clear_error(tmp_path, name, content, message):
    path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message):
        cli.parse_data(path)


def test_bad_npy_directories(tmp_path):
    (tmp_path / "a").mkdir()
    np.save(tmp_path / "a" / "X.npy", X)
    with pytest.raises(ValueError, match=r"data file .*a/y.npy does not exist"):
        from_file(str(tmp_path / "a"))
    (tmp_path / "a" / "y.npy").write_text("not numpy")
    with pytest.raises(ValueError, match=r"a/y.npy is not a .npy file"):
        from_file(str(tmp_path / "a"))
    np.save(tmp_path / "a" / "y.npy", Y[:10])
    with pytest.raises(ValueError, match=r"a: y must have one entry per row of X \(30\)"):
        from_file(str(tmp_path / "a"))
    np.save(tmp_path / "a" / "y.npy", Y)
    np.save(tmp_path / "a" / "X_test.npy", X)
    with pytest.raises(ValueError, match="one of X_test.npy and y_test.npy; give both"):
        from_file(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="needs a directory holding X.npy and y.npy"):
        NpyDataset(str(tmp_path / "a" / "X.npy"))


# -- model files ---------------------------------------------------------------------------------
MODEL_FILE = '''
import psframe as ps

def build():
    return ps.models.MLP([4, 6, 3])

def chain():
    return ps.Sequential([ps.layers.Dense(4, 3)], ps.losses.SoftmaxCrossEntropy())

def custom():
    class Mean(ps.Model):
        def init_params(self, rng):
            return {"w": rng.normal(size=4)}
    return Mean()

def broken():
    raise RuntimeError("no GPU here")

def not_a_model():
    return {"W": 1}

value = 3
'''


def model_file(tmp_path, text=MODEL_FILE, name="user_model.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_model_file_builds_each_kind_of_model(tmp_path):
    path = model_file(tmp_path)
    assert isinstance(cli.parse_model(f"{path}:build"), ps.models.MLP)
    assert isinstance(cli.parse_model(f"{path}:chain"), ps.Sequential)
    assert isinstance(cli.parse_model(f"{path}:custom"), ps.Model)
    # Loaded from its path: a file named like a module elsewhere is still this file.
    other = tmp_path / "sub"
    other.mkdir()
    path2 = model_file(other, "import psframe as ps\ndef build():\n"
                              "    return ps.models.LinearRegression(7)\n")
    assert isinstance(cli.parse_model(f"{path2}:build"), ps.models.LinearRegression)
    assert isinstance(cli.parse_model(f"{path}:build"), ps.models.MLP)


@pytest.mark.parametrize("spec, message", [
    ("{dir}/nope.py:build", r"model file .*nope.py does not exist"),
    ("{path}", r"--model .*user_model.py: name the function .* e.g. .*user_model.py:build"),
    ("{path}:", r"name the function that builds the model"),
    ("{path}:missing", r"model file .*user_model.py has no function 'missing'"),
    ("{path}:value", r"has no function 'value'"),
    ("{path}:broken", r"user_model.py:broken\(\) raised RuntimeError: no GPU here"),
    ("{path}:not_a_model", r"not_a_model\(\) must return a ps.Model, ps.Sequential or "
                           r"ps.TorchModel, got dict"),
    ("{bad}:build", r"model file .*bad.py failed to import: SyntaxError"),
    ("{raising}:build", r"model file .*raising.py failed to import: ImportError: no such thing"),
    ("{exiting}:build", r"model file .*exiting.py failed to import: SystemExit: 3"),
])
def test_bad_model_file_is_one_clear_error(tmp_path, spec, message):
    spec = spec.format(dir=tmp_path, path=model_file(tmp_path),
                       bad=model_file(tmp_path, "def build(:\n", "bad.py"),
                       raising=model_file(tmp_path, "raise ImportError('no such thing')\n",
                                          "raising.py"),
                       exiting=model_file(tmp_path, "import sys\nsys.exit(3)\n", "exiting.py"))
    with pytest.raises(ValueError, match=message):
        cli.parse_model(spec)


# -- saved weights -------------------------------------------------------------------------------
def test_saved_weights_load_with_init(tmp_path):
    params = {"0.W": RNG.normal(size=(4, 3)), "0.b": np.zeros(3, np.float32),
              "file": np.ones(2)}  # a name np.savez(f, **params) would take for its own
    path = str(tmp_path / "w.npz")
    assert cli.save_weights(path, params) == path
    assert os.listdir(tmp_path) == ["w.npz"]  # no temp file left behind
    loaded = cli._init(path)
    assert sorted(loaded) == sorted(params)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    cli.save_weights(path, {"x": np.zeros(1)})  # replaced whole
    assert sorted(cli._init(path)) == ["x"]


def test_save_into_a_missing_or_wrong_place_is_refused(tmp_path):
    cli._check_save(str(tmp_path / "ok.npz"))
    with pytest.raises(ValueError, match=r"--save .*nodir/w.npz: directory .*nodir does not exist"):
        cli._check_save(str(tmp_path / "nodir" / "w.npz"))
    with pytest.raises(ValueError, match=r"is a directory; give a file"):
        cli._check_save(str(tmp_path))
