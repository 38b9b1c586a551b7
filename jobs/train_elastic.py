r"""Train with DHO2 under Horovod Elastic: workers may fail or join while the job runs.

Examples::

    # 3 workers on one machine seen as two hosts; survives the loss of the 127.0.0.1 worker.
    horovodrun --gloo -np 3 --min-np 2 --max-np 3 \\
        --host-discovery-script jobs/elastic/discover_hosts.sh \\
        .venv/bin/python jobs/train_elastic.py --epochs 20

    # The same script without elastic flags (or in one process) trains identically.
    horovodrun --gloo -np 2 -H localhost:2 .venv/bin/python jobs/train_elastic.py

    # Recommended: through the launcher, which sets --elastic-timeout (60 s here instead of
    # horovodrun's 600 s) and exits non-zero with a clear message when the job stops without
    # finishing (e.g. a lost host never returns and fewer than --min-np workers remain).
    DHO2_ELASTIC_HOSTS="localhost:1 127.0.0.1:1" .venv/bin/python jobs/elastic/run_elastic.py \\
        --np 2 --min-np 1 --max-np 2 -- .venv/bin/python jobs/train_elastic.py --epochs 20

    # On Ray (horovod.ray, elastic): 1 to 4 workers, one per CPU of the cluster's nodes.
    .venv/bin/python jobs/train_elastic.py --launcher ray --min-workers 1 --max-workers 4 \\
        --ray-address head:6379 --epochs 20

Give each worker its own host name (as above): Horovod blacklists the host of a worker that
fails, and with it every worker on that host. On Ray every node is a host: surviving a failed
worker needs two Ray nodes or more. Semantics (commits, roll-back after a worker is killed,
re-partitioning) are in :mod:`dho2_tf.training.elastic`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tensorflow as tf

from dho2_tf import models
from dho2_tf.training.data import load_dataset
from dho2_tf.distributed.comm import default_comm
from dho2_tf.training.elastic import ELASTIC_MODES, ElasticConfig, elastic_train, log_on_root
from dho2_tf.training.ray_launcher import (elastic_launch_options, elastic_launch_parser,
                                  run_elastic_job_on_ray)

logger = logging.getLogger("train_elastic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (defaults: the MNIST-1D MLP with DHO2 on a momentum base)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                parents=[elastic_launch_parser()])
    p.add_argument("--dataset", default="mnist1d", help="mnist1d or digits")
    p.add_argument("--model", default="mlp", help="model name from the registry")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 on the kernels")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=100,
                   help="rows per step, split over however many workers there are")
    p.add_argument("--curvature-batch", type=int, default=400,
                   help="rows of the fixed curvature batch, split over the workers")
    p.add_argument("--commit-every", type=int, default=20,
                   help="commit the state every this many steps (and at every epoch end)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    p.add_argument("--learning-rate", type=float, default=0.05)
    p.add_argument("--schedule", choices=("constant", "cosine"), default="cosine")
    p.add_argument("--base", default="momentum", help="sgd, momentum, nesterov or adam")
    p.add_argument("--mode", choices=ELASTIC_MODES, default="sharded")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ell", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--output", default=None, help="write the result as JSON here (rank 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse flags, build model, optimizer config and schedule, and run ``elastic_train``."""
    launch, job_argv = elastic_launch_options(argv)
    args = parse_args(job_argv)
    if launch.launcher == "ray":  # start the workers; each runs main(job_argv)
        run_elastic_job_on_ray(__file__, launch, job_argv)
        return
    comm = default_comm()  # hvd.init under horovodrun; not a collective
    log_on_root(comm)  # INFO on whichever process is rank 0 now, also after a reset
    data = load_dataset(args.dataset)
    config = ElasticConfig(epochs=args.epochs, global_batch=args.global_batch,
                           curvature_batch=args.curvature_batch, commit_every=args.commit_every,
                           seed=args.seed)
    total = args.epochs * config.steps_per_epoch(len(data.x_train))
    learning_rate = args.learning_rate if args.schedule == "constant" else \
        tf.keras.optimizers.schedules.CosineDecay(args.learning_rate, total)
    tf.keras.utils.set_random_seed(args.seed)
    model = models.get(args.model, data.input_shape, data.num_classes,
                       weight_decay=args.weight_decay)
    optimizer_config = {"learning_rate": learning_rate, "base": args.base, "mode": args.mode,
                        "k": args.k, "ell": args.ell, "alpha": args.alpha,
                        "refresh_every": args.refresh_every, "warmup": args.warmup,
                        "seed": args.seed}
    result = elastic_train(model, optimizer_config,
                           (data.x_train, data.y_train, data.x_test, data.y_test), config,
                           comm=comm)
    if comm.is_root:
        logger.info("finished: %d steps, test accuracy %.4f, %d restart(s)", result.steps,
                    result.test_accuracy, len(result.starts) - 1)
        if args.output:
            Path(args.output).write_text(json.dumps(dataclasses.asdict(result), indent=1))


if __name__ == "__main__":
    main()
