"""``pipelined``: curvature ranks compute the next eigenpairs while update ranks train.

The update set U trains with the sharded step (state sharded 1/P_U over U; the four collectives
of ``sharded`` run within U). At a
refresh trigger t_j, rank 0 broadcasts θ over the bridge B = {0} ∪ C and U keeps training with the
previous eigenpairs; the curvature set C runs the sharded Lanczos among itself (HVP averaged over
C's batches) and DELIVERs the new eigenpairs at step t_j + Δ: an alltoall over all ranks moves
each C shard's rows of V to the U ranks that own them, then λ and Γ are broadcast from C's root.
Only these two cross-set collectives exist, so no rank waits on a collective another rank never
calls; Δ ≤ T keeps DELIVER j before trigger j+1 on both sides. When U stops it drains a pending
DELIVER and sends a stop flag over the bridge, which ends the curvature ranks' loop.

Refresh j starts its Lanczos iteration from seed + j, as the other modes do, so a run resumed
from a checkpoint refreshes exactly as the uninterrupted run. For that reason every pipelined
refresh is a Lanczos run, whatever ``refresh_method`` says: the curvature ranks keep no optimizer
state, so a warm start from their own previous estimate would make a resumed run differ. The
schedule is the fixed one (``max_refresh_every`` is not accepted, and
:meth:`dho2_tf.refresh.Curvature.request_refresh` does not trigger a hand-over). The update ranks count triggers
from the refreshes already installed when training (re)starts; a trigger whose DELIVER was still
pending when the checkpoint was written is sent again, with the weights of the first step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import tensorflow as tf

from dho2_tf import hybrid
from dho2_tf.distributed.comm import Communicator, Group
from dho2_tf.distributed.pipeline import PipelineGroups, pipeline_process_sets
from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.flat import flatten
from dho2_tf.modes.base import Mode, assign_flat
from dho2_tf.modes.context import HostAction, InstallPairs, KeepPairs, TriggerSent

logger = logging.getLogger(__name__)


class PipelinedMode(Mode):
    """Update ranks run :class:`ShardedMode`'s step within U; curvature ranks serve Lanczos."""

    name = "pipelined"
    checkpointable = False  # the curvature ranks hold no training state
    warm_refresh = False    # resumed runs must refresh as uninterrupted ones (module docstring)
    all_ranks_train = False
    # The curvature ranks refresh on the fixed schedule of the update ranks' triggers.
    adaptive_schedule = False
    # The curvature ranks check in serve_curvature(); the update ranks match it first thing.
    checks_consistency_first = True

    def __init__(self, hp: Any) -> None:
        super().__init__(hp)
        # Python copy of the refreshes triggered: state.refreshes plus a delivery still
        # pending (None: re-read at the next step).
        self.triggers_sent: int | None = None
        self.pending_delivery: int | None = None

    @staticmethod
    def process_sets_for(curvature_ranks: int, update_ranks: int | None,
                         world_size: int | None = None) -> list[tuple[int, ...]]:
        """The update, curvature and bridge sets (:func:`pipeline_process_sets`)."""
        return pipeline_process_sets(curvature_ranks, update_ranks, world_size)

    @staticmethod
    def rank_groups(world_size: int, curvature_ranks: int,
                    update_ranks: int | None) -> PipelineGroups:
        """The update ranks (first) and curvature ranks (last) of the world."""
        return PipelineGroups.of(world_size, curvature_ranks, update_ranks)

    def groups_in(self, comm: Communicator) -> PipelineGroups:
        """The rank sets of ``comm``'s world."""
        return self.rank_groups(comm.size, self.hp.curvature_ranks, self.hp.update_ranks)

    @property
    def groups(self) -> PipelineGroups:
        """The rank sets of the context's world."""
        return self.groups_in(self.comm)

    def validate_world(self, comm: Communicator) -> None:
        for ranks in self.groups_in(comm).process_sets():
            try:
                comm.group(ranks)
            except ValueError as err:
                raise ValueError(
                    "mode='pipelined' needs its process sets registered when Horovod starts: "
                    "create the communicator as HorovodComm(process_sets=dho2_tf.distributed."
                    f"pipeline_process_sets({self.hp.curvature_ranks})) and pass comm= to DHO2. "
                    f"({err})") from None

    @staticmethod
    def _group(comm: Communicator, ranks: tuple[int, ...]) -> Group | None:
        return None if len(ranks) == comm.size else comm.group(ranks)

    def group_in(self, comm: Communicator) -> Group | None:
        return self._group(comm, self.groups_in(comm).update)

    def is_curvature_rank_in(self, comm: Communicator) -> bool:
        return comm.rank in self.groups_in(comm).curvature

    def lanczos_group(self, comm: Communicator) -> Group | None:
        """The curvature ranks run the Lanczos iteration among themselves."""
        return self._group(comm, self.groups_in(comm).curvature)

    def layout(self, comm: Communicator, n: int) -> ShardLayout:
        update = self.groups_in(comm).update
        return ShardLayout(n, len(update), comm.rank if comm.rank in update else 0)

    # ----------------------------------------------------------------------- update side
    def on_step_begin(self, iterations: int) -> tuple[HostAction, ...]:
        """DELIVER when due (before a new trigger), then hand θ over at a trigger."""
        ctx, hp = self.context, self.hp
        t = iterations
        actions: list[HostAction] = []
        if self.triggers_sent is None:   # first step of this run (fresh or resumed), or synced
            self.triggers_sent = self._triggers_from_state()
        if self.pending_delivery is not None and t >= self.pending_delivery:
            actions.append(self._receive())
        due = hybrid.refresh_count_due(t, hp.warmup, hp.refresh_every)
        if due > self.triggers_sent:
            # One trigger, numbered by the refresh it starts: due − 1 (see serve()).
            self._send_bridge(flatten(ctx.weights), refresh=due - 1)
            self.triggers_sent = due
            self.pending_delivery = t + hp.delivery_delay
            actions.append(TriggerSent(t))
        return tuple(actions)

    def sync_host_state(self) -> None:
        """Re-read :attr:`triggers_sent` at the next step."""
        self.triggers_sent = None

    def _triggers_from_state(self) -> int:
        """The refreshes triggered: those installed (or kept) plus the one whose DELIVER is
        pending. While training runs this is the count kept (each DELIVER lands before the next
        trigger, Δ ≤ T), or a re-read cannot change a decision (more than T steps per hook call
        trigger at every call); after a restore it is the count a resumed run starts from."""
        return int(self.context.refreshes.numpy()) + (self.pending_delivery is not None)

    def refresh_delay(self) -> int:
        """Refresh j is installed Δ = ``delivery_delay`` steps after its trigger."""
        return self.hp.delivery_delay

    def on_train_end(self) -> tuple[HostAction, ...]:
        """Drain a pending DELIVER, then tell the curvature ranks to stop."""
        if self.is_curvature_rank:
            return ()
        actions = (self._receive(),) if self.pending_delivery is not None else ()
        ctx = self.context
        self._send_bridge(tf.zeros([ctx.spec.n], ctx.weights[0].dtype), refresh=None)
        return actions

    def _send_bridge(self, theta: tf.Tensor, refresh: int | None) -> None:
        """Rank 0 → C: ``[θ, j + 1]`` for refresh j, ``[0, 0]`` (``refresh=None``) to stop."""
        comm = self.comm
        if comm.rank != 0:
            return
        payload = tf.concat([theta, [0.0 if refresh is None else float(refresh + 1)]], 0)
        comm.broadcast(payload, 0, name="dho2/pipeline/theta",
                       process_set=self._group(comm, self.groups.bridge))

    def _receive(self) -> HostAction:
        """The update ranks' side of DELIVER: the rows of V this rank owns, λ and Γ."""
        ctx, kk = self.context, self.hp.num_pairs
        dtype = ctx.weights[0].dtype
        rows = ctx.comm.alltoall(tf.zeros([0, kk], dtype), [0] * ctx.comm.size,
                                 name="dho2/pipeline/deliver")
        packed = ctx.comm.broadcast(tf.zeros([kk + kk * kk + 1], dtype),
                                    self.groups.curvature_root, name="dho2/pipeline/spectrum")
        self.pending_delivery = None
        if float(packed[-1]) == 0.0:
            logger.warning("pipelined refresh failed on the curvature ranks; keeping eigenpairs")
            return KeepPairs("failed on curvature ranks")
        missing = ctx.layout.shard_size - int(rows.shape[0])   # padding rows of the last shard
        vectors_r = tf.transpose(tf.pad(rows, [[0, missing], [0, 0]]))
        return InstallPairs(packed[:kk], vectors_r, tf.reshape(packed[kk:-1], [kk, kk]),
                            "ok (pipelined)")

    # ----------------------------------------------------------------------- curvature side
    def serve(self, estimator: Any) -> list[dict[str, Any]]:
        """Curvature-rank loop: receive θ, estimate with ``estimator``, DELIVER until the stop
        flag.

        Refresh j (its number comes with θ) starts Lanczos from seed + j, as in every mode.

        Returns:
            One record per round: ``round`` (served by this call), ``refresh`` (j), ``start``
            and ``end`` (``time.time()`` around the estimate), ``seconds`` and ``status``.
        """
        ctx, groups = self.context, self.groups
        if not self.is_curvature_rank:
            return super().serve(estimator)
        n, kk = ctx.spec.n, self.hp.num_pairs
        dtype = ctx.weights[0].dtype
        c_index = ctx.comm.group_rank(self._group(ctx.comm, groups.curvature))
        served: list[dict[str, Any]] = []
        while True:
            payload = ctx.comm.broadcast(tf.zeros([n + 1], dtype), 0,
                                         name="dho2/pipeline/theta",
                                         process_set=self._group(ctx.comm, groups.bridge))
            if float(payload[-1]) == 0.0:
                return served
            refresh = int(round(float(payload[-1]))) - 1
            start = time.time()
            assign_flat(ctx.weights, payload[:-1], ctx.spec)
            # Always Lanczos (see the module docstring): no warm start on curvature ranks.
            est = estimator.estimate(seed=self.hp.seed + refresh)
            ok = est.num_valid > 0 and est.status.startswith(("ok", "breakdown"))
            end = time.time()
            self._deliver(est, c_index, n, kk, dtype, ok)
            served.append({"round": len(served), "refresh": refresh, "start": start, "end": end,
                           "seconds": end - start, "status": est.status})

    def _deliver(self, est: Any, c_index: int, n: int, kk: int, dtype: tf.DType,
                 ok: bool) -> None:
        rows_c = tf.transpose(tf.cast(est.vectors_r, dtype))  # [s_C, K]
        pieces = self.groups.deliver_splits(n, c_index)
        send = tf.concat([rows_c[a:b] for a, b in pieces], 0)
        self.comm.alltoall(send, [b - a for a, b in pieces], name="dho2/pipeline/deliver")
        packed = tf.concat([tf.cast(est.eigenvalues, dtype),
                            tf.reshape(tf.cast(est.gram, dtype), [-1]),
                            [1.0 if ok else 0.0]], 0)
        self.comm.broadcast(packed, self.groups.curvature_root, name="dho2/pipeline/spectrum")

    def metrics(self) -> dict[str, float]:
        sent = self.triggers_sent
        if sent is None:
            sent = self._triggers_from_state() if self._context is not None else 0
        return {"pipeline_triggers": float(sent)}
