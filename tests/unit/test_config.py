"""Config files and flags: precedence, unknown keys, types, and every ps.train option covered."""
import inspect
import json

import pytest

import psframe as ps
from psframe.cli import app as cli
from psframe.training import config


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def options(argv):
    return cli.resolve(cli.build_parser().parse_args(["train", *argv]))


def test_defaults_match_todays_cli():
    o = options([])
    assert o["model"] == "mlp:784,128,10" and o["data"] == "mnist" and o["policy"] == "sync"
    assert (o["batch_size"], o["epochs"], o["lr"], o["momentum"]) == (32, 1, None, 0.0)
    assert o["shuffle"] is True and o["quiet"] is False and o["steps"] is None


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = write(tmp_path, 'data = "digits"\nepochs = 3\nlr = 0.05\nshuffle = false\n'
                           'batch-size = 16\n')
    o = options(["--config", path, "--epochs", "5", "--shuffle"])
    assert o["epochs"] == 5            # flag beats file
    assert o["shuffle"] is True        # --shuffle beats shuffle = false
    assert o["lr"] == 0.05 and o["data"] == "digits"  # file beats default
    assert o["batch_size"] == 16       # dashed keys work like the flags
    assert o["momentum"] == 0.0        # neither: default
    # A flag equal to the default still wins: typed means typed.
    assert options(["--config", path, "--batch-size", "32"])["batch_size"] == 32


def test_no_shuffle_and_quiet_still_work():
    o = options(["--no-shuffle", "--quiet", "--lr", "0.2"])
    assert o["shuffle"] is False and o["quiet"] is True and o["lr"] == 0.2


def test_unknown_key_is_a_clear_error(tmp_path):
    path = write(tmp_path, "lrr = 0.1\n")
    with pytest.raises(ValueError) as err:
        options(["--config", path])
    message = str(err.value)
    assert message.startswith(f"unknown key 'lrr' in {path}; known keys: ")
    assert "batch_size" in message and ", lr, " in message


@pytest.mark.parametrize("text, words", [
    ('epochs = "3"', ["'epochs'", "an integer", "'3'"]),
    ("epochs = 2.5", ["'epochs'", "an integer"]),
    ("lr = true", ["'lr'", "a number"]),
    ("shuffle = 1", ["'shuffle'", "true or false"]),
    ('optimizer = "rmsprop"', ["'optimizer'", "one of", "'rmsprop'"]),
    ("betas = [0.9, \"x\"]", ["'betas'", "list of numbers"]),
    ("[optimizer]\nlr = 1", ["'optimizer'", "a string"]),
])
def test_wrong_types_are_refused(tmp_path, text, words):
    with pytest.raises(ValueError) as err:
        options(["--config", write(tmp_path, text + "\n")])
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("argv, text, want", [
    (["--optimizer", "adagrad"], "", ps.Adagrad()),
    ([], 'optimizer = "adagrad"\nlr = 0.5\neps = 1e-6\nweight_decay = 0.01\n',
     ps.Adagrad(lr=0.5, eps=1e-6, weight_decay=0.01)),
    (["--optimizer", "adam", "--lr", "0.01"], "", ps.Adam(lr=0.01)),
    (["--optimizer", "adam"], "eps = 1e-6\n", ps.Adam(eps=1e-6)),
    ([], "", ps.SGD()),
])
def test_optimizer_flags_and_keys_build_it_with_its_own_defaults(tmp_path, argv, text, want):
    got = cli._optimizer(ps, options(["--config", write(tmp_path, text), *argv]))
    assert type(got) is type(want) and vars(got) == vars(want)


def test_integers_are_accepted_for_numbers(tmp_path):
    o = options(["--config", write(tmp_path, "lr = 1\nbetas = [0, 1]\n")])
    assert o["lr"] == 1.0 and isinstance(o["lr"], float) and o["betas"] == (0.0, 1.0)


def test_bad_toml_and_missing_file_name_the_file(tmp_path):
    path = write(tmp_path, "epochs = = 3\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        options(["--config", path])
    with pytest.raises(ValueError, match="cannot read config file .*nope.toml"):
        options(["--config", str(tmp_path / "nope.toml")])


def test_saved_config_loads_back_identically(tmp_path):
    path = write(tmp_path, 'data = "digits"\noptimizer = "adam"\nbetas = [0.8, 0.99]\n')
    o = options(["--config", path, "--log-dir", str(tmp_path / "logs"), "--steps", "7"])
    saved = config.save(o, str(tmp_path / "logs"))
    with open(saved) as f:
        assert json.load(f)["steps"] == 7
    assert options(["--config", saved]) == o  # nulls included: JSON keeps "not set"


def test_null_is_refused_where_an_option_needs_a_value(tmp_path):
    with pytest.raises(ValueError, match="'epochs' .* got null"):
        options(["--config", write(tmp_path, '{"epochs": null}', "run.json")])


# How each ps.train keyword is expressed on the command line and in files. A new keyword of
# ps.train must be added here, and to config.OPTIONS, or this test fails.
TRAIN_KEYWORDS = {
    "model": "model", "data": "data", "eval_data": "eval", "mode": "mode", "policy": "policy",
    "optimizer": "optimizer", "batch_size": "batch_size", "epochs": "epochs", "steps": "steps",
    "shuffle": "shuffle", "seed": "seed", "dtype": "dtype", "init": "init",
    "eval_every": "eval_every", "threads": "threads", "backend": "backend",
    "shard_elems": "shard_elems", "dispatch": "dispatch", "delay": "delay",
    "stages": "stages", "micro_batches": "micro_batches",
    "checkpoint_dir": "checkpoint_dir", "checkpoint_every": "checkpoint_every",
    "checkpoint_keep": "checkpoint_keep", "resume": "resume",
    "on_bad_gradient": "on_bad_gradient", "transport": "transport", "servers": "servers",
    "overlap": "overlap", "stall_timeout": "stall_timeout", "stop_timeout": "stop_timeout",
    "verbose": "quiet",
}
NOT_CONFIGURABLE = {"callbacks", "comm"}  # Python objects, not settings


def test_every_train_option_has_a_key():
    keywords = set(inspect.signature(ps.train).parameters) - NOT_CONFIGURABLE
    assert keywords == set(TRAIN_KEYWORDS)
    assert set(TRAIN_KEYWORDS.values()) <= set(config.OPTIONS)


def test_every_option_is_a_flag():
    parser = cli.build_parser()
    for name, opt in config.OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        value = {int: "3", float: "0.5", str: opt.choices[0] if opt.choices else "x",
                 "floats": "0.1,0.2", "delays": "0:0.01"}.get(opt.kind)
        argv = ["train", flag] if opt.kind is bool else ["train", flag, value]
        assert hasattr(parser.parse_args(argv), name), flag


def test_straggler_delays_from_file_and_flag(tmp_path):
    path = write(tmp_path, 'dispatch = "dynamic"\n[delay]\n0 = 0.01\n2 = 1\n')
    o = options(["--config", path])
    assert o["delay"] == {0: 0.01, 2: 1.0} and o["dispatch"] == "dynamic"
    assert options(["--config", path, "--delay", "1:0.5"])["delay"] == {1: 0.5}
    with pytest.raises(ValueError, match="'delay'"):
        options(["--config", write(tmp_path, 'delay = {x = 1}\n')])
    with pytest.raises(SystemExit):  # argparse's own usage error, exit 2
        options(["--delay", "fast"])
