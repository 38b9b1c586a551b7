"""Single-process tests of the elastic-training pieces.

The multi-worker run (a worker killed mid-job) is ``tests/jobs/test_train_elastic_parallel.py``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tensorflow as tf
from horovod.common.exceptions import HorovodInternalError

from dho2_tf.consistency import RunConsistencyError
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.distributed.elastic_state import is_horovod_failure
from dho2_tf.training.elastic import (
    COMMIT_KEYS,
    DHO2ElasticState,
    ElasticConfig,
    ElasticTrainer,
    elastic_train,
    global_batch_rows,
    rank_rows,
    elastic_run_fingerprint,
)
from dho2_tf.data_position import curvature_rows
from tests.helpers.launch import REPO

SMALL = ElasticConfig(global_batch=20, curvature_batch=40)
OPT = {"learning_rate": 0.05, "base": "momentum", "k": 2, "refresh_every": 4, "warmup": 3}


def tiny_data(rows: int = 120, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows + 40, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32")
    return x[:rows], y[:rows], x[rows:], y[rows:]


def tiny_model() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(1)
    return tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(8, activation="tanh"),
                                tf.keras.layers.Dense(3)])


class _RankView:
    """Rank/size stand-in: the loss scaling needs no collective."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


def make_trainer(config: ElasticConfig, comm: LocalComm | None = None) -> ElasticTrainer:
    return ElasticTrainer(tiny_model(), OPT, tiny_data(), config, comm or LocalComm())


def test_trainer_trains_each_rank_on_its_slice_of_the_rule_batches() -> None:
    """The rows of step t on rank r are rank r's slice of the data-position rule's batch t, and
    the bound curvature batch is the rule's rows (sorted, the same for any world size)."""
    trainer = make_trainer(SMALL)
    trainer.rebuild(trainer.model.get_weights(), None, 0)
    bound_x, bound_y = trainer.optimizer.curvature.binding["batch"]
    rows = curvature_rows(120, 40, SMALL.seed)
    np.testing.assert_array_equal(bound_x, trainer.x_train[rows])
    np.testing.assert_array_equal(bound_y, trainer.y_train[rows])
    for rank, size in ((0, 1), (1, 2), (2, 3)):
        trainer.comm = _RankView(rank, size)
        for step in (0, 7, 13):
            start, stop = rank_rows(20, rank, size)
            want = np.random.default_rng([SMALL.seed, step // 6]).permutation(120)
            np.testing.assert_array_equal(trainer._slice(global_batch_rows(step, 120, 20, 0)),
                                          want[20 * (step % 6):20 * (step % 6) + 20][start:stop])


def test_config_validation_messages_and_commit_schedule() -> None:
    with pytest.raises(ValueError,
                       match=r"`epochs` must be a positive integer. Received: epochs=0"):
        ElasticConfig(epochs=0)
    with pytest.raises(ValueError, match=r"`global_batch` must not exceed the 50 training rows"):
        ElasticConfig(global_batch=60).steps_per_epoch(50)
    with pytest.raises(ValueError, match=r"`curvature_batch` must not exceed the 120 training "
                                         r"rows. Received: curvature_batch=400"):
        make_trainer(ElasticConfig(global_batch=20, curvature_batch=400))
    config = ElasticConfig(commit_every=15)
    assert [s for s in range(1, 81) if config.is_commit_step(s, 40)] == [15, 30, 40, 45, 60, 75,
                                                                          80]


def test_horovod_failures_are_recognised_including_reducescatter() -> None:
    shut = "Detected at node rs ... horovod_reducescatter\n\nHorovod has been shut down. This was"
    assert is_horovod_failure(tf.errors.UnknownError(None, None, shut))
    assert is_horovod_failure(tf.errors.UnknownError(None, None, "HorovodAllreduce_x failed"))
    assert not is_horovod_failure(tf.errors.UnknownError(None, None, "disk on fire"))
    assert not is_horovod_failure(tf.errors.InvalidArgumentError(None, None, shut))


def test_a_peer_killed_with_sigkill_is_a_horovod_failure() -> None:
    # What a traced DHO2 step raised on the survivor of a `kill -9` of rank 0: the Gloo
    # transport error names only the graph node, neither the op type nor Horovod.
    reset = ("Graph execution error:\n\nDetected at node DHO2/dho2/gradient defined at ...\n"
             "[/tmp/gloo/transport/tcp/pair.cc:598] Connection reset by peer "
             "[127.0.0.1]:41234\n\t [[{{node DHO2/dho2/gradient}}]] [Op:__inference_step_fn_1]")
    assert is_horovod_failure(tf.errors.UnknownError(None, None, reset))
    assert is_horovod_failure(tf.errors.InternalError(None, None, reset))
    assert is_horovod_failure(HorovodInternalError("allreduce failed"))
    closed = "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv"
    assert is_horovod_failure(tf.errors.UnavailableError(None, None, closed))
    # A genuine bug in the step is not retried as a membership change.
    assert not is_horovod_failure(tf.errors.InvalidArgumentError(None, None, reset))
    assert not is_horovod_failure(ValueError("Connection reset by peer"))
    assert not is_horovod_failure(tf.errors.InternalError(None, None, "Blas GEMM launch failed"))


@pytest.mark.parametrize("mode", ["admm", "pipelined"])
def test_modes_without_repartitionable_state_are_rejected(mode: str) -> None:
    with pytest.raises(ValueError, match=r"`mode` must be one of \('auto', 'replicated', 'sharded', 'faithful'\) for "
                                         rf"elastic training.*Received: mode='{mode}'"):
        ElasticTrainer(tiny_model(), {**OPT, "mode": mode}, tiny_data(), SMALL,
                       LocalComm())


def test_invalid_optimizer_config_fails_before_training() -> None:
    with pytest.raises(ValueError, match="`k` must be a positive integer"):
        ElasticTrainer(tiny_model(), {**OPT, "k": 0}, tiny_data(), SMALL, LocalComm())


def test_rebuild_rejects_batches_smaller_than_the_world_and_inconsistent_steps() -> None:
    trainer = make_trainer(ElasticConfig(global_batch=3, curvature_batch=40))
    weights = trainer.model.get_weights()
    trainer.comm = _RankView(0, 4)
    with pytest.raises(ValueError, match=r"must be at least the world size 4. Received: "
                                         r"global_batch=3, curvature_batch=40"):
        trainer.rebuild(weights, None, 0)
    trainer.comm = LocalComm()
    with pytest.raises(RuntimeError, match="Committed optimizer state is at step 0 but the "
                                           "committed step is 5"):
        trainer.rebuild(weights, None, 5)
    with pytest.raises(RuntimeError, match=r"call rebuild\(weights, optimizer_state, step\)"):
        make_trainer(SMALL).train_step(0)


def test_scaled_slice_losses_average_to_the_global_batch_mean() -> None:
    trainer = make_trainer(ElasticConfig(global_batch=10, curvature_batch=40))
    y_true = tf.constant(np.arange(10) % 3, tf.int32)
    logits = tf.constant(np.random.default_rng(0).standard_normal((10, 3)), tf.float32)
    want = float(tf.reduce_mean(trainer.loss(y_true, logits)))
    for size in (1, 2, 3, 4):
        losses = []
        for rank in range(size):
            trainer.comm = _RankView(rank, size)
            start, stop = rank_rows(10, rank, size)
            losses.append(float(trainer._scaled_loss_fn(10)(y_true[start:stop],
                                                            logits[start:stop])))
        assert np.mean(losses) == pytest.approx(want, rel=1e-6)


def test_rollback_to_a_commit_replays_the_same_steps() -> None:
    config = ElasticConfig(epochs=2, global_batch=20, curvature_batch=40, commit_every=5)
    trainer = make_trainer(config)
    state = DHO2ElasticState(trainer, trainer.comm)
    trainer.rebuild(state.weights, None, 0)
    first = []
    for t in range(10):
        first.append(trainer.train_step(t))
        state.step = t + 1
        if state.step == 5:
            state.commit()
    state.restore()
    assert state.step == 5
    trainer.invalidate()
    trainer.rebuild(state.weights, state.optimizer_state, state.step)
    replay = [trainer.train_step(t) for t in range(5, 10)]
    np.testing.assert_allclose(replay, first[5:], rtol=1e-6)


@pytest.mark.parametrize("mode", ["sharded", "faithful"])
def test_elastic_train_in_one_process_commits_on_schedule(mode: str) -> None:
    config = ElasticConfig(epochs=2, global_batch=20, curvature_batch=40, commit_every=4)
    result = elastic_train(tiny_model(), {**OPT, "mode": mode}, tiny_data(), config,
                           comm=LocalComm())
    assert result.steps == 12 and result.starts == [(0, 1)]
    assert [s for s, _ in result.commits] == [4, 6, 8, 12]
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert 0.0 <= result.test_accuracy <= 1.0 and np.isfinite(result.history[-1]["loss"])


def test_resume_from_a_commit_reproduces_the_rest_of_the_run() -> None:
    """A commit handed to ``on_commit`` and passed back as ``resume`` continues the same
    trajectory: the final weights equal the uninterrupted run's."""
    config = ElasticConfig(epochs=2, global_batch=20, curvature_batch=40, commit_every=4)
    commits = {}
    model = tiny_model()
    full = elastic_train(model, OPT, tiny_data(), config, comm=LocalComm(),
                         on_commit=lambda commit, comm: commits.setdefault(commit["step"],
                                                                           commit))
    assert sorted(commits) == [s for s, _ in full.commits] == [4, 6, 8, 12]
    assert all(sorted(c) == sorted(COMMIT_KEYS) for c in commits.values())
    assert commits[8]["step"] == 8 and commits[8]["optimizer_state"] is not None
    want = model.get_weights()
    resumed_model = tiny_model()  # fresh weights: everything must come from the commit
    resumed = elastic_train(resumed_model, OPT, tiny_data(), config, comm=LocalComm(),
                            resume=commits[8])
    assert resumed.starts == [(8, 1)] and [s for s, _ in resumed.commits] == [12]
    assert resumed.history == full.history
    for got, ref in zip(resumed_model.get_weights(), want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"missing: \['history'\]"):
        elastic_train(tiny_model(), OPT, tiny_data(), config, comm=LocalComm(),
                      resume={k: v for k, v in commits[8].items() if k != "history"})


class _DisagreeingComm(LocalComm):
    """Two 'ranks': the other one reports a different global batch (no real peer needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 2

    def allgather_object(self, obj, *, name):
        return [obj, {**obj, "config.global_batch": 40}]


class _OtherModelComm(LocalComm):
    """Two 'ranks': the other one built ``model`` (its real fingerprint is gathered)."""

    def __init__(self, model: tf.keras.Model) -> None:
        super().__init__()
        self.size = 2
        self.other = elastic_run_fingerprint(
            ElasticTrainer(model, OPT, tiny_data(), SMALL, LocalComm()))

    def allgather_object(self, obj, *, name):
        return [obj, self.other]


def test_ranks_disagreeing_on_the_run_fail_before_training() -> None:
    trainer = make_trainer(SMALL)
    fingerprint = elastic_run_fingerprint(trainer)
    assert fingerprint["config.global_batch"] == 20 and fingerprint["steps_per_epoch"] == 6
    assert fingerprint["optimizer.k"] == 2 and fingerprint["training_examples"] == 120
    assert fingerprint["test_examples"] == 40 and fingerprint["input_shape"] == [6]
    assert fingerprint["num_trainable_variables"] == 4
    assert [fingerprint[f"variable[{i}]"][0] for i in range(4)] == [[6, 8], [8], [8, 3], [3]]
    with pytest.raises(RunConsistencyError, match=r"config.global_batch: rank 0: 20; rank 1: 40"):
        elastic_train(tiny_model(), OPT, tiny_data(), SMALL, comm=_DisagreeingComm())
    wider = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(9),
                                 tf.keras.layers.Dense(3)])
    with pytest.raises(RunConsistencyError,
                       match=r"variable\[0\]: rank 0: \[\[6, 8\], \"float32\"\]; "
                             r"rank 1: \[\[6, 9\], \"float32\"\]"):
        elastic_train(tiny_model(), OPT, tiny_data(), SMALL, comm=_OtherModelComm(wider))


def _launcher():
    spec = importlib.util.spec_from_file_location("run_elastic",
                                                  REPO / "jobs/elastic/run_elastic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launcher_reports_every_way_a_job_can_end_without_finishing() -> None:
    launcher = _launcher()
    args = launcher.parse_args(["--np", "2", "--min-np", "2", "--max-np", "3",
                                "--elastic-timeout", "7", "--", "python", "train.py"])
    cmd = launcher.horovodrun_command(args)
    assert cmd[-2:] == ["python", "train.py"]
    assert cmd[cmd.index("--elastic-timeout") + 1] == "7" and "--host-discovery-script" in cmd
    log = "elastic commit: step=15 size=2\nelastic commit: step=30 size=2\n"
    assert launcher.verdict(0, True, log, args) is None
    assert launcher.verdict(0, False, log, args) == (
        "the elastic job ended without finishing training (no worker reported completion); "
        "the last commit was at step 30.")
    lost = log + "TimeoutException: Timed out waiting for {activity}. Please check ..."
    assert launcher.verdict(1, False, lost, args).startswith(
        "the elastic job stopped: after a worker was lost, fewer than --min-np 2 workers were "
        "available for --elastic-timeout 7s (the lost host did not come back); the last "
        "commit was at step 30.")
    same_host = log + "ERROR:root:blacklisted slots count == 2 -> stop running"
    assert "every remaining worker ran on a host where a worker failed" in launcher.verdict(
        1, False, same_host, args)
    assert launcher.verdict(137, True, "", args) == (
        "the elastic job failed (horovodrun exit status 137); no commit was made.")
    for bad in (["--np", "1", "--min-np", "2", "--max-np", "2", "--", "x"],
                ["--np", "2", "--min-np", "1", "--max-np", "2"]):
        with pytest.raises(SystemExit):
            launcher.parse_args(bad)


def test_progress_is_logged_by_whichever_process_is_rank_0_now():
    """After a membership change the former rank 1 is rank 0: its INFO records pass from then
    on; warnings pass on every rank."""
    import logging

    from dho2_tf.training.elastic import RootRankFilter

    comm = LocalComm()
    comm.rank = 1
    keep = RootRankFilter(comm)

    def record(level):
        return logging.LogRecord("dho2_tf", level, __file__, 1, "m", None, None)

    assert not keep.filter(record(logging.INFO)) and keep.filter(record(logging.WARNING))
    comm.rank = 0   # what HorovodComm.refresh does after the reset
    assert keep.filter(record(logging.INFO))
