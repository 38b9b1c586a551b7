"""jobs/train.py flag parsing: help text, config files, overrides and errors (no training)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest

from dho2_tf import DHO2, LocalComm
from dho2_tf.training.dho2_arguments import DHO2Arguments
from dho2_tf.training.experiment import TrainConfig, train
from tests.helpers.jobs import job as load_job
from tests.helpers.launch import REPO


job = load_job("train")
FLAGS = ["--" + f.name.replace("_", "-")
         for f in dataclasses.fields(TrainConfig) + dataclasses.fields(DHO2Arguments)
         if f.name != "dho2"] + ["--dho2-option", "--config"]
MAKEFILE_FLAGS = ["--model", "--dataset", "--optimizer", "--base", "--learning-rate", "--alpha",
                  "--refresh-every", "--warmup", "--schedule", "--epochs", "--batch-size",
                  "--weight-decay", "--verbose"]


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_help_lists_every_flag_with_its_help_text():
    env = {**os.environ, "COLUMNS": "2000", "TF_CPP_MIN_LOG_LEVEL": "2"}  # no line wrapping
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for flag in FLAGS + MAKEFILE_FLAGS + ["--no-prioritized", "--no-resume"]:
        assert flag in text, flag
    for name, help_text in {**job.HELP, **job.DHO2_HELP}.items():
        assert help_text.replace("%%", "%") in text, name


def test_defaults_are_train_config_defaults():
    assert job.parse_args([]) == TrainConfig()


def test_dho2_fields_default_to_the_optimizer_defaults():
    """One set of defaults: the CLI's DHO2 fields are DHO2's, and the optimizer it builds is
    configured exactly as ``DHO2()`` (base, lr, k, ell, alpha, c_max, T, W, m, mode)."""
    config = job.parse_args([])
    built = config.make_dho2(config.learning_rate, LocalComm()).get_config()
    default = DHO2(comm=LocalComm()).get_config()
    keys = ("base", "learning_rate", "momentum", "k", "ell", "alpha", "c_max", "refresh_every",
            "warmup", "lanczos_order", "mode")
    assert {k: built[k] for k in keys} == {k: default[k] for k in keys}
    signature = inspect.signature(DHO2.__init__).parameters
    assert config.learning_rate == signature["learning_rate"].default
    for key in ("base", "k", "ell", "alpha", "refresh_every", "warmup", "c_max"):
        assert getattr(config.dho2, key) == signature[key].default, key


def test_given_flags_override_the_optimizer_defaults():
    config = job.parse_args(["--alpha", "0.01", "--refresh-every", "200", "--warmup", "40",
                             "--base", "momentum", "--learning-rate", "0.1"])
    opt = config.make_dho2(config.learning_rate, LocalComm())
    assert (opt.alpha, opt.refresh_every, opt.warmup, opt.rule.name) == (0.01, 200, 40,
                                                                         "momentum")
    assert job.parse_args(["--warmup", "none"]).dho2.warmup is None
    every = job.parse_args(["--eigenvalue-damping", "5e-9", "--tau", "3", "--update-ranks",
                            "none", "--lanczos-dtype", "float64"]).dho2
    assert (every.eigenvalue_damping, every.tau, every.update_ranks, every.lanczos_dtype) == \
        (5e-9, 3, None, "float64")


def test_makefile_demo_flags_still_parse():
    """The flags of the Makefile's demo line, read from the Makefile itself."""
    makefile = (REPO / "Makefile").read_text()
    demo = makefile[makefile.index("jobs/train.py", makefile.index("\ndemo:")):]
    demo = demo[len("jobs/train.py"):demo.index("\n\n")].replace("\\\n", " ")
    config = job.parse_args(demo.split())
    assert (config.dho2.base, config.learning_rate, config.dho2.alpha, config.dho2.refresh_every,
            config.dho2.warmup, config.epochs, config.weight_decay, config.verbose) == \
        ("momentum", 0.1, 0.01, 200, 40, 60, 3e-4, 2)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_and_flag_overrides(tmp_path, suffix):
    values = {"optimizer": "adam", "learning-rate": "1e-3", "epochs": 3, "prioritized": True,
              "target_accuracy": 0.5, "k": 4,
              "dho2": {"eigenvalue_damping": 5e-9, "refresh-every": 30}}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    config = job.parse_args(["--config", str(path), "--epochs", "7", "--no-prioritized",
                             "--dho2-option", "beta_2=0.99", "--refresh-every", "40"])
    assert config.optimizer == "adam" and config.learning_rate == 1e-3
    assert config.epochs == 7 and config.prioritized is False
    assert config.target_accuracy == 0.5
    assert config.dho2 == DHO2Arguments(k=4, eigenvalue_damping=5e-9, beta_2=0.99,
                                        refresh_every=40)


def test_optional_flags_accept_none():
    assert job.parse_args(["--target-accuracy", "none"]).target_accuracy is None
    assert job.parse_args(["--c-max", "2"]).dho2.c_max == 2.0


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--optimizer", "lion"], "`optimizer` must be one of ('dho2', 'adam', 'sgd', 'momentum')"
                              ". Received: optimizer='lion'"),
    (["--model", "vgg"], "`model` must be one of"),
    (["--epochs", "0"], "`epochs` must be a positive integer. Received: epochs=0"),
    (["--target-accuracy", "1.5"], "`target_accuracy` must be a finite number in [0.0, 1.0]"),
    (["--k", "0"], "`k` must be a positive integer. Received: k=0"),
    (["--resume"], "`resume` needs `checkpoint_dir`"),
    (["--dataset", "cifar10"], "`data_dir` must name the folder of the CIFAR files"),
    (["--dho2-option", "nonsense=1"], "Unknown DHO2 argument 'nonsense' in the command line"),
    (["--k", "10", "--dho2-option", "k=3"],
     "DHO2's `k` is set twice in the command line: k=10 and dho2_options.k=3. Set it once."),
    (["--refresh-method", "cold"], "`refresh_method` must be one of"),
    (["--dho2-option", "novalue"], "argument --dho2-option: invalid KEY=VALUE value"),
])
def test_bad_flags_exit_2_with_a_message_naming_the_flag(argv, message, capsys):
    assert message in error_of(argv, capsys)


def test_bad_config_files(tmp_path, capsys):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"epochs": 1, "learning_rat": 0.1}))
    assert ("Unknown key 'learning_rat' in the config file. Valid keys: allow_config_change, "
            "batch_size") in error_of(["--config", str(unknown)], capsys)
    wrong_type = tmp_path / "type.yaml"
    wrong_type.write_text("epochs: many\n")
    assert "`epochs` must be of type int. Received: epochs='many'" in \
        error_of(["--config", str(wrong_type)], capsys)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n- 2\n")
    assert "must hold a mapping" in error_of(["--config", str(not_mapping)], capsys)
    assert "must be a .yaml, .yml or .json file" in \
        error_of(["--config", str(tmp_path / "x.toml")], capsys)
    assert "Cannot read config file" in error_of(["--config", str(tmp_path / "no.yaml")], capsys)
    broken = tmp_path / "broken.json"
    broken.write_text("{epochs: ")
    assert "Cannot parse config file" in error_of(["--config", str(broken)], capsys)


def test_shipped_cifar_recipe_parses(tmp_path):
    config = job.parse_args(["--config", str(REPO / "jobs/configs/cifar10_resnet110_dho2.yaml"),
                             "--data-dir", str(tmp_path)])
    assert (config.model, config.dataset, config.optimizer, config.dho2.base) == \
        ("resnet110", "cifar10", "dho2", "adam")
    dho2 = config.dho2
    assert (dho2.k, dho2.lanczos_order, dho2.alpha, dho2.c_max) == (16, 64, 0.028, 1.0)
    assert (dho2.eigenvalue_damping, dho2.warmup, dho2.mode) == (5e-9, 0, "sharded")
    assert config.learning_rate == 2.8e-3 and config.refresh_every_epochs == 8


def test_training_loss_task_flags():
    config = job.parse_args(["--model", "autoencoder", "--dataset", "mnist5k", "--target-loss",
                             "0.12", "--num-samples", "1000"])
    assert (config.model, config.dataset, config.target_loss, config.num_samples) == \
        ("autoencoder", "mnist5k", 0.12, 1000)
    assert job.parse_args(["--target-loss", "none"]).target_loss is None
    assert job.parse_args(["--model", "logreg", "--dataset", "mnist5k"]).model == "logreg"


@pytest.mark.parametrize("argv, message", [
    (["--target-loss", "0"], "`target_loss` must be a finite number in (0.0, inf). "
                             "Received: target_loss=0.0"),
    (["--target-loss", "-0.5"], "Received: target_loss=-0.5"),
    (["--model", "autoencoder", "--dataset", "mnist5k", "--target-accuracy", "0.9"],
     "`target_accuracy` needs a model with an accuracy metric"),
    (["--target-accuracy", "0.9", "--target-loss", "0.1"],
     "Set at most one of `target_accuracy` and `target_loss`"),
    (["--dataset", "mnist5k", "--num-samples", "6000"],
     "`num_samples` must be a multiple of 10 in [10, 5000] for dataset='mnist5k'"),
])
def test_bad_training_loss_flags_exit_2(argv, message, capsys):
    assert message in error_of(argv, capsys)


def test_autoencoder_job_runs_end_to_end_and_reports_the_training_loss():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--model", "autoencoder", "--dataset",
         "mnist5k", "--num-samples", "200", "--optimizer", "adam", "--learning-rate", "1e-3",
         "--epochs", "2", "--batch-size", "40", "--weight-decay", "0", "--target-loss", "100",
         "--verbose", "0"],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    fields = dict(item.split("=", 1) for item in line.split()[1:])
    assert fields["model"] == "autoencoder" and fields["test_accuracy"] == "nan"
    assert fields["epochs"] == "1" and fields["time_to_target"] != "none"
    assert 0.0 < float(fields["train_loss"]) < 0.7


def _job_flags(*flags):
    """The flags of a short jobs/train.py run, then ``flags``."""
    return ["--optimizer", "adam", "--learning-rate", "1e-3", "--num-samples", "200",
            "--epochs", "1", "--batch-size", "40", "--verbose", "0", *flags]


def _run_job(*flags, drop_dac=False):
    """jobs/train.py in a subprocess; ``drop_dac``: without the capability that lets root
    write into any directory, so a read-only directory is read-only for it too."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    prefix = []
    if drop_dac and os.geteuid() == 0:
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    return subprocess.run(
        [*prefix, sys.executable, str(REPO / "jobs" / "train.py"), *_job_flags(*flags)],
        capture_output=True, text=True, timeout=180, cwd=REPO, env=env)


def test_existing_checkpoint_without_resume_exits_2_and_is_kept(tmp_path):
    folder = tmp_path / "ckpt"
    # The first run's checkpoint, from the configuration jobs/train.py builds of its flags,
    # trained in this process (the refused second run is the job itself).
    train(job.parse_args(_job_flags("--checkpoint-dir", str(folder))), LocalComm())
    manifest = (folder / "checkpoint.json").read_text()
    proc = _run_job("--checkpoint-dir", str(folder), "--learning-rate", "5e-3")
    assert proc.returncode == 2 and "RESULT" not in proc.stdout
    assert (f"train.py: error (rank 0): The checkpoint directory {folder} already holds a "
            "checkpoint (epoch 1, step 4, 1 rank(s)); it is not replaced silently. Pass "
            "--resume to continue it, --overwrite to replace it") in proc.stderr
    assert (folder / "checkpoint.json").read_text() == manifest
    assert json.loads(manifest)["name"] in os.listdir(folder)


def test_read_only_checkpoint_dir_is_rejected_before_training(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        proc = _run_job("--checkpoint-dir", str(folder), drop_dac=True)
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 2 and "RESULT" not in proc.stdout
    assert (f"train.py: error (rank 0): The checkpoint directory {folder} is not writable "
            "(Permission denied). Fix its permissions or choose another --checkpoint-dir."
            ) in proc.stderr
    assert "training mlp on mnist1d" not in proc.stderr     # before training started
    assert os.listdir(folder) == []
