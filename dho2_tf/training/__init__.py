"""The run level: what turns the optimizer into a training job.

* :mod:`~dho2_tf.training.experiment`: a run from its configuration (model, data, optimizer,
  callbacks, checkpoints), as ``jobs/train.py`` launches it.
* :mod:`~dho2_tf.training.data`: datasets read from local files or generated locally, and the
  per-rank ``tf.data`` input (the rows of :mod:`dho2_tf.data_position`).
* :mod:`~dho2_tf.training.checkpointing`: atomic checkpoints and resume.
* :mod:`~dho2_tf.training.monitoring`: TensorBoard scalars and progress (rank 0 only).
* :mod:`~dho2_tf.training.elastic`: the Horovod Elastic trainer and its state adapter.
* :mod:`~dho2_tf.training.ray_launcher`: running the jobs on a Ray cluster.

The optimizer (:mod:`dho2_tf.optimizer`, :mod:`dho2_tf.modes`) and the communication layer
(:mod:`dho2_tf.distributed`) do not import this package. The benchmarks live outside the
library, in ``benchmarks/`` at the top of the repository.
"""
