"""The DHO2 section of a run's configuration: one set of defaults, every spelling of a file,
flags, and checkpoints recorded before the section existed."""

import inspect
import json
import os

import pytest

from dho2_tf import DHO2
from dho2_tf.consistency import flatten_config
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.training.checkpointing import CheckpointError, read_checkpoints
from dho2_tf.training.dho2_arguments import (FORMERLY_TOP_LEVEL, RUN_LEVEL_ARGUMENTS,
                                             DHO2Arguments, upgrade_run_record)
from dho2_tf.training.experiment import TrainConfig, train

TINY = {"num_samples": 500, "epochs": 1, "batch_size": 50, "verbose": 0,
        "optimizer": "adam", "learning_rate": 1e-3, "schedule": "constant"}


def test_the_section_and_the_run_level_fields_are_every_dho2_argument_with_its_default():
    signature = {name: p.default for name, p in inspect.signature(DHO2.__init__).parameters.items()
                 if p.default is not inspect.Parameter.empty and name not in ("comm", "name")}
    section = DHO2Arguments().keywords()
    assert set(section) | set(RUN_LEVEL_ARGUMENTS) == set(signature)
    assert not set(section) & set(RUN_LEVEL_ARGUMENTS)
    assert section == {name: signature[name] for name in section}
    config = TrainConfig()
    assert {name: getattr(config, name) for name in RUN_LEVEL_ARGUMENTS} == \
        {name: signature[name] for name in RUN_LEVEL_ARGUMENTS}


def test_make_dho2_is_dho2_built_from_the_section():
    config = TrainConfig(learning_rate=0.05, momentum=0.8, seed=3, dho2=DHO2Arguments(
        base="nesterov", k=4, ell=1, refresh_every=30, eigenvalue_damping=1e-6, tau=3))
    built = config.make_dho2(0.05, LocalComm()).get_config()
    direct = DHO2(learning_rate=0.05, momentum=0.8, seed=3, base="nesterov", k=4, ell=1,
                  refresh_every=30, eigenvalue_damping=1e-6, tau=3,
                  comm=LocalComm()).get_config()
    assert built == direct
    assert (built["lanczos_order"], built["warmup"]) == (20, 30)   # resolved by DHO2


def test_nested_flat_and_older_spellings_give_one_config():
    nested = TrainConfig.from_dict({"epochs": 3, "dho2": {"k": 16, "eigenvalue-damping": 5e-9,
                                                          "refresh_every": "50"}})
    flat = TrainConfig.from_dict({"epochs": 3, "k": 16, "eigenvalue_damping": 5e-9,
                                  "refresh-every": 50})
    older = TrainConfig.from_dict({"epochs": 3, "k": 16, "refresh_every": 50,
                                   "dho2_options": {"eigenvalue_damping": 5e-9}})
    assert nested == flat == older
    assert (nested.dho2.k, nested.dho2.refresh_every, nested.dho2.eigenvalue_damping) == \
        (16, 50, 5e-9)
    assert nested.dho2.alpha == DHO2Arguments().alpha
    later = TrainConfig.from_dict({"refresh_every": 80}, start=nested)
    assert (later.dho2.k, later.dho2.refresh_every, later.epochs) == (16, 80, 3)


@pytest.mark.parametrize("values, message", [
    ({"k": 10, "dho2_options": {"k": 3}},
     "DHO2's `k` is set twice in config: k=10 and dho2_options.k=3. Set it once."),
    ({"dho2": {"mode": "sharded"}, "mode": "auto"},
     "DHO2's `mode` is set twice in config: dho2.mode='sharded' and mode='auto'."),
    ({"dho2": {"nonsense": 1}}, "Unknown DHO2 argument 'nonsense' in config. Valid DHO2 "
                                "arguments: alpha, base, beta_1"),
    ({"dho2": {"learning_rate": 0.1}}, "`learning_rate` is a top-level key of the run"),
    ({"dho2": [1, 2]}, "`dho2` in config must be a mapping of DHO2 arguments"),
    ({"dho2": {"k": 2.5}}, "`k` must be of type int. Received: k=2.5"),
])
def test_bad_sections_are_refused_naming_the_key(values, message):
    with pytest.raises(ValueError, match=_literal(message)):
        TrainConfig.from_dict(values)


def _literal(text):
    import re

    return re.escape(text)


def _older_record(run):
    """``run`` as a checkpoint recorded it before the section: a few arguments at the top
    level, the explicitly set others under ``dho2_options.``, defaults absent."""
    defaults = DHO2Arguments().keywords()
    out = {}
    for key, value in run.items():
        if not key.startswith("dho2."):
            out[key] = value
            continue
        name = key[len("dho2."):]
        if name in FORMERLY_TOP_LEVEL:
            out[name] = value
        elif value != defaults[name]:
            out[f"dho2_options.{name}"] = value
    return out


def test_upgrade_maps_an_older_record_onto_the_section_keys():
    config = TrainConfig(dho2=DHO2Arguments(k=7, eigenvalue_damping=1e-7, tau=4))
    current = flatten_config({"dho2": config.dho2.keywords(), "epochs": 60})
    older = _older_record(current)
    assert older["k"] == 7 and older["dho2_options.eigenvalue_damping"] == 1e-7
    assert "dho2.k" not in older and "dho2_options.rho" not in older
    assert upgrade_run_record(older) == current
    assert upgrade_run_record(current) == current


def test_a_checkpoint_recorded_before_the_section_resumes_and_refuses_changes(tmp_path):
    folder = str(tmp_path / "ckpt")
    values = {**TINY, "checkpoint_dir": folder, "k": 3, "eigenvalue_damping": 1e-7}
    train(TrainConfig.from_dict(values), LocalComm())
    manifest = os.path.join(folder, "checkpoint.json")
    with open(manifest, encoding="utf-8") as handle:
        raw = json.load(handle)
    recorded = raw["run"]
    assert recorded["dho2.k"] == 3 and recorded["dho2.eigenvalue_damping"] == 1e-7
    raw["run"] = _older_record(recorded)
    raw["checkpoints"] = [{**entry, "run": raw["run"]} for entry in raw["checkpoints"]]
    with open(manifest, "w", encoding="utf-8") as handle:
        json.dump(raw, handle)
    assert "dho2.k" not in read_checkpoints(folder)[-1].run

    with pytest.raises(CheckpointError, match=_literal("dho2.k: checkpoint 3, this run 4")):
        train(TrainConfig.from_dict({**values, "k": 4, "epochs": 2, "resume": True}),
              LocalComm())
    with pytest.raises(CheckpointError, match=_literal(
            "dho2.eigenvalue_damping: checkpoint 1e-07, this run 0.0")):
        train(TrainConfig.from_dict({**values, "eigenvalue_damping": 0.0, "epochs": 2,
                                     "resume": True}), LocalComm())
    resumed = train(TrainConfig.from_dict({**values, "epochs": 2, "resume": True}), LocalComm())
    assert resumed.initial_epoch == 1 and len(resumed.history) == 1


def test_allow_config_change_takes_a_dho2_argument_bare_or_as_a_section_key(tmp_path):
    folder = str(tmp_path / "ckpt")
    values = {**TINY, "checkpoint_dir": folder, "k": 3}
    train(TrainConfig.from_dict(values), LocalComm())
    for allowed, epochs in (("k", 2), ("dho2.k", 3)):
        result = train(TrainConfig.from_dict({**values, "k": 3 + epochs, "epochs": epochs,
                                              "resume": True, "allow_config_change": allowed}),
                       LocalComm())
        assert result.initial_epoch == epochs - 1
