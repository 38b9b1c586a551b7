"""check_run_consistency: which keys differ, each rank's value, and no-op in one process."""

from __future__ import annotations

import numpy as np
import pytest

from dho2_tf.consistency import (RunConsistencyError, check_run_consistency,
                                 find_differences, flatten_config)
from dho2_tf.distributed.comm import LocalComm


class _Ranks(LocalComm):
    """Rank 0 of a world whose ranks hold ``others`` (rank 0's own fingerprint first)."""

    def __init__(self, *others):
        super().__init__()
        self.others = others
        self.size = 1 + len(others)
        self.names = []

    def allgather_object(self, obj, *, name):
        self.names.append(name)
        return [obj, *self.others]


def test_agreeing_ranks_pass_and_tuples_equal_lists():
    comm = _Ranks({"batch_size": 50, "shape": [3, 4]}, {"batch_size": 50, "shape": [3, 4]})
    check_run_consistency(comm, {"batch_size": 50, "shape": (3, 4)}, what="Training run")
    assert comm.names == ["dho2/consistency/Training_run"]


def test_each_differing_key_is_named_with_every_rank_value_and_nothing_else():
    mine = {"batch_size": 50, "k": 2, "lr": 0.1, "model": "mlp", "only_rank0": 1}
    comm = _Ranks({**mine, "batch_size": 25, "only_rank0": 1},
                  {**mine, "k": 3})
    with pytest.raises(RunConsistencyError) as err:
        check_run_consistency(comm, mine, what="Training run")
    assert str(err.value).splitlines() == [
        "Training run ranks disagree on batch_size, k (every rank must use the same value):",
        "  batch_size: rank 0,2: 50; rank 1: 25",
        "  k: rank 0,1: 2; rank 2: 3"]
    assert err.value.differences == {"batch_size": [50, 25, 50], "k": [2, 2, 3]}
    assert isinstance(err.value, ValueError)


def test_a_key_missing_on_one_rank_is_a_difference():
    assert find_differences([{"a": 1, "b": 2}, {"a": 1}]) == {"b": [2, "<missing>"]}
    with pytest.raises(RunConsistencyError, match=r"  b: rank 0: 2; rank 1: <missing>"):
        check_run_consistency(_Ranks({"a": 1}), {"a": 1, "b": 2})


def test_optional_keys_are_compared_among_the_ranks_that_report_them():
    # Pipelined curvature ranks do not call fit: fit.* is compared among the training ranks.
    ranks = [{"a": 1, "fit.steps": 30}, {"a": 1}, {"a": 1, "fit.steps": 30}]
    assert find_differences(ranks, optional=("fit.",)) == {}
    ranks[2]["fit.steps"] = 15
    assert find_differences(ranks, optional=("fit.",)) == {
        "fit.steps": [30, "<missing>", 15]}
    assert find_differences([{"a": 1}, {}], optional=("fit.",)) == {"a": [1, "<missing>"]}


def test_single_process_is_a_no_op_but_bad_fingerprints_are_still_rejected():
    check_run_consistency(LocalComm(), {"a": 1})
    with pytest.raises(TypeError, match="must be flat; key 'a' holds a mapping"):
        check_run_consistency(LocalComm(), {"a": {"b": 1}})
    with pytest.raises(TypeError, match="value of 'a' is not JSON-serialisable"):
        check_run_consistency(LocalComm(), {"a": object()})


def test_flatten_config_nests_with_dots_and_makes_numpy_scalars_numbers():
    assert flatten_config({"lr": np.float32(0.5),
                           "opts": {"damping": 1e-9, "inner": {"x": (1, 2)}},
                           "fn": len}, "optimizer.") == {
        "optimizer.lr": 0.5, "optimizer.opts.damping": 1e-9, "optimizer.opts.inner.x": [1, 2],
        "optimizer.fn": repr(len)}
    first, second = (flatten_config({"fn": lambda: i}) for i in (1, 2))  # two distinct objects
    assert first == second and " at 0x" not in first["fn"]


class _Mirror(LocalComm):
    """Rank 0 of two ranks; rank 1 holds ``change(rank 0's fingerprint)``."""

    def __init__(self, change):
        super().__init__()
        self.size, self.change = 2, change

    def allgather_object(self, obj, *, name):
        return [obj, self.change(dict(obj))]


def test_dho2_verify_consistency_names_the_differing_optimizer_key():
    import tensorflow as tf

    from dho2_tf import DHO2

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    opt = DHO2(k=2, comm=LocalComm())
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    opt._comm = _Mirror(lambda fp: {**fp, "optimizer.k": 3})
    with pytest.raises(RunConsistencyError) as err:
        opt.verify_consistency(model)
    assert str(err.value).splitlines()[0].startswith("DHO2 ranks disagree on optimizer.k (")
    assert err.value.differences == {"optimizer.k": [2, 3]}
    opt._comm = _Mirror(lambda fp: fp)
    opt.verify_consistency(model)          # identical ranks pass
    opt._comm = _Mirror(lambda fp: {**fp, "variable[0]": [[3, 4], "float32"]})
    with pytest.raises(RunConsistencyError, match=r'  variable\[0\]: rank 0: \[\[3, 2\], '
                                                  r'"float32"\]; rank 1: \[\[3, 4\], "float32"\]'):
        opt.verify_consistency(model)


def test_context_is_named_beside_a_difference_and_never_a_difference_by_itself():
    """Process sets derived from each rank's mode: the mode is reported with them."""
    comm = _Ranks([{"sets": [[0], [1]]}, {"mode": "pipelined", "curvature_ranks": 1}])
    with pytest.raises(RunConsistencyError) as err:
        check_run_consistency(comm, {"sets": []}, what="Start",
                              context={"mode": "sharded", "curvature_ranks": 1})
    assert str(err.value).splitlines() == [
        "Start ranks disagree on sets, mode (every rank must use the same value):",
        "  sets: rank 0: []; rank 1: [[0], [1]]",
        '  mode: rank 0: "sharded"; rank 1: "pipelined"']
    assert err.value.differences == {"sets": [[], [[0], [1]]], "mode": ["sharded", "pipelined"]}
    # Equal fingerprints pass however the context differs (an empty context is sent too).
    check_run_consistency(_Ranks([{"sets": []}, {"mode": "replicated"}]), {"sets": []},
                          what="Start", context={"mode": "sharded"})
    check_run_consistency(_Ranks([{"sets": []}, {}]), {"sets": []}, what="Start", context={})
    with pytest.raises(TypeError, match="context value of 'mode' is not JSON-serialisable"):
        check_run_consistency(LocalComm(), {"sets": []}, context={"mode": object()})
