"""Which ranks compute curvature and which train in DHO2's ``pipelined`` mode.

docs/algorithm.md §7: update set U = {0 … P_U−1}, curvature set C = {P_U … P−1}, bridge
B = {0} ∪ C (rank 0 of U hands the trigger weights to C), plus the global set for DELIVER.
Everything here is pure bookkeeping (no collectives), so it is tested without Horovod.
"""

from __future__ import annotations

import dataclasses
import os

from dho2_tf.distributed.sharding import ShardLayout
from dho2_tf.validation import check_int


@dataclasses.dataclass(frozen=True)
class PipelineGroups:
    """The rank sets of the pipelined mode.

    Attributes:
        world_size: P, all ranks.
        curvature_ranks: P_C, the size of C (the last P_C ranks).
    """

    world_size: int
    curvature_ranks: int

    @classmethod
    def of(cls, world_size: int, curvature_ranks: int,
           update_ranks: int | None = None) -> "PipelineGroups":
        """Validated groups; raises ValueError naming the sizes when they do not fit."""
        check_int("curvature_ranks", curvature_ranks, minimum=1)
        if world_size < 2:
            raise ValueError("mode='pipelined' needs at least 2 ranks (one to train, one to "
                             f"compute curvature). Received: world size {world_size}")
        if update_ranks is not None:
            check_int("update_ranks", update_ranks, minimum=1)
            if update_ranks + curvature_ranks != world_size:
                raise ValueError(
                    f"`update_ranks` + `curvature_ranks` must equal the world size "
                    f"{world_size}. Received: update_ranks={update_ranks}, "
                    f"curvature_ranks={curvature_ranks}")
        if curvature_ranks >= world_size:
            raise ValueError(f"`curvature_ranks` must leave at least one update rank: it must be "
                             f"< the world size {world_size}. Received: "
                             f"curvature_ranks={curvature_ranks}")
        return cls(world_size, curvature_ranks)

    @property
    def update(self) -> tuple[int, ...]:
        """U: the ranks that train."""
        return tuple(range(self.world_size - self.curvature_ranks))

    @property
    def curvature(self) -> tuple[int, ...]:
        """C: the ranks that run Lanczos."""
        return tuple(range(self.world_size - self.curvature_ranks, self.world_size))

    @property
    def bridge(self) -> tuple[int, ...]:
        """B = {0} ∪ C: rank 0 broadcasts the trigger weights to C."""
        return (0,) + self.curvature

    @property
    def curvature_root(self) -> int:
        """First curvature rank: root of the eigenvalue broadcast after DELIVER."""
        return self.curvature[0]

    def process_sets(self) -> list[tuple[int, ...]]:
        """Sets Horovod must register (a set equal to all ranks is the global set already)."""
        sets = [self.update, self.curvature, self.bridge]
        return [s for s in dict.fromkeys(sets) if len(s) < self.world_size]

    def deliver_splits(self, n: int, curvature_index: int) -> list[tuple[int, int]]:
        """Rows of C-shard ``curvature_index`` to send to each global rank: (start, stop).

        C rank c owns rows S_c^(C) of V (padded to P_C·s_C); update rank u needs rows
        S_u^(U) ∩ [0, n). The piece sent to u is their intersection, relative to S_c^(C).
        Curvature ranks receive nothing.
        """
        c_layout = ShardLayout(n, self.curvature_ranks, curvature_index)
        c0, c1 = c_layout.start, min(c_layout.stop, n)
        out = []
        for rank in range(self.world_size):
            if rank in self.curvature:
                out.append((0, 0))
                continue
            u0, u1 = ShardLayout(n, len(self.update), rank).bounds(rank)
            lo, hi = max(c0, u0), min(c1, u1, n)
            out.append((lo - c0, hi - c0) if hi > lo else (0, 0))
        return out


def pipeline_process_sets(curvature_ranks: int, update_ranks: int | None = None,
                          world_size: int | None = None) -> list[tuple[int, ...]]:
    """The process sets to pass to ``HorovodComm(process_sets=...)`` for the pipelined mode.

    ``world_size`` defaults to ``HOROVOD_SIZE`` (set by ``horovodrun`` before Horovod starts),
    so every rank can build its communicator before any collective.
    """
    if world_size is None:
        world_size = int(os.environ.get("HOROVOD_SIZE", "1"))
    return PipelineGroups.of(world_size, curvature_ranks, update_ranks).process_sets()
