"""jobs/train.py under real ``horovodrun --gloo -np 2``: every optimizer, every DHO2 mode, config
files, TensorBoard on rank 0 only, checkpoint + resume, prioritized SGD and bad input.

One short launch per optimizer/mode (1 epoch of 800 MNIST-1D training examples).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from dho2_tf.modes import MODE_CHOICES
from tests.helpers.launch import REPO, horovodrun_path, run_horovod

pytestmark = pytest.mark.parallel

JOB = REPO / "jobs" / "train.py"
SHORT = ("--epochs", "1", "--num-samples", "1000", "--verbose", "2")
DHO2_SHORT = ("--optimizer", "dho2", "--k", "2", "--refresh-every", "5", "--warmup", "2",
              "--curvature-batch", "64")


def result_line(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The RESULT summary (printed once, by rank 0) as a dict."""
    lines = [line for line in proc.stdout.splitlines() if "RESULT " in line]
    assert len(lines) == 1, proc.stdout[-4000:]
    assert lines[0].startswith("[0]"), lines[0]
    return dict(re.findall(r"(\w+)=(\S+)", lines[0].split("RESULT ", 1)[1]))


def event_files(log_dir) -> list[str]:
    return glob.glob(os.path.join(str(log_dir), "events.out.tfevents.*"))


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "momentum"])
def test_baseline_optimizers(optimizer, tmp_path):
    args = ("--optimizer", optimizer, "--learning-rate", "0.01", *SHORT)
    if optimizer == "sgd":  # batch norm + early stop: ranks must stop at the same epoch
        args = ("--optimizer", "sgd", "--learning-rate", "0.05", "--model", "resnet1d",
                "--target-accuracy", "0.05", "--epochs", "3", "--num-samples", "1000",
                "--verbose", "2")
    if optimizer == "adam":  # the config-file path, with a flag overriding the file
        config = tmp_path / "run.yaml"
        config.write_text("optimizer: sgd\nlearning_rate: 5.0e-1\nepochs: 9\nschedule: constant\n")
        args = ("--config", str(config), "--optimizer", "adam", "--learning-rate", "0.003",
                *SHORT)
    proc = run_horovod(JOB, np=2, args=args, timeout=150)
    result = result_line(proc)
    assert (result["optimizer"], result["ranks"]) == (optimizer, "2")
    assert 0.0 < float(result["test_accuracy"]) <= 1.0
    progress = [line[:3] for line in proc.stdout.splitlines() if " - loss: " in line]
    assert progress and set(progress) == {"[0]"}  # progress lines from rank 0 only
    assert result["epochs"] == "1"  # sgd: stopped at the target on both ranks (no hang)
    assert (result["time_to_target"] != "none") == (optimizer == "sgd")


@pytest.mark.parametrize("mode", [m for m in MODE_CHOICES if m != "sharded"])
def test_dho2_modes(mode):
    proc = run_horovod(JOB, np=2, args=(*DHO2_SHORT, "--mode", mode, "--base", "adam",
                                        "--learning-rate", "0.003", *SHORT), timeout=150)
    result = result_line(proc)
    # The RESULT line names the mode that ran: "auto" resolved (this small state fits the
    # memory budget, so replicated).
    resolved = {"auto": "replicated"}.get(mode, mode)
    assert (result["optimizer"], result["mode"], result["epochs"]) == ("dho2", resolved, "1")
    assert 0.0 < float(result["test_accuracy"]) <= 1.0


def test_dho2_sharded_with_tensorboard_checkpoint_and_resume(tmp_path):
    tb, ckpt = tmp_path / "tb", tmp_path / "ckpt"
    common = (*DHO2_SHORT, "--mode", "sharded", "--tensorboard-dir", str(tb),
              "--checkpoint-dir", str(ckpt))
    proc = run_horovod(JOB, np=2, args=(*common, *SHORT), timeout=150)
    assert result_line(proc)["mode"] == "sharded"
    assert len(event_files(tb)) == 1  # both ranks share the folder: only rank 0 wrote
    assert "DHO2 refresh" in proc.stderr  # rank 0 logs
    assert "[1]<stderr>:" not in "\n".join(
        line for line in proc.stderr.splitlines() if "dho2_tf" in line)
    assert sorted(p for p in os.listdir(ckpt) if not p.startswith(".")) == [
        "checkpoint.json", next(p for p in os.listdir(ckpt) if p.startswith("ckpt-00001-"))]

    resumed = run_horovod(JOB, np=2, args=(*common, "--resume", "--epochs", "2",
                                           "--allow-config-change", "epochs",  # cosine: longer
                                           "--num-samples", "1000", "--verbose", "2"),
                          timeout=150)
    assert result_line(resumed)["epochs"] == "2"
    assert re.search(r"Resumed from \S*ckpt-00001-\S* \(epoch 1, step \d+, written by 2 rank",
                     resumed.stderr) and "Epoch 2/2" in resumed.stdout
    assert "Epoch 1/2" not in resumed.stdout


def test_prioritized_sgd():
    proc = run_horovod(JOB, np=2, args=("--optimizer", "sgd", "--learning-rate", "0.05",
                                        "--prioritized", "--prioritized-k", "0.1",
                                        "--prioritized-r", "0.05", *SHORT), timeout=150)
    assert result_line(proc)["epochs"] == "1"


def test_bad_config_fails_before_training(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text('{"epochs": 1, "learnin_rate": 0.1}')
    proc = run_horovod(JOB, np=2, args=("--config", str(config)), timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Unknown key 'learnin_rate' in the config file" in output
    assert "Epoch" not in output and "RESULT" not in output


def test_run_time_configuration_errors_exit_2_on_every_rank_with_one_line():
    """A batch larger than a rank's share of the data, and k larger than the model's
    parameter count: one line and status 2 on both ranks (no traceback, no Gloo error)."""
    proc = run_horovod(REPO / "tests/parallel/consistency_run.py", np=2, args=(
        "job", "--optimizer", "adam", "--num-samples", "500", "--batch-size", "300",
        "--verbose", "0", "++", "--k", "20000", "--num-samples", "500", "--epochs", "1",
        "--verbose", "0"), timeout=150)
    for rank in (0, 1):
        lines = [line.split(":", 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
                 if line.startswith(f"[{rank}]<")]
        assert [line for line in lines if "JOB_STATUS" in line] == [
            f"rank {rank} JOB_STATUS 2"] * 2, lines
        errors = [line for line in lines if line.startswith(f"train.py: error (rank {rank})")]
        assert errors == [
            f"train.py: error (rank {rank}): `batch_size` must not exceed a rank's share of "
            "the 400 training examples over 2 ranks (200). Received: batch_size=300",
            f"train.py: error (rank {rank}): `k + ell` must not exceed the 15210 trainable "
            "parameters of the model. Received: k=20000, ell=0, lanczos_order=80000"], lines
        assert not any("Traceback" in line for line in lines)


def test_resume_from_one_path_whose_content_differs_per_rank_stops_every_rank(tmp_path):
    """Node-local storage: both ranks pass the same --checkpoint-dir, /proc/self/cwd/ckpt,
    and each rank runs in its own working directory, so rank 0 sees a two-rank checkpoint and
    rank 1 an empty folder. --resume stops both ranks with status 2 and names what each rank
    sees, instead of rank 0 resuming while rank 1 starts from scratch (a hang)."""
    flags = ("--optimizer", "adam", "--learning-rate", "0.001", "--num-samples", "500",
             "--batch-size", "50", "--schedule", "constant", "--verbose", "0")
    run_horovod(JOB, np=2, args=(*flags, "--epochs", "1", "--checkpoint-dir",
                                 str(tmp_path / "rank0" / "ckpt")), timeout=150)
    name = json.loads((tmp_path / "rank0" / "ckpt" / "checkpoint.json").read_text())["name"]
    (tmp_path / "rank1" / "ckpt").mkdir(parents=True)
    resume = " ".join(shlex.quote(str(a)) for a in (
        sys.executable, JOB, *flags, "--epochs", "2", "--checkpoint-dir", "/proc/self/cwd/ckpt",
        "--resume"))
    script = f"cd {shlex.quote(str(tmp_path))}/rank$HOROVOD_RANK && exec {resume}"
    proc = run_horovod(None, None, timeout=120, check=False, command=[
        horovodrun_path(), "--gloo", "-np", "2", "-H", "localhost:2", "bash", "-c", script])
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = [line.split(":", 1)[1] for line in (proc.stdout + proc.stderr).splitlines()
                 if line.startswith(f"[{rank}]<")]
        assert ("train.py: error (rank {rank}): Ranks disagree on the checkpoint to resume "
                "from /proc/self/cwd/ckpt (every rank must see the same one; put "
                "--checkpoint-dir on storage every rank shares):").format(rank=rank) in lines, \
            lines
        (seen,) = [line for line in lines if line.startswith("  checkpoint: ")]
        assert re.fullmatch(rf'  checkpoint: rank 0: "{name} \(epoch 1, step \d+, run '
                            r'[0-9a-f]{12}\)"; rank 1: "no checkpoint"', seen), seen
        assert not any("Traceback" in line for line in lines), lines

