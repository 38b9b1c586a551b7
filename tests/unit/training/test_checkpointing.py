"""Checkpoints: exact round trips, prioritized-sampler resume, atomic commits, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf.training import checkpointing
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.optimizer import DHO2
from dho2_tf.prioritized import PrioritizedModel, PrioritizedSampler
from tests.helpers.launch import REPO

LOSS = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(rows=96, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 6)).astype("float32"),
            rng.integers(0, 3, rows).astype("int32"))


def mlp(seed=0, width=8):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(width, "tanh"),
                                tf.keras.layers.BatchNormalization(),
                                tf.keras.layers.Dense(3)])


def dho2_model(seed=0, width=8, mode="sharded"):
    model = mlp(seed, width)
    opt = DHO2(learning_rate=0.05, base="adam", k=2, ell=1, refresh_every=3, warmup=2,
               mode=mode, comm=LocalComm())
    model.compile(optimizer=opt, loss=LOSS)
    x, y = data()
    opt.bind(model, LOSS, (x[:32], y[:32]))
    return model, opt


def steps(model, opt, first, count):
    x, y = data()
    for t in range(first, first + count):
        rows = slice((t * 16) % 96, (t * 16) % 96 + 16)
        opt.on_step_begin()
        with tf.GradientTape() as tape:
            loss = LOSS(y[rows], model(x[rows], training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
        opt.on_step_end()


def values(model, opt):
    return [v.numpy().copy() for v in model.variables + opt.variables]


@pytest.mark.parametrize("mode", ["sharded", "replicated", "admm"])
def test_dho2_round_trip_restores_every_variable_and_continues_identically(tmp_path, mode):
    model, opt = dho2_model(mode=mode)
    steps(model, opt, 0, 7)  # two refreshes: eigenpairs, momentum, Adam slots all non-trivial
    assert opt.refresh_index() == 2
    name = checkpointing.save_checkpoint(tmp_path, model, opt, LocalComm(), epoch=1)
    saved = values(model, opt)
    steps(model, opt, 7, 5)
    want = values(model, opt)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    entry = {"name": name, "epoch": 1, "step": 7, "ranks": 1, "mode": mode, "good": True}
    assert manifest == {"format": 3, **entry, "checkpoints": [entry]}
    fresh, fresh_opt = dho2_model(seed=1, mode=mode)
    info = checkpointing.restore_checkpoint(tmp_path, fresh, fresh_opt, LocalComm())
    assert (info.epoch, info.step, info.ranks) == (1, 7, 1)
    for got, ref in zip(values(fresh, fresh_opt), saved):
        np.testing.assert_array_equal(got, ref)
    steps(fresh, fresh_opt, 7, 5)
    for got, ref in zip(values(fresh, fresh_opt), want):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_keras_optimizer_slots_round_trip(tmp_path):
    model = mlp()
    model.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss=LOSS)
    x, y = data()
    model.fit(x, y, batch_size=16, verbose=0)
    checkpointing.save_checkpoint(tmp_path, model, model.optimizer, LocalComm(), epoch=1)
    fresh = mlp(seed=4)
    fresh.compile(optimizer=tf.keras.optimizers.Adam(0.01), loss=LOSS)
    checkpointing.restore_checkpoint(tmp_path, fresh, fresh.optimizer, LocalComm())
    for got, ref in zip(fresh.variables + fresh.optimizer.variables,
                        model.variables + model.optimizer.variables):
        np.testing.assert_array_equal(got.numpy(), ref.numpy())


def prioritized(seed=0, selection="importance"):
    sampler = PrioritizedSampler(k=0.1, r=0.05, selection=selection, seed=2) \
        if selection == "importance" else PrioritizedSampler.recommended(k=0.1, r=0.05, seed=2)
    pmodel = PrioritizedModel(mlp(seed), sampler, comm=LocalComm())
    pmodel.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss=LOSS)
    return pmodel


@pytest.mark.parametrize("selection", ["importance", "adaptive"])
def test_prioritized_sampler_table_and_generator_resume_exactly(tmp_path, selection):
    """2 epochs straight == 1 epoch, checkpoint, a new model resumes for the 2nd epoch; the
    adaptive sampler's switch (τ, its average τ̄ and the decision) resumes too."""
    x, y = data()
    straight = prioritized(selection=selection)
    straight.fit(x, y, epochs=2, verbose=0)
    first = prioritized(selection=selection)
    first.fit(x, y, epochs=1, verbose=0,
              callbacks=[checkpointing.EpochCheckpoint(tmp_path, LocalComm())])
    resumed = prioritized(seed=5, selection=selection)
    resumed.fit(x, y, epochs=2, initial_epoch=1, verbose=0,
                callbacks=[checkpointing.EpochCheckpoint(tmp_path, LocalComm(), resume=True)])
    sampler, want = resumed.sampler, straight.sampler
    assert int(sampler.step.numpy()) == int(want.step.numpy()) > 1
    for got, ref in zip([sampler.prio, sampler.prio_t, sampler.rng.state, sampler.tau,
                         sampler.tau_ema, sampler.importance_on, *resumed.variables],
                        [want.prio, want.prio_t, want.rng.state, want.tau, want.tau_ema,
                         want.importance_on, *straight.variables]):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-7)
    if selection == "adaptive":   # the switch did move away from its initial τ̄ = 1
        assert float(want.tau_ema.numpy()) != 1.0


def test_a_checkpoint_without_the_switch_resumes_with_a_fresh_one(tmp_path):
    """Checkpoints written before the switch was saved still load: table restored, τ̄ fresh."""
    x, y = data()
    first = prioritized(selection="adaptive")
    first.fit(x, y, epochs=1, verbose=0)
    checkpointing.save_checkpoint(tmp_path, first, first.optimizer, LocalComm(), epoch=1)
    (rank_file,) = tmp_path.glob("ckpt-*/rank_00000.npz")
    with np.load(rank_file) as saved:
        older = {k: saved[k] for k in saved.files if not k.startswith("sampler_switch/")}
    assert len(older) < len(np.load(rank_file).files)   # the switch was in the file
    np.savez(rank_file, **older)
    resumed = prioritized(seed=5, selection="adaptive")
    resumed.fit(x, y, epochs=1, initial_epoch=1, verbose=0,   # binds, restores, trains nothing
                callbacks=[checkpointing.EpochCheckpoint(tmp_path, LocalComm(), resume=True)])
    np.testing.assert_array_equal(resumed.sampler.prio.numpy(), first.sampler.prio.numpy())
    # τ̄ is the fresh table's, not the one the first run had reached after an epoch
    assert float(resumed.sampler.tau_ema.numpy()) != float(first.sampler.tau_ema.numpy())


class _TwoRanks(LocalComm):
    """Rank 0 of a 2-rank world whose other rank holds the same values (for a manifest of 2)."""

    def __init__(self):
        super().__init__()
        self.size = 2

    def allgather_object(self, obj, *, name):
        return [obj, obj]


def test_rank_local_state_from_another_world_size_is_refused(tmp_path):
    model, opt = dho2_model(mode="admm")
    steps(model, opt, 0, 2)
    checkpointing.save_checkpoint(tmp_path, model, opt, _TwoRanks(), epoch=1)
    with pytest.raises(ValueError, match=r"written by 2 rank\(s\) and holds rank-local ADMM "
                                         r"iterates; resume it with 2 rank\(s\), not 1"):
        checkpointing.restore_checkpoint(tmp_path, *dho2_model(mode="admm"), LocalComm())


def test_sharded_state_from_two_ranks_loads_into_one(tmp_path):
    model, opt = dho2_model()
    steps(model, opt, 0, 4)
    checkpointing.save_checkpoint(tmp_path, model, opt, _TwoRanks(), epoch=1)
    fresh, fresh_opt = dho2_model(seed=3)
    assert checkpointing.restore_checkpoint(tmp_path, fresh, fresh_opt, LocalComm()).ranks == 2
    for got, ref in zip(values(fresh, fresh_opt), values(model, opt)):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("written,resumed", [("sharded", "auto"), ("auto", "sharded")])
def test_manifest_records_the_resolved_layout_and_sharded_resumes_as_replicated(
        tmp_path, written, resumed):
    """mode="auto" resolves to "replicated" here; its state loads into "sharded" and back."""
    model, opt = dho2_model(mode=written)
    steps(model, opt, 0, 7)
    checkpointing.save_checkpoint(tmp_path, model, opt, LocalComm(), epoch=1)
    saved = values(model, opt)
    manifest = json.loads((tmp_path / "checkpoint.json").read_text())
    assert manifest["mode"] == opt.resolved_mode == {"auto": "replicated"}.get(written, written)
    steps(model, opt, 7, 4)
    fresh, fresh_opt = dho2_model(seed=1, mode=resumed)
    checkpointing.restore_checkpoint(tmp_path, fresh, fresh_opt, LocalComm())
    assert fresh_opt.resolved_mode != opt.resolved_mode
    for got, ref in zip(values(fresh, fresh_opt), saved):
        np.testing.assert_array_equal(got, ref)
    steps(fresh, fresh_opt, 7, 4)
    for got, ref in zip(values(fresh, fresh_opt), values(model, opt)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_clear_errors_for_wrong_model_mode_manifest_and_arguments(tmp_path):
    model, opt = dho2_model()
    with pytest.raises(ValueError, match=r"`epoch` must be a non-negative integer\. "
                                         r"Received: epoch=-1"):
        checkpointing.save_checkpoint(tmp_path, model, opt, LocalComm(), epoch=-1)
    with pytest.raises(FileNotFoundError, match="No checkpoint manifest"):
        checkpointing.restore_checkpoint(tmp_path, model, opt, LocalComm())
    checkpointing.save_checkpoint(tmp_path, model, opt, LocalComm(), epoch=1)
    with pytest.raises(ValueError, match=r"shape \(6, 8\) for model variable .*this run has "
                                         r"\(6, 16\)"):
        checkpointing.restore_checkpoint(tmp_path, *dho2_model(width=16), LocalComm())
    with pytest.raises(ValueError, match="written with DHO2 mode 'sharded'; this run's "
                                         "optimizer has mode 'admm'"):
        checkpointing.restore_checkpoint(tmp_path, *dho2_model(mode="admm"), LocalComm())
    pipelined = DHO2(k=2, mode="pipelined")
    with pytest.raises(ValueError, match="mode='pipelined' are not supported"):
        checkpointing.save_checkpoint(tmp_path, model, pipelined, LocalComm())
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint.json is unreadable"):
        checkpointing.read_manifest(tmp_path)


WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from dho2_tf.training import checkpointing
    from dho2_tf.distributed.comm import LocalComm
    from tests.unit.training.test_checkpointing import dho2_model, steps, values

    folder, kill_at = sys.argv[1], sys.argv[2]
    model, opt = dho2_model()
    steps(model, opt, 0, 4)
    checkpointing.save_checkpoint(folder, model, opt, LocalComm(), epoch=1)
    np.savez(os.path.join(folder, "..", "expected.npz"), *values(model, opt))
    steps(model, opt, 4, 3)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "between-files":   # shared.npz is written, the per-rank file is not
        original = checkpointing._fsync_npz
        calls = []
        def write_then_die(path, arrays):
            calls.append(path)
            if len(calls) == 2:
                die()
            original(path, arrays)
        checkpointing._fsync_npz = write_then_die
    else:                            # every file is written, the manifest is not replaced
        write_json = checkpointing._write_json_atomically
        checkpointing._write_json_atomically = lambda path, payload: (
            die() if path.endswith("checkpoint.json") else write_json(path, payload))
    checkpointing.save_checkpoint(folder, model, opt, LocalComm(), epoch=2)
    print("NOT KILLED")
""")


@pytest.mark.parametrize("kill_at", ["between-files", "before-manifest"])
def test_a_writer_killed_mid_checkpoint_leaves_the_previous_one_loadable(tmp_path, kill_at):
    folder = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", WRITER, str(folder), kill_at], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr  # died by SIGKILL mid-write
    info = checkpointing.read_manifest(folder)
    assert (info.epoch, info.step) == (1, 4)
    assert any(entry.startswith((".tmp-ckpt-", "ckpt-00002")) for entry in os.listdir(folder))
    fresh, fresh_opt = dho2_model(seed=7)
    checkpointing.restore_checkpoint(folder, fresh, fresh_opt, LocalComm())
    with np.load(tmp_path / "expected.npz") as expected:
        for i, got in enumerate(values(fresh, fresh_opt)):
            np.testing.assert_array_equal(got, expected[f"arr_{i}"])
    # The next successful save commits and clears what the dead writer left behind (the
    # epoch-1 checkpoint is kept: the newest two are).
    name = checkpointing.save_checkpoint(folder, fresh, fresh_opt, LocalComm(), epoch=2)
    assert sorted(os.listdir(folder)) == sorted(["checkpoint.json", info.name, name])
