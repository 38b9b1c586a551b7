"""The Ray launcher (``dho2_tf.ray_launcher``) on a local Ray instance with 2 CPUs.

DHO2 ``sharded`` on 2 Ray workers must end with the same weights as ``horovodrun -np 2`` with
the same seed; ``jobs/train.py --launcher ray`` prints the usual RESULT line with logs from rank 0
only; an error on one worker fails the launch (no hang), bad input fails before Ray starts, and
the cluster check passes on 2 Ray workers and under horovodrun. Ray is part of the test set-up
(the ``ray`` extra, installed by ``make test``): without it these tests fail, never skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.launch import REPO, horovodrun_path, run_horovod

pytestmark = pytest.mark.parallel

WEIGHTS_SCRIPT = REPO / "tests" / "parallel" / "ray_sharded_weights.py"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance (2 CPUs, no dashboard) for this module's tests, shut down after them
    even on failure."""
    from dho2_tf.ray_launcher import require_ray, worker_env

    try:
        ray, _ = require_ray()
    except ImportError as err:
        pytest.fail(str(err))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # as run_horovod sets it for horovodrun
        patch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        try:
            ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()})
            yield ray
        finally:
            ray.shutdown()


def test_bad_input_fails_before_ray_starts():
    from dho2_tf.experiment import TrainConfig
    from dho2_tf.ray_launcher import require_ray, run_function_on_ray, run_on_ray

    ray, _ = require_ray()

    with pytest.raises(ValueError, match="epochs"):
        run_on_ray(TrainConfig(epochs=0), num_workers=2)
    with pytest.raises(ValueError, match="`num_workers` must be a positive integer"):
        run_function_on_ray(print, num_workers=0)
    assert not ray.is_initialized()  # (runs before this module's Ray instance starts)


def test_ray_sharded_weights_equal_horovodrun(local_ray, tmp_path):
    from dho2_tf.ray_launcher import run_function_on_ray
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

    import models

    tf.keras.utils.set_random_seed(CONFIG["seed"])
    initial = models.get("mlp", (40,), 10, weight_decay=3e-4).get_weights()
    assert max(float(np.abs(a - b).max()) for a, b in zip(initial, expected)) > 1e-2


def test_failure_on_one_worker_fails_the_launch(local_ray):
    from dho2_tf.ray_launcher import run_function_on_ray
    from tests.parallel.ray_sharded_weights import fail_on_rank

    # Rank 1 raises while rank 0 blocks in an allreduce: the error reaches the driver (no hang).
    with pytest.raises(ValueError, match="rank 1 fails on purpose"):
        run_function_on_ray(fail_on_rank, (1,), num_workers=2)


def test_cluster_check_on_ray(local_ray, tmp_path):
    from dho2_tf.ray_launcher import check_cluster, summary_line

    report = check_cluster(2, shared_dir=str(tmp_path))
    assert (report["rank"], report["size"], report["allreduce"]) == (0, 2, 3.0)
    assert len(report["hosts"]) == 2 and len(set(report["hosts"])) == 1
    assert summary_line(report).startswith("CLUSTER OK ranks=2 hosts=")
    assert os.listdir(tmp_path) == []  # markers cleaned up


def test_cluster_check_under_horovodrun(tmp_path):
    cmd = [horovodrun_path(), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-m",
           "dho2_tf.ray_launcher", "--check", "--shared-dir", str(tmp_path)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "CLUSTER OK" in line]
    assert len(lines) == 1 and lines[0].startswith("[0]"), proc.stdout[-4000:]
    assert re.search(r"CLUSTER OK ranks=2 hosts=\S+:2 allreduce=3 shared_dir=", lines[0])
    assert os.listdir(tmp_path) == []


def _train_job():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.parametrize("argv, message", [
    (["--num-workers", "2"], "need --launcher ray"),
    (["--ray-address", "auto"], "need --launcher ray"),
    (["--launcher", "ray", "--num-workers", "0"], "--num-workers must be a positive integer"),
    (["--launcher", "mpi"], "invalid choice: 'mpi'"),
])
def test_launcher_flags_are_checked(argv, message, capsys):
    job = _train_job()
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
