"""Mode algebra in one process: window rule, ADMM with P = 1, validation. (The pure
functions of dho2_tf.distributed: tests/unit/distributed/.)"""

from __future__ import annotations

import numpy as np
import pytest

from dho2_tf import DHO2, LocalComm
from tests.helpers.steps import train_step
from tests.unit.optimizer.test_keras_integration import LOSS, toy_data, toy_model


def flat_weights(model):
    return np.concatenate([v.numpy().ravel() for v in model.trainable_variables])


def run_custom_loop(opt, model, x, y, steps, batch=32, record=None):
    opt.bind(model, LOSS, (x[:64], y[:64]))

    step = train_step(model, opt, LOSS)

    for t in range(steps):
        i = (t * batch) % (len(x) - batch)
        before = flat_weights(model)
        opt.on_step_begin()
        if record is not None:
            record.append((t, before, flat_weights(model), opt.refresh_index()))
        step(x[i:i + batch], y[i:i + batch])
        opt.on_step_end()
    opt.on_train_end()


def test_t8_window_jump_equals_accumulated_window_displacements():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.01, base="adam", k=2, mode="faithful", refresh_every=5, warmup=0,
               comm=LocalComm())
    record: list = []
    run_custom_loop(opt, model, x, y, steps=21, record=record)
    # Window boundaries are the refresh steps: t = 0, 4, 9, 14, 19.
    refresh_steps = [t for (t, _, _, idx), prev in zip(record[1:], record) if idx > prev[3]]
    refresh_steps = [0] + refresh_steps
    assert refresh_steps == [0, 4, 9, 14, 19]
    rows = {t: (before, after) for t, before, after, _ in record}
    velocity = np.zeros_like(rows[0][0])
    starts = [rows[0][1]]                                     # θ̃_0 (no jump before window 0)
    for j, t in enumerate(refresh_steps[1:], start=1):
        before, after = rows[t]                               # θ_end(j-1), θ after the jump
        velocity = velocity + (before - starts[-1])           # v_{j-1} = Σ D_i
        np.testing.assert_allclose(after - before, velocity, rtol=1e-5, atol=1e-7)
        starts.append(after)                                  # θ̃_j = θ_end + v
    assert int(opt.distribution.jumps.numpy()) == 4
    np.testing.assert_allclose(opt.distribution.velocity.numpy(), velocity, rtol=1e-5, atol=1e-7)
    # Between boundaries on_step_begin changes nothing.
    for t, before, after, _ in record:
        if t not in refresh_steps:
            np.testing.assert_array_equal(before, after)


def test_t11_admm_single_rank_keeps_zero_dual_and_z_equals_x():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="momentum", k=2, mode="admm", rho=0.1, tau=3,
               refresh_every=6, warmup=2, comm=LocalComm())
    run_custom_loop(opt, model, x, y, steps=12)
    assert int(opt.distribution.rounds.numpy()) == 4
    np.testing.assert_allclose(opt.distribution.dual.numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(opt.distribution.z.numpy(), flat_weights(model), atol=1e-6)
    metrics = opt.curvature_metrics()
    assert metrics["admm_rounds"] == 4.0 and metrics["admm_primal_residual"] < 1e-2


def test_admm_eigen_rates_use_hessian_plus_rho():
    x, y = toy_data()
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="sgd", k=2, mode="admm", rho=0.5, tau=2,
               refresh_every=4, warmup=1, comm=LocalComm())
    run_custom_loop(opt, model, x, y, steps=2)
    lam = opt.state.eigenvalues.numpy()
    np.testing.assert_allclose(opt.state.rates.numpy(), 1.0 / np.abs(lam + 0.5), rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="admm", tau=0), "`tau` must be a positive integer. Received: tau=0"),
    (dict(mode="admm", rho=0.0), "`rho` must be a finite number in (0.0, inf). Received: rho=0.0"),
    (dict(mode="admm", rho=-1.0), "Received: rho=-1.0"),
    (dict(mode="pipelined", refresh_every=4, delivery_delay=5),
     "`delivery_delay` must be an integer in [1, 4]. Received: delivery_delay=5"),
    (dict(mode="sharded", window_rule="extrapolate"), "`window_rule` must be 'none'"),
    (dict(mode="nope"), "`mode` must be one of ('auto', 'sharded', 'replicated', 'faithful', "
                        "'pipelined', 'admm')"),
    (dict(mode="pipelined", comm=LocalComm()), "mode='pipelined' needs at least 2 ranks"),
    (dict(mode="pipelined", curvature_ranks=0), "`curvature_ranks` must be a positive integer"),
])
def test_mode_misconfiguration_is_rejected_at_construction(kwargs, message):
    with pytest.raises(ValueError) as err:
        DHO2(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("mode", ["auto", "sharded", "replicated", "faithful", "pipelined",
                                  "admm"])
def test_config_round_trip_every_mode(mode):
    opt = DHO2(mode=mode, k=3, rho=0.2, tau=4, curvature_ranks=1, delivery_delay=3,
               refresh_every=6)
    config = opt.get_config()
    assert DHO2.from_config(dict(config)).get_config() == config
    assert config["mode"] == mode


def test_serve_curvature_outside_pipelined_mode_says_so():
    opt = DHO2(comm=LocalComm())
    with pytest.raises(RuntimeError, match="serve_curvature\\(\\) runs only on the curvature"):
        opt.serve_curvature()


def test_auto_mode_resolves_by_memory_budget_and_logs_the_choice(caplog):
    """mode="auto" becomes "replicated" when (slots+1+K)·n·4 + m·n·4 bytes fit the budget (the
    basis of a float32 model is float32, and the log says so)."""
    model = toy_model()
    n = model.count_params()
    needed = (2 + 1 + 3) * n * 4 + 12 * n * 4            # adam: 2 slots; K = 3; m = 4K = 12
    chosen = {}
    for budget in (needed, needed - 1):
        opt = DHO2(base="adam", k=3, memory_budget=budget, comm=LocalComm())
        assert opt.mode == "auto" and opt.resolved_mode is None
        assert opt.replicated_state_bytes(n) == needed
        caplog.clear()
        with caplog.at_level("INFO", logger="dho2_tf"):
            opt.build(model.trainable_variables)
        chosen[budget] = opt.resolved_mode
        logs = [r.getMessage() for r in caplog.records if "mode='auto' chose" in r.getMessage()]
        assert len(logs) == 1 and f"chose {opt.resolved_mode!r}" in logs[0], logs
        assert f"n={n}, K=3" in logs[0] and f"{needed / 2**20:.1f} MiB" in logs[0], logs[0]
        assert "12 rows in float32" in logs[0], logs[0]
        # The user's argument round-trips; the layout is rebuilt the same way.
        config = opt.get_config()
        assert config["mode"] == "auto" and config["memory_budget"] == budget
        again = DHO2.from_config(dict(config))
        again._comm = LocalComm()
        again.build(toy_model().trainable_variables)
        assert again.resolved_mode == opt.resolved_mode
        assert opt.export_state()["__mode__"] == opt.resolved_mode
    assert chosen == {needed: "replicated", needed - 1: "sharded"}
    assert DHO2().mode == "auto" and DHO2().memory_budget == 1 << 30      # the defaults


@pytest.mark.parametrize("budget", [0, -1, 1.5, True, "1GB"])
def test_memory_budget_must_be_a_positive_integer(budget):
    with pytest.raises(ValueError, match="`memory_budget` must be a positive integer. "
                                         rf"Received: memory_budget={budget!r}"):
        DHO2(memory_budget=budget)


def test_explicit_modes_ignore_the_budget():
    model = toy_model()
    for mode in ("sharded", "replicated"):
        opt = DHO2(mode=mode, memory_budget=1, comm=LocalComm())
        assert opt.resolved_mode == mode
        opt.build(model.trainable_variables)
        assert opt.resolved_mode == mode and opt.distribution.shards_state == (mode == "sharded")


def test_replicated_and_sharded_one_process_runs_are_identical():
    """With one rank both layouts hold the full state and run the same step."""
    x, y = toy_data()
    weights = []
    for mode in ("sharded", "replicated"):
        model = toy_model()
        opt = DHO2(learning_rate=0.05, base="nesterov", k=3, mode=mode, refresh_every=5,
                   warmup=1, comm=LocalComm())
        run_custom_loop(opt, model, x, y, steps=12)
        assert opt.refresh_index() == 3
        weights.append(flat_weights(model))
    np.testing.assert_array_equal(weights[0], weights[1])
