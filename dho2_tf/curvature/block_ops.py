"""The collectives of a curvature basis layout, for a block of b vectors at a time.

A basis layout (``"sharded"`` or ``"replicated"``, see :mod:`dho2_tf.curvature.lanczos`) fixes
how a block of b parameter-space vectors is held on the P ranks of a group and which collective
completes each operation on it. :class:`BlockOps` holds those operations so the Lanczos
iteration (b = 1 per step) and the warm-started block refresh (b = K + p per product,
:mod:`dho2_tf.curvature.warm_start`) issue the same collectives; one collective always serves
the whole block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import tensorflow as tf

from dho2_tf.curvature.hvp import layers_assigning_variables
from dho2_tf.distributed.comm import LocalComm
from dho2_tf.distributed.sharding import ShardLayout

if TYPE_CHECKING:
    from dho2_tf.distributed.comm import Communicator, Group

#: How a block of Hessian-vector products is computed (:func:`block_hvp`), the default first.
BLOCK_HVP_METHODS = ("map", "vectorized")


def group_root(process_set: Group | None) -> int:
    """Global rank of the group's root (its lowest rank; 0 for all ranks)."""
    return 0 if process_set is None else process_set.ranks[0]


def check_block_hvp(method: str) -> str:
    """``method`` if it is one of :data:`BLOCK_HVP_METHODS`, else ValueError."""
    if method not in BLOCK_HVP_METHODS:
        raise ValueError(f"`block_hvp` must be one of {BLOCK_HVP_METHODS}. "
                         f"Received: block_hvp={method!r}")
    return method


def check_vectorizable(hvp_fn: Callable[[tf.Tensor], tf.Tensor], model: tf.keras.Model) -> None:
    """ValueError unless ``hvp_fn`` (a traced product of
    :func:`~dho2_tf.curvature.hvp.make_hvp_fn`) assigns no variable, naming the layers whose
    variables it assigns: ``tf.vectorized_map`` cannot vectorise an assignment, so
    ``block_hvp="vectorized"`` needs a product built with ``skip_layer_updates=True`` on a model
    whose layers update state only through Keras' ``add_update`` (batch normalisation does)."""
    layers = layers_assigning_variables(hvp_fn, model)
    if layers:
        raise ValueError(
            "`block_hvp='vectorized'` needs a Hessian-vector product that assigns no variable "
            "(tf.vectorized_map cannot vectorise an assignment), but these layers of "
            f"{model.name!r} assign their variables in the forward pass: {', '.join(layers)}. "
            "Use block_hvp='map' (the default) for this model. "
            "Received: block_hvp='vectorized'")


def block_hvp(hvp_fn: Callable[[tf.Tensor], tf.Tensor], q: tf.Tensor, method: str) -> tf.Tensor:
    """[H q_0 ; … ; H q_{b−1}] for the rows of ``q`` [b, n] (graph-safe).

    ``"map"``: a ``tf.map_fn`` loop over the rows (one traced HVP, the rows one after another,
    the memory of one HVP); ``"vectorized"``: ``tf.vectorized_map`` (the rows batched through
    every operation where TensorFlow can vectorise it, a while loop where it cannot; more memory,
    fewer kernel launches). Both compute the same products. ``"vectorized"`` needs an ``hvp_fn``
    that assigns no variable: ``tf.vectorized_map`` fails to trace an assignment (such as batch
    norm's moving-average update in a training-mode forward pass), so DHO2 binds an HVP built
    with ``skip_layer_updates=True`` and checks it (:func:`check_vectorizable`).
    """
    if method == "vectorized":
        return tf.vectorized_map(hvp_fn, q, fallback_to_while_loop=True)
    return tf.map_fn(hvp_fn, q, fn_output_signature=q.dtype, parallel_iterations=1)


class BlockOps:
    """Reductions, gathers and projections of a block of rows in one basis layout.

    Math:
        The group has P ranks (P = 1 for ``"replicated"``, whose every rank holds whole rows);
        rank r holds the columns S_r of every row (:class:`ShardLayout`). For a block
        X = [x_0 ; … ; x_{b−1}] (b rows of length n):

            reduce_rows(Y_r)  = (H̄ X)_{S_r}   with H̄ X = mean_r Y_r  (``hvp_reduce="mean"``)
                                             or H̄ X = Y_root            (``"root0"``)
            gather_rows(X_r)  = X             (all columns, from every rank's X_r)
            project(z)        = Σ_r z_r       (completes products X_r Y_rᵀ over the shards)

    Every operation is one collective over the group, whatever b is (none when the layout makes
    it local).

    Args:
        n: length of the flat parameter vector.
        comm: communicator.
        process_set: the group; ``None`` for all ranks.
        hvp_dtype: dtype of the HVP's input and of its reduction.
        basis_dtype: dtype of the rows each rank keeps.
        basis_layout: ``"sharded"`` or ``"replicated"``.
        hvp_reduce: ``"mean"`` or ``"root0"``.
        name: prefix of the collective names.
    """

    def __init__(self, n: int, comm: Communicator, process_set: Group | None,
                 hvp_dtype: tf.DType, basis_dtype: tf.DType, basis_layout: str,
                 hvp_reduce: str, name: str) -> None:
        self.n, self.comm, self.process_set = n, comm, process_set
        self.hvp_dtype, self.basis_dtype = tf.as_dtype(hvp_dtype), tf.as_dtype(basis_dtype)
        self.basis_layout, self.hvp_reduce, self.name = basis_layout, hvp_reduce, name
        sharded = basis_layout == "sharded"
        self.layout = ShardLayout(n, comm.group_size(process_set) if sharded else 1,
                                  comm.group_rank(process_set) if sharded else 0)
        # Projections sum over the shards; with a replicated basis they are local.
        self.proj_comm = comm if sharded else LocalComm()
        self.proj_set = process_set if sharded else None

    def local_rows(self, x: tf.Tensor) -> tf.Tensor:
        """This rank's columns [b, s] of full rows ``x`` [b, n] (all of them when replicated)."""
        return tf.transpose(self.layout.local(tf.transpose(x)))

    def reduce_rows(self, h: tf.Tensor) -> tf.Tensor:
        """This rank's columns [b, s] of the reduced block of HVPs ``h`` [b, n], basis dtype."""
        comm, ps, name = self.comm, self.process_set, self.name
        h = tf.cast(h, self.hvp_dtype)
        if self.hvp_reduce == "root0":
            h = comm.broadcast(h, group_root(ps), name=f"{name}/hvp_bc", process_set=ps)
            return tf.cast(self.local_rows(h), self.basis_dtype)
        if self.basis_layout == "replicated":
            return tf.cast(comm.allreduce(h, "mean", name=f"{name}/hvp_ar", process_set=ps),
                           self.basis_dtype)
        h_r = comm.reducescatter(self.layout.pad(tf.transpose(h)), "mean",
                                 name=f"{name}/hvp_rs", process_set=ps)
        return tf.cast(tf.transpose(h_r), self.basis_dtype)

    def gather_rows(self, x_r: tf.Tensor) -> tf.Tensor:
        """The full rows [b, n] in ``hvp_dtype`` of this rank's columns ``x_r`` [b, s]."""
        x_r = tf.cast(x_r, self.hvp_dtype)
        if self.basis_layout == "replicated":
            return x_r
        full = self.comm.allgather(tf.transpose(x_r), name=f"{self.name}/q",
                                   process_set=self.process_set)
        return tf.transpose(self.layout.unpad(full))

    def project(self, z: tf.Tensor, purpose: str) -> tf.Tensor:
        """Σ over the shards of a small tensor (identity with a replicated basis)."""
        return self.proj_comm.allreduce(z, "sum", name=f"{self.name}/{purpose}",
                                        process_set=self.proj_set)

    def broadcast(self, z: tf.Tensor, purpose: str) -> tf.Tensor:
        """``z`` of the group root on every rank of the group (small decision data)."""
        return self.comm.broadcast(z, group_root(self.process_set),
                                   name=f"{self.name}/{purpose}", process_set=self.process_set)
