"""The README's examples as written, on 1 rank (python) or P ranks (horovodrun).

Usage: readme_check.py EPOCHS

The code blocks of README.md's "Using DHO2 in your Keras code" section run with two documented
substitutions only: the epoch count (``epochs=30`` / ``range(30)`` → EPOCHS / 1) and, for the
custom loop in each mode, extra DHO2 arguments (``mode``, a short refresh schedule and ``tau``, so
a one-epoch run refreshes and runs consensus rounds). MNIST-1D is generated once per process
(:func:`generate_mnist1d_once`), not once per check. Rank 0 prints one ``RESULT {json}`` line
per check:

* ``keras``: the README's Keras example (DHO2) and the same run with ``SGD(0.1, momentum=0.9)``
  (same data shard, seed, model, batch and epochs): both test accuracies;
* ``loop <mode>``: the README's custom loop in every mode (pipelined from 2 ranks on): the
  training loss before and after, refreshes done (served on the curvature rank), ADMM rounds,
  and whether the training ranks end with identical weights;
* ``prioritized``: the README's prioritized-SGD example as written (its 5 epochs): the
  validation accuracy of the last epoch;
* ``unbroadcast`` (P > 1): a hand-wired loop whose ranks start from different weights fails at
  its first step on every rank (each rank prints its own line).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import dho2_tf  # noqa: E402
from dho2_tf.callbacks import BroadcastInitialState  # noqa: E402
from dho2_tf.distributed.comm import HorovodComm, default_comm  # noqa: E402
from dho2_tf.distributed.pipeline import pipeline_process_sets  # noqa: E402
from tests.helpers.mnist1d_once import generate_mnist1d_once  # noqa: E402

README_DHO2 = 'dho2_tf.DHO2(learning_rate=0.1, base="momentum")'
LOOP_OPTIONS = "k=4, refresh_every=20, warmup=10, tau=4"


def readme_blocks() -> tuple[str, str]:
    """The Keras example and the custom loop (the first two python blocks of the section)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using DHO2 in your Keras code"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, "README: the Keras example and the custom loop are missing"
    assert README_DHO2 in blocks[0] and "epochs=30" in blocks[0], "README Keras example changed"
    assert "range(30)" in blocks[1], "README custom loop changed"
    return blocks[0], blocks[1]


def prioritized_block() -> str:
    """The code block of README.md's "Prioritized SGD" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Prioritized SGD"):]
    section = section[:section.index("\n## ", 5)]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def prioritized_check(comm) -> None:
    env: dict = {}
    tf.keras.utils.set_random_seed(0)
    exec(prioritized_block().replace("model.fit(", "history = model.fit("), env)
    history = env["history"].history
    emit(comm, "prioritized", val_accuracy=float(history["val_accuracy"][-1]),
         loss=[float(v) for v in history["loss"]], ranks=comm.size)


def emit(comm, kind: str, **values) -> None:
    if comm.is_root:
        print("RESULT " + json.dumps({"check": kind, **values}), flush=True)


def keras_check(keras: str, epochs: int, comm) -> None:
    env: dict = {}
    exec(keras.replace("epochs=30", f"epochs={epochs}"), env)
    dho2_acc = float(env["model"].evaluate(env["data"].x_test, env["data"].y_test, verbose=0)[1])
    # The base optimizer on the same shard, seed, model, batch and epochs.
    tf.keras.utils.set_random_seed(0)
    data, x, y = env["data"], env["x"], env["y"]
    model = dho2_tf.models.get("mlp", data.input_shape, data.num_classes)
    model.compile(optimizer=comm.data_parallel_optimizer(
        tf.keras.optimizers.SGD(0.1, momentum=0.9)),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=50, epochs=epochs, verbose=0,
              callbacks=[BroadcastInitialState(comm)])
    sgd_acc = float(model.evaluate(data.x_test, data.y_test, verbose=0)[1])
    emit(comm, "keras", dho2=dho2_acc, sgd=sgd_acc, ranks=comm.size, epochs=epochs,
         skipped=float(env["opt"].curvature_metrics().get("skipped_steps", 0.0)))


def loop_check(keras: str, loop: str, mode: str, comm) -> None:
    setup = keras[:keras.index("model.compile")]
    setup = setup.replace(README_DHO2, README_DHO2[:-1] + f", mode={mode!r}, {LOOP_OPTIONS})")
    env: dict = {}
    exec(setup, env)
    model, x, y, opt = env["model"], env["x"], env["y"], env["opt"]
    scce = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    before = float(scce(y, model(x, training=False)))
    exec(loop.replace("range(30)", "range(1)"), env)
    trains = env["loop"].trains
    after = float(scce(y, model(x, training=False)))
    flat = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
    sums = comm.allgather_object(float(flat.sum()) if trains else None, name=f"readme/{mode}")
    train_sums = [s for s in sums if s is not None]
    refreshes = opt.refresh_index() if trains else len(env["loop"].served)
    served = comm.allgather_object(refreshes, name=f"readme/{mode}/refreshes")
    rounds = float(opt.curvature_metrics().get("admm_rounds", -1)) if trains else -1
    emit(comm, f"loop {mode}", before=before, after=after, refreshes=served,
         identical=len(set(train_sums)) == 1, rounds=rounds, steps=env["loop"].iterations,
         ranks=comm.size)


def unbroadcast_check(keras: str, comm) -> None:
    """Ranks seeded differently, wired by hand without a broadcast: the first step fails."""
    tf.keras.utils.set_random_seed(comm.rank)
    env: dict = {}
    exec(keras[:keras.index("model.compile")].replace("tf.keras.utils.set_random_seed(0)", ""),
         env)
    model, x, y, opt = env["model"], env["x"], env["y"], env["opt"]
    opt.bind(model, "sparse_categorical_crossentropy", (x[:100], y[:100]))
    try:
        opt.on_step_begin()
        message = "no error"
    except ValueError as err:
        message = str(err)
    print("RESULT " + json.dumps({"check": "unbroadcast", "rank": comm.rank,
                                  "message": message}), flush=True)


def main() -> None:
    epochs = int(sys.argv[1])
    generate_mnist1d_once()
    if int(os.environ.get("HOROVOD_SIZE", "1")) > 1:
        # The pipelined mode's process sets, registered when Horovod starts (before the README
        # code's own DHO2 creates its communicator).
        comm = HorovodComm(process_sets=pipeline_process_sets(1))
    else:
        comm = default_comm()
    keras, loop = readme_blocks()
    keras_check(keras, epochs, comm)
    modes = ["replicated", "sharded", "faithful", "admm"] + (["pipelined"] if comm.size > 1
                                                             else [])
    for mode in modes:
        loop_check(keras, loop, mode, comm)
    prioritized_check(comm)
    if comm.size > 1:
        unbroadcast_check(keras, comm)


if __name__ == "__main__":
    main()
