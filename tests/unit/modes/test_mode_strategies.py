"""The modes as strategies: made from the hyper-parameters, working on a context, returning data
(step plans, host actions, curvature capabilities), never holding the optimizer."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dho2_tf import DHO2, LocalComm
from dho2_tf.modes import MODES, ModeContext, check_mode_options, make_mode
from dho2_tf.modes.context import AverageStatistics, RefreshIfDue
from tests.unit.optimizer.test_keras_integration import toy_model

#: (reduction, gathers δ, adjusts Ḡ, projection over the ranks) of each single-process mode.
PLANS = {"sharded": ("reducescatter", True, False, True),
         "replicated": ("allreduce", False, False, False),
         "faithful": ("allreduce", False, True, False),
         "admm": ("none", False, True, False)}


def built(mode: str, **kwargs) -> tuple[DHO2, tf.keras.Model]:
    model = toy_model()
    opt = DHO2(learning_rate=0.05, base="sgd", k=2, mode=mode, comm=LocalComm(), **kwargs)
    opt.build(model.trainable_variables)
    return opt, model


def flat(variables) -> np.ndarray:
    return np.concatenate([v.numpy().ravel() for v in variables])


@pytest.mark.parametrize("mode", sorted(PLANS))
def test_a_built_mode_holds_its_context_and_no_optimizer(mode):
    opt, model = built(mode)
    strategy = opt.distribution
    assert isinstance(strategy.context, ModeContext)
    assert strategy.context.weights == opt.model_variables and strategy.context.comm is opt.comm
    held = list(vars(strategy).values()) + list(strategy.context)
    assert not any(isinstance(value, DHO2) for value in held)
    # The mode's own variables are optimizer variables (checkpointed with it), by name.
    names = {v.name.split("/")[-1].split(":")[0] for v in opt.variables}
    assert set(strategy.context.state) <= names
    expected = {"faithful": {"window_velocity", "window_start", "window_jumps"},
                "admm": {"admm_z", "admm_dual", "admm_residuals", "admm_rounds",
                         "admm_started"}}.get(mode, set())
    assert set(strategy.context.state) == expected


@pytest.mark.parametrize("mode", sorted(PLANS))
def test_step_plan_is_data(mode):
    opt, _ = built(mode)
    plan = opt.distribution.step_plan()
    reduce, gather, adjusts, collective_projection = PLANS[mode]
    assert (plan.reduce, plan.gather, plan.adjust is not None) == (reduce, gather, adjusts)
    assert (plan.projection[0] is opt.comm) == collective_projection
    assert plan.group is None


def test_faithful_adjustment_adds_the_window_offset():
    """G' = G + σ_w·v."""
    opt, model = built("faithful", window_sigma=0.25)
    n = opt.spec.n
    v = np.linspace(-1.0, 1.0, n).astype("float32")
    opt.distribution.velocity.assign(v)
    g = np.random.default_rng(0).standard_normal(n).astype("float32")
    got = opt.distribution.step_plan().adjust(tf.constant(g), opt.model_variables)
    np.testing.assert_allclose(got.numpy(), g + 0.25 * v, rtol=1e-6)
    none, _ = built("faithful", window_rule="none")
    assert none.distribution.step_plan().adjust is None


def test_admm_adjustment_is_the_augmented_lagrangian_gradient():
    """G' = G + π + ρ(x − z)."""
    opt, model = built("admm", rho=0.3)
    rng = np.random.default_rng(1)
    n = opt.spec.n
    z, dual, g = (rng.standard_normal(n).astype("float32") for _ in range(3))
    opt.distribution.z.assign(z)
    opt.distribution.dual.assign(dual)
    got = opt.distribution.step_plan().adjust(tf.constant(g), opt.model_variables)
    x = flat(model.trainable_variables)
    np.testing.assert_allclose(got.numpy(), g + dual + 0.3 * (x - z), rtol=1e-5, atol=1e-6)


def test_admm_hooks_return_host_actions():
    """z ← x at the first step (then a refresh when due); a round every τ steps, whose
    statistics average is left to the host."""
    opt, model = built("admm", tau=3)
    strategy = opt.distribution
    assert strategy.on_step_begin(0) == (RefreshIfDue(),)
    np.testing.assert_array_equal(strategy.z.numpy(), flat(model.trainable_variables))
    assert strategy.on_step_end(2) == () and int(strategy.rounds.numpy()) == 0
    assert strategy.on_step_end(3) == (AverageStatistics("dho2/admm/bn_stats"),)
    assert int(strategy.rounds.numpy()) == 1


@pytest.mark.parametrize("mode", sorted(PLANS))
def test_curvature_capabilities(mode):
    opt, _ = built(mode, rho=0.2)
    caps = opt.distribution.curvature_capabilities(opt.comm)
    assert caps.estimates and caps.lanczos_group is None and caps.warm_refresh
    assert caps.eigenvalue_shift == (0.2 if mode == "admm" else 0.0)
    assert caps.hvp_reduce == ("root0" if mode == "faithful" else "mean")
    assert caps.gathers_vectors == (mode in ("faithful", "admm"))
    assert caps.reuses_check == (mode != "faithful")   # its window jump moves the weights


def test_modes_are_made_from_the_hyperparameters_alone():
    hp = DHO2(k=2, mode="admm").hp
    for name in MODES:
        strategy = make_mode(name, hp)
        assert strategy.hp is hp and strategy.name == name
        with pytest.raises(RuntimeError, match="no context before the optimizer is built"):
            strategy.context


def test_the_registry_validates_the_mode_options():
    assert check_mode_options("faithful", None, None) == "extrapolate"
    assert check_mode_options("sharded", None, 200) == "none"
    with pytest.raises(ValueError, match="`max_refresh_every` .* not available with "
                                         "mode='pipelined'"):
        check_mode_options("pipelined", None, 200)
    with pytest.raises(ValueError, match="Received: window_rule='extrapolate', mode='admm'"):
        check_mode_options("admm", "extrapolate", None)
    with pytest.raises(ValueError, match="Received: mode='ring'"):
        check_mode_options("ring", None, None)
