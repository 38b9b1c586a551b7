"""The Ray launcher (``dho2_tf.training.ray_launcher``) on a local Ray instance with 2 CPUs.

DHO2 ``sharded`` on 2 Ray workers must end with the same weights as ``horovodrun -np 2`` with
the same seed; ``jobs/train.py --launcher ray`` prints the usual RESULT line with logs from rank 0
only; an error on one worker fails the launch (no hang), bad input fails before Ray starts, and
the cluster check passes on 2 Ray workers and under horovodrun. Horovod Elastic on Ray
(``RayExecutor(min_workers=..., max_workers=...)``): ``elastic_train`` on 2 Ray workers ends with
the weights of ``horovodrun -np 2``; after SIGKILL of one worker's actor the survivor goes on from
the last commit and ends with the weights of a one-process replay from that commit; and
``jobs/train_elastic.py --launcher ray`` runs. Ray is part of the test set-up (the ``ray`` extra,
installed by ``make test``): without it these tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.jobs import job as load_job
from tests.helpers.launch import REPO, run_horovod
from tests.helpers.elastic import (assert_recovered_and_matches_replay, results_of,
                                   scheduled_commits, sigkill_after_commit)

pytestmark = pytest.mark.parallel

WEIGHTS_SCRIPT = REPO / "tests" / "parallel" / "ray_sharded_weights.py"
ELASTIC_SCRIPT = REPO / "tests" / "parallel" / "elastic_train_check.py"
# Two one-slot hosts on the local Ray instance (resources node:<host>), so that the host Horovod
# blacklists after a worker fails is not the survivor's.
PSEUDO_HOSTS = {"localhost": 1, "127.0.0.2": 1}
ELASTIC_EPOCHS, KILL_EPOCHS = 2, 4  # 80 and 160 steps
# A step takes milliseconds: the workers sleep STEP_DELAY before each one, and the kill comes a
# random 0-KILL_JITTER s after a random commit among KILL_AFTER, so it lands mid-training.
STEP_DELAY, KILL_JITTER, KILL_AFTER = 0.02, 0.25, (15, 30, 40, 45, 60)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance (2 CPUs, no dashboard) for this module's tests, shut down after them
    even on failure."""
    from dho2_tf.training.ray_launcher import require_ray, worker_env

    try:
        ray, _ = require_ray()
    except ImportError as err:
        pytest.fail(str(err))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # as run_horovod sets it for horovodrun
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()},
                     resources={f"node:{host}": 1 for host in PSEUDO_HOSTS})
            yield ray
        finally:
            ray.shutdown()


def test_bad_input_fails_before_ray_starts():
    from dho2_tf.training.experiment import TrainConfig
    from dho2_tf.training.ray_launcher import (require_ray, run_elastic_function_on_ray,
                                      run_function_on_ray, run_on_ray)

    ray, _ = require_ray()

    with pytest.raises(ValueError, match="epochs"):
        run_on_ray(TrainConfig(epochs=0), num_workers=2)
    with pytest.raises(ValueError, match="`num_workers` must be a positive integer"):
        run_function_on_ray(print, num_workers=0)
    with pytest.raises(ValueError, match="`min_workers` must be a positive integer"):
        run_elastic_function_on_ray(print, min_workers=0)
    with pytest.raises(ValueError, match=r"`max_workers` must be an integer >= 2 \(at least "
                       r"min_workers=2\)\. Received: max_workers=1"):
        run_elastic_function_on_ray(print, min_workers=2, max_workers=1)
    assert not ray.is_initialized()  # (runs before this module's Ray instance starts)


def test_ray_sharded_weights_equal_horovodrun(local_ray, tmp_path):
    from dho2_tf.training.ray_launcher import run_function_on_ray
    from tests.parallel.ray_sharded_weights import CONFIG, final_weights

    on_ray = run_function_on_ray(final_weights, (CONFIG,), num_workers=2)
    assert len(on_ray) == 2
    saved = tmp_path / "horovodrun.npz"
    run_horovod(WEIGHTS_SCRIPT, np=2, args=(str(saved),), timeout=150)
    with np.load(saved) as npz:
        expected = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    assert [w.shape for w in on_ray[0]] == [w.shape for w in expected] == [
        (40, 100), (100,), (100, 100), (100,), (100, 10), (10,)]
    for rank_weights in on_ray:  # both Ray ranks hold the same model as horovodrun's rank 0
        for got, want in zip(rank_weights, expected):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # The run trained: the weights moved away from the seed's initial values.
    import tensorflow as tf

    from dho2_tf import models

    tf.keras.utils.set_random_seed(CONFIG["seed"])
    initial = models.get("mlp", (40,), 10, weight_decay=3e-4).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, expected)) > 1e-2


def test_failure_on_one_worker_fails_the_launch(local_ray):
    from dho2_tf.training.ray_launcher import run_function_on_ray
    from tests.parallel.ray_sharded_weights import fail_on_rank

    # Rank 1 raises while rank 0 blocks in an allreduce: the error reaches the driver (no hang).
    with pytest.raises(ValueError, match="rank 1 fails on purpose"):
        run_function_on_ray(fail_on_rank, (1,), num_workers=2)


def test_cluster_check_on_ray(local_ray, tmp_path):
    from dho2_tf.training.ray_launcher import check_cluster, summary_line

    report = check_cluster(2, shared_dir=str(tmp_path))
    assert (report["rank"], report["size"], report["allreduce"]) == (0, 2, 3.0)
    assert len(report["hosts"]) == 2 and len(set(report["hosts"])) == 1
    assert summary_line(report).startswith("CLUSTER OK ranks=2 hosts=")
    assert os.listdir(tmp_path) == []  # markers cleaned up


def test_cluster_check_under_horovodrun(tmp_path):
    proc = run_horovod(None, 2, ("--check", "--shared-dir", str(tmp_path)), timeout=120,
                       module="dho2_tf.training.ray_launcher")
    lines = [line for line in proc.stdout.splitlines() if "CLUSTER OK" in line]
    assert len(lines) == 1 and lines[0].startswith("[0]"), proc.stdout[-4000:]
    assert re.search(r"CLUSTER OK ranks=2 hosts=\S+:2 allreduce=3 shared_dir=", lines[0])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "2"], "need --launcher ray"),
    (["--ray-address", "auto"], "need --launcher ray"),
    (["--launcher", "ray", "--num-workers", "0"], "--num-workers must be a positive integer"),
    (["--launcher", "mpi"], "invalid choice: 'mpi'"),
])
def test_launcher_flags_are_checked(argv, message, capsys):
    job = load_job("train")
    with pytest.raises(SystemExit) as exit_info:
        job.launch_options(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert job.parse_args(["--launcher", "ray", "--epochs", "3"]).epochs == 3  # not config keys
    assert job.launch_options(["--launcher", "ray"]).num_workers == 2


def test_train_cli_ray_launcher():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "jobs" / "train.py"), "--launcher", "ray",
           "--num-workers", "2", "--optimizer", "dho2", "--mode", "sharded", "--k", "2",
           "--refresh-every", "5", "--warmup", "2", "--curvature-batch", "64", "--epochs", "1",
           "--num-samples", "1000", "--verbose", "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1, output[-8000:]
    result = dict(re.findall(r"(\w+)=(\S+)", results[0]))
    assert (result["optimizer"], result["mode"], result["ranks"], result["epochs"]) == (
        "dho2", "sharded", "2", "1")
    assert 0.0 < float(result["test_accuracy"]) <= 1.0
    # Progress lines and the optimizer's logs come from one worker (rank 0) only.
    progress = re.findall(r"pid=(\d+)\S*\s.*- loss: ", output)
    refresh = re.findall(r"pid=(\d+)\S*\s.*DHO2 refresh", output)
    assert progress and refresh and len(set(progress) | set(refresh)) == 1, output[-8000:]


def test_train_cli_without_ray_names_the_extra():
    code = ("import runpy, sys; sys.modules['ray'] = None; "
            f"sys.argv = ['train.py', '--launcher', 'ray', '--num-workers', '2']; "
            f"runpy.run_path({str(REPO / 'jobs' / 'train.py')!r}, run_name='__main__')")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install '.[ray]'" in proc.stderr and "Epoch" not in proc.stdout


def _final_weights(folder: Path, pid: int) -> list[np.ndarray]:
    """The final weights ``elastic_train_check.py --commit-dir folder`` saved in process ``pid``."""
    with open(folder / f"final-{pid}.pkl", "rb") as f:
        return pickle.load(f)


@pytest.mark.slow
def test_ray_elastic_weights_equal_horovodrun(local_ray, tmp_path):
    """elastic_train on 2 Ray workers (HOROVOD_ELASTIC=1, Ray's own host discovery) ends with the
    weights and losses of a horovodrun -np 2 run of the same script and seed."""
    import tensorflow as tf

    from dho2_tf import models
    from dho2_tf.training.ray_launcher import run_elastic_function_on_ray
    from tests.parallel.ray_elastic_check import elastic_check

    ray_dir, hvd_dir = tmp_path / "ray", tmp_path / "horovodrun"
    ray_dir.mkdir()
    hvd_dir.mkdir()
    args = ["--epochs", str(ELASTIC_EPOCHS)]
    on_ray = run_elastic_function_on_ray(elastic_check, ([*args, "--commit-dir", str(ray_dir)],),
                                         min_workers=2, max_workers=2)
    assert [(r["rank"], r["final_size"], r["horovod_elastic"]) for r in on_ray] == [
        (0, 2, "1"), (1, 2, "1")]
    for result in on_ray:  # one uninterrupted elastic run, every scheduled commit made once
        assert [tuple(s) for s in result["starts"]] == [(0, 2)]
        assert [s for s, _ in result["commits"]] == scheduled_commits(result)
        assert result["steps"] == ELASTIC_EPOCHS * result["steps_per_epoch"]

    proc = run_horovod(ELASTIC_SCRIPT, np=2, args=(*args, "--commit-dir", str(hvd_dir)),
                       timeout=150)
    reference = results_of(proc.stdout)
    assert len(reference) == 2
    expected_files = sorted(hvd_dir.glob("final-*.pkl"))
    assert len(expected_files) == 2
    with open(expected_files[0], "rb") as f:
        expected = pickle.load(f)
    for result in on_ray:
        for got, want in zip(result["history"], reference[0]["history"], strict=True):
            assert got["epoch"] == want["epoch"]
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
        for got_w, want_w in zip(_final_weights(ray_dir, result["pid"]), expected, strict=True):
            np.testing.assert_allclose(got_w, want_w, rtol=0, atol=1e-6)
    tf.keras.utils.set_random_seed(0)  # the script's seed: the run did train
    initial = models.get("mlp", (40,), 10).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, expected)) > 1e-2


@pytest.mark.parametrize("victim", [pytest.param(0, marks=pytest.mark.slow), 1], ids=["rank0", "rank1"])
def test_ray_elastic_sigkill_recovers_and_matches_a_replay(local_ray, tmp_path, victim):
    """kill -9 of one Ray worker actor mid-run: Horovod blacklists its host, the survivor rolls
    back to its last commit, finishes alone, and ends with the weights of a one-process replay
    from that commit."""
    from dho2_tf.training.ray_launcher import run_elastic_function_on_ray
    from tests.parallel.ray_elastic_check import FixedHosts, elastic_check

    pid_dir, commit_dir = tmp_path / "pids", tmp_path / "commits"
    for folder in (pid_dir, commit_dir):
        folder.mkdir()
    rng = random.Random(random.randrange(2**16))
    after, jitter = rng.choice(KILL_AFTER), rng.uniform(0.0, KILL_JITTER)
    print(f"kill rank {victim} {jitter:.3f}s after the commit of step {after}")
    args = ["--epochs", str(KILL_EPOCHS), "--pid-dir", str(pid_dir), "--commit-dir",
            str(commit_dir), "--step-delay", str(STEP_DELAY)]
    outcome: dict = {}

    def launch() -> None:
        try:
            outcome["results"] = run_elastic_function_on_ray(
                elastic_check, (args,), min_workers=1, max_workers=2,
                discovery=FixedHosts(PSEUDO_HOSTS), elastic_timeout_s=30)
        except Exception as err:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = err

    job = threading.Thread(target=launch, daemon=True)
    job.start()
    killed = sigkill_after_commit(job.is_alive, pid_dir, victim, after, jitter)
    job.join(timeout=150)
    assert not job.is_alive(), "the elastic Ray job hung after the kill"
    assert "error" not in outcome, repr(outcome.get("error"))
    (survivor,) = outcome["results"]
    assert survivor["rank"] == 0 and survivor["horovod_elastic"] == "1"
    assert_recovered_and_matches_replay(survivor, killed, commit_dir, tmp_path / "replay",
                                        KILL_EPOCHS)


@pytest.mark.parametrize("argv, message", [
    (["--min-workers", "2"], "--min-workers need --launcher ray"),
    (["--epochs", "2", "--ray-address", "auto"], "--ray-address need --launcher ray"),
    (["--launcher", "ray", "--min-workers", "3", "--max-workers", "2"],
     "need 1 <= --min-workers <= --max-workers. Received: min_workers=3, max_workers=2"),
    (["--launcher", "ray", "--min-workers", "0"], "Received: min_workers=0, max_workers=2"),
    (["--launcher", "ray", "--elastic-timeout", "0"],
     "--elastic-timeout must be a positive integer"),
    (["--launcher", "mpi"], "invalid choice: 'mpi'"),
])
def test_elastic_launcher_flags_are_checked(argv, message, capsys):
    from dho2_tf.training.ray_launcher import elastic_launch_options

    with pytest.raises(SystemExit) as exit_info:
        elastic_launch_options(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    launch, rest = elastic_launch_options(["--launcher", "ray", "--epochs", "3", "--k", "4"])
    assert (launch.min_workers, launch.max_workers, launch.elastic_timeout) == (1, 2, 60)
    assert rest == ["--epochs", "3", "--k", "4"]  # the job's own flags, for every worker


@pytest.mark.slow
def test_train_elastic_cli_ray_launcher(tmp_path):
    output = tmp_path / "result.json"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "jobs" / "train_elastic.py"), "--launcher", "ray",
           "--min-workers", "2", "--max-workers", "2", "--epochs", "1", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    result = json.loads(output.read_text())  # written by rank 0
    assert [tuple(s) for s in result["starts"]] == [(0, 2)]
    assert [h["size"] for h in result["history"]] == [2] and result["steps"] > 0
    assert 0.0 < result["test_accuracy"] <= 1.0
    # Rank 0 logs, the other worker does not.
    assert len(re.findall(r"elastic start: step=0 epoch=0 size=2", out)) == 1, out[-8000:]
    assert len(re.findall(r"finished: \d+ steps", out)) == 1, out[-8000:]
