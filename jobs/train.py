"""Train a model with DHO2 or a data-parallel baseline; run with python or horovodrun.

Examples::

    python jobs/train.py --model mlp --dataset mnist1d --optimizer dho2
    horovodrun -np 2 -H localhost:2 --gloo python jobs/train.py --optimizer adam --learning-rate 3e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dho2_tf.distributed.comm import default_comm  # noqa: E402
from dho2_tf.experiment import TrainConfig, train  # noqa: E402

HELP = {
    "model": "model name from the registry (mlp, resnet20, resnet32, resnet56, resnet110, resnet1d)",
    "dataset": "mnist1d (generated locally), digits (scikit-learn 8x8), cifar10, cifar100",
    "data_dir": "folder holding the CIFAR python-pickle files (cifar-10-batches-py/...)",
    "num_samples": "MNIST-1D samples to generate; 80%% train / 20%% test",
    "optimizer": "dho2, or a Horovod data-parallel baseline: adam, sgd, momentum",
    "base": "DHO2's base optimizer: sgd, momentum, nesterov, adam",
    "mode": "DHO2 distribution mode",
    "learning_rate": "peak (base) learning rate",
    "schedule": "learning-rate schedule over the run: constant or cosine",
    "epochs": "maximum number of epochs",
    "batch_size": "per-rank batch size; the global batch is ranks x batch size",
    "weight_decay": "L2 coefficient added to the loss",
    "momentum": "momentum of the momentum/nesterov base and of the momentum baseline",
    "k": "DHO2: number of largest Hessian eigenpairs",
    "ell": "DHO2: number of smallest Hessian eigenpairs",
    "alpha": "DHO2: Newton step size",
    "refresh_every": "DHO2: curvature refresh interval in steps",
    "warmup": "DHO2: steps before the first curvature refresh",
    "lanczos_order": "DHO2: Lanczos iterations (default 4(k+ell))",
    "c_max": "DHO2: clip of the base learning-rate scale (default 1 for adam, else 3)",
    "curvature_batch": "DHO2: global curvature batch size, split across ranks",
    "seed": "seed of weights, data order and Lanczos start vectors",
    "target_accuracy": "stop as soon as the test accuracy reaches this value (0-1)",
    "verbose": "Keras verbosity on rank 0: 0 silent, 1 progress bar, 2 one line per epoch",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags of every :class:`TrainConfig` field, with the config's defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(
            str(field.type).split(" ")[0].replace("None", "").strip("| "), str)
        parser.add_argument(flag, dest=field.name, type=kind, default=field.default,
                            help=HELP[field.name])
    return TrainConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print the summary line on rank 0."""
    config = parse_args(argv)
    config.validate()
    comm = default_comm()
    logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    result = train(config, comm)
    if comm.is_root:
        print(f"RESULT optimizer={config.optimizer} model={config.model} dataset={config.dataset} "
              f"ranks={result.ranks} epochs={len(result.history)} "
              f"test_accuracy={result.test_accuracy:.4f} best={result.best_accuracy:.4f} "
              f"train_seconds={result.train_seconds:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
