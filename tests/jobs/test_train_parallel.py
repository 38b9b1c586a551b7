"""jobs/train.py under real ``horovodrun --gloo -np 2``: every optimizer, every DHO2 mode, config
files, TensorBoard on rank 0 only, checkpoint + resume, prioritized SGD and bad input.

One launch runs every short job in sequence (``tests/parallel/consistency_run.py job``: the
job's ``main`` once per run, Horovod started by the first, a ``JOB_START`` line where each run's
output begins); each test reads its own run's lines. One more launch starts ``jobs/train.py``
itself (as users do), in a different working directory per rank. Each job: 1 epoch of 800 MNIST-1D training
examples unless said otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from dho2_tf.modes import MODE_CHOICES
from tests.helpers.job_output import run_lines
from tests.helpers.launch import REPO, horovodrun_path, run_horovod

pytestmark = pytest.mark.parallel

JOB = REPO / "jobs" / "train.py"
JOBS = REPO / "tests" / "parallel" / "consistency_run.py"
SHORT = ("--epochs", "1", "--num-samples", "1000", "--verbose", "2")
DHO2_SHORT = ("--optimizer", "dho2", "--k", "2", "--refresh-every", "5", "--warmup", "2",
              "--curvature-batch", "64")
#: The pipelined mode registers Horovod process sets, which only the launch's first run can do.
DHO2_MODES = ["pipelined", *(m for m in MODE_CHOICES if m not in ("sharded", "pipelined"))]
BASELINES = ("adam", "sgd", "momentum")
#: A line of the dho2_tf loggers (format "<time> dho2_tf.<module>: <message>").
LOG_LINE = re.compile(r" dho2_tf(\.\w+)*: ")
RESUME_FLAGS = ("--optimizer", "adam", "--learning-rate", "0.001", "--num-samples", "500",
                "--batch-size", "50", "--schedule", "constant", "--verbose", "0")


def job_runs(tmp: Path) -> dict[str, tuple[str, ...]]:
    """Every short job of this module: name -> jobs/train.py flags, in launch order."""
    runs = {f"dho2_{mode}": (*DHO2_SHORT, "--mode", mode, "--base", "adam",
                             "--learning-rate", "0.003", *SHORT) for mode in DHO2_MODES}
    sharded = (*DHO2_SHORT, "--mode", "sharded", "--tensorboard-dir", str(tmp / "tb"),
               "--checkpoint-dir", str(tmp / "ckpt"))
    runs["sharded_tensorboard_checkpoint"] = (*sharded, *SHORT)
    runs["sharded_resume"] = (*sharded, "--resume", "--epochs", "2",
                              "--allow-config-change", "epochs",  # cosine: longer
                              "--num-samples", "1000", "--verbose", "2")
    # adam: the config-file path, with a flag overriding the file
    (tmp / "run.yaml").write_text(
        "optimizer: sgd\nlearning_rate: 5.0e-1\nepochs: 9\nschedule: constant\n")
    runs["adam"] = ("--config", str(tmp / "run.yaml"), "--optimizer", "adam",
                    "--learning-rate", "0.003", *SHORT)
    # sgd: batch norm + early stop: ranks must stop at the same epoch
    runs["sgd"] = ("--optimizer", "sgd", "--learning-rate", "0.05", "--model", "resnet1d",
                   "--target-accuracy", "0.05", "--epochs", "3", "--num-samples", "1000",
                   "--verbose", "2")
    runs["momentum"] = ("--optimizer", "momentum", "--learning-rate", "0.01", *SHORT)
    runs["prioritized_sgd"] = ("--optimizer", "sgd", "--learning-rate", "0.05", "--prioritized",
                               "--prioritized-k", "0.1", "--prioritized-r", "0.05", *SHORT)
    (tmp / "bad.json").write_text('{"epochs": 1, "learnin_rate": 0.1}')
    runs["bad_config"] = ("--config", str(tmp / "bad.json"))
    # a batch larger than a rank's share of the data; k larger than the parameter count
    runs["batch_too_large"] = ("--optimizer", "adam", "--num-samples", "500", "--batch-size",
                               "300", "--verbose", "0")
    runs["k_too_large"] = ("--k", "20000", "--num-samples", "500", "--epochs", "1",
                           "--verbose", "0")
    # the checkpoint that test_resume_from_one_path_... finds on rank 0 only
    runs["checkpoint_for_node_local_resume"] = (
        *RESUME_FLAGS, "--epochs", "1", "--checkpoint-dir", str(tmp / "node" / "rank0" / "ckpt"))
    return runs


class Launch:
    """The one launch of every run of :func:`job_runs`; :meth:`lines` reads one run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        runs = job_runs(tmp)
        self.index = {name: i for i, name in enumerate(runs)}
        flags = [flag for i, run in enumerate(runs.values()) for flag in (("++",) if i else ())
                 + run]
        self.proc = run_horovod(JOBS, 2, args=("job", *flags), timeout=1800, check=False)

    def lines(self, name: str, rank: int, stream: str = "stdout") -> list[str]:
        """Rank ``rank``'s ``stream`` lines of run ``name``, horovodrun's prefix removed."""
        return run_lines(getattr(self.proc, stream), rank, self.index[name])

    def status(self, name: str, rank: int) -> int:
        statuses = [line for line in self.lines(name, rank) if "JOB_STATUS" in line]
        assert len(statuses) == 1, self.lines(name, rank)[-60:]
        return int(statuses[0].split()[-1])

    def result(self, name: str) -> dict[str, str]:
        """The RESULT summary of run ``name`` (printed once, by rank 0) as a dict."""
        assert self.status(name, 0) == 0 and self.status(name, 1) == 0, (
            self.lines(name, 0, "stderr")[-60:])
        assert not [line for line in self.lines(name, 1) if "RESULT " in line]
        lines = [line for line in self.lines(name, 0) if "RESULT " in line]
        assert len(lines) == 1, self.lines(name, 0)[-60:]
        return dict(re.findall(r"(\w+)=(\S+)", lines[0].split("RESULT ", 1)[1]))


@pytest.fixture(scope="module")
def launch(tmp_path_factory) -> Launch:
    return Launch(tmp_path_factory.mktemp("jobs"))


def test_launch_ran_every_job(launch):
    for name in launch.index:
        assert launch.status(name, 0) == launch.status(name, 1), name
    assert launch.proc.returncode == 0, launch.proc.stderr[-4000:]


@pytest.mark.parametrize("optimizer", BASELINES)
def test_baseline_optimizers(launch, optimizer):
    result = launch.result(optimizer)
    assert (result["optimizer"], result["ranks"]) == (optimizer, "2")
    assert 0.0 < float(result["test_accuracy"]) <= 1.0
    for rank in (0, 1):  # progress lines from rank 0 only
        progress = [line for line in launch.lines(optimizer, rank) if " - loss: " in line]
        assert bool(progress) == (rank == 0), progress[:3]
    assert result["epochs"] == "1"  # sgd: stopped at the target on both ranks (no hang)
    assert (result["time_to_target"] != "none") == (optimizer == "sgd")


@pytest.mark.parametrize("mode", DHO2_MODES)
def test_dho2_modes(launch, mode):
    result = launch.result(f"dho2_{mode}")
    # The RESULT line names the mode that ran: "auto" resolved (this small state fits the
    # memory budget, so replicated).
    resolved = {"auto": "replicated"}.get(mode, mode)
    assert (result["optimizer"], result["mode"], result["epochs"]) == ("dho2", resolved, "1")
    assert 0.0 < float(result["test_accuracy"]) <= 1.0


def test_dho2_sharded_with_tensorboard_checkpoint_and_resume(launch):
    tb, ckpt = launch.tmp / "tb", launch.tmp / "ckpt"
    assert launch.result("sharded_tensorboard_checkpoint")["mode"] == "sharded"
    # both ranks share the folder: one process (rank 0) wrote, one file for the run and one
    # for its resume (events.out.tfevents.<time>.<host>.<pid>.<n>.v2)
    events = [path.name.split(".") for path in tb.glob("events.out.tfevents.*")]
    assert len(events) == 2 and len({name[-3] for name in events}) == 1, events
    first = launch.lines("sharded_tensorboard_checkpoint", 0, "stderr")
    assert any(LOG_LINE.search(line) and "DHO2 refresh" in line for line in first)  # rank 0 logs
    for run in ("sharded_tensorboard_checkpoint", "sharded_resume"):  # no log line of rank 1
        logged = [line for line in launch.lines(run, 1, "stderr") if LOG_LINE.search(line)]
        assert not logged, logged
    # one checkpoint per epoch (the run's, then its resume's; two kept), one manifest
    files = sorted(p for p in os.listdir(ckpt) if not p.startswith("."))
    assert len(files) == 3 and files[0] == "checkpoint.json", files
    assert files[1].startswith("ckpt-00001-") and files[2].startswith("ckpt-00002-"), files
    assert json.loads((ckpt / "checkpoint.json").read_text())["name"] == files[2]

    assert launch.result("sharded_resume")["epochs"] == "2"
    resumed_err = "\n".join(launch.lines("sharded_resume", 0, "stderr"))
    resumed_out = "\n".join(launch.lines("sharded_resume", 0))
    assert re.search(r"Resumed from \S*ckpt-00001-\S* \(epoch 1, step \d+, written by 2 rank",
                     resumed_err) and "Epoch 2/2" in resumed_out
    assert "Epoch 1/2" not in resumed_out


def test_prioritized_sgd(launch):
    assert launch.result("prioritized_sgd")["epochs"] == "1"


def test_bad_config_fails_before_training(launch):
    for rank in (0, 1):
        assert launch.status("bad_config", rank) != 0
        output = "\n".join(launch.lines("bad_config", rank) +
                           launch.lines("bad_config", rank, "stderr"))
        assert "Unknown key 'learnin_rate' in the config file" in output
        assert "Epoch" not in output and "RESULT" not in output


def test_run_time_configuration_errors_exit_2_on_every_rank_with_one_line(launch):
    """A batch larger than a rank's share of the data, and k larger than the model's
    parameter count: one line and status 2 on both ranks (no traceback, no Gloo error)."""
    for run, message in (
            ("batch_too_large", "`batch_size` must not exceed a rank's share of the 400 "
             "training examples over 2 ranks (200). Received: batch_size=300"),
            ("k_too_large", "`k + ell` must not exceed the 15210 trainable parameters of the "
             "model. Received: k=20000, ell=0, lanczos_order=80000")):
        for rank in (0, 1):
            lines = launch.lines(run, rank) + launch.lines(run, rank, "stderr")
            assert launch.status(run, rank) == 2, lines
            errors = [line for line in lines if line.startswith(f"train.py: error (rank {rank})")]
            assert errors == [f"train.py: error (rank {rank}): {message}"], lines
            assert not any("Traceback" in line for line in lines)


def test_resume_from_one_path_whose_content_differs_per_rank_stops_every_rank(launch):
    """Node-local storage: both ranks pass the same --checkpoint-dir, /proc/self/cwd/ckpt,
    and each rank runs in its own working directory, so rank 0 sees a two-rank checkpoint and
    rank 1 an empty folder. --resume stops both ranks with status 2 and names what each rank
    sees, instead of rank 0 resuming while rank 1 starts from scratch (a hang)."""
    node = launch.tmp / "node"
    assert launch.status("checkpoint_for_node_local_resume", 0) == 0
    name = json.loads((node / "rank0" / "ckpt" / "checkpoint.json").read_text())["name"]
    (node / "rank1" / "ckpt").mkdir(parents=True)
    resume = " ".join(shlex.quote(str(a)) for a in (
        sys.executable, JOB, *RESUME_FLAGS, "--epochs", "2", "--checkpoint-dir",
        "/proc/self/cwd/ckpt", "--resume"))
    script = f"cd {shlex.quote(str(node))}/rank$HOROVOD_RANK && exec {resume}"
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
