"""How a flat parameter-space vector is split across the ranks of a group.

Layout: shard length s = ⌈n/P⌉, padded length n′ = P·s, rank r owns the index range
S_r = [r·s, (r+1)·s). Padding entries are zero in every vector, so they never change a dot
product or a norm. A layout with P = 1 is the full vector (the replicated modes).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Shard bounds of an ``n``-vector over ``num_shards`` ranks, seen from shard ``index``.

    Attributes:
        n: length of the unpadded vector.
        num_shards: P, the number of ranks sharing the vector.
        index: r, which shard this rank owns (its rank inside the group).
    """

    n: int
    num_shards: int
    index: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError(f"`n` must be a positive integer. Received: n={self.n}")
        if self.num_shards <= 0:
            raise ValueError(f"`num_shards` must be positive. Received: {self.num_shards}")
        if not 0 <= self.index < self.num_shards:
            raise ValueError(
                f"`index` must be in [0, {self.num_shards}). Received: index={self.index}")

    @property
    def shard_size(self) -> int:
        """s = ⌈n/P⌉."""
        return -(-self.n // self.num_shards)

    @property
    def padded_size(self) -> int:
        """n′ = P·s."""
        return self.shard_size * self.num_shards

    @property
    def start(self) -> int:
        """First global index of this rank's shard (may be ≥ n for an all-padding shard)."""
        return self.index * self.shard_size

    @property
    def stop(self) -> int:
        """One past the last global index of this rank's shard (in padded coordinates)."""
        return self.start + self.shard_size

    def bounds(self, index: int) -> tuple[int, int]:
        """``(start, stop)`` of shard ``index`` in padded coordinates."""
        return index * self.shard_size, (index + 1) * self.shard_size

    def pad(self, x: tf.Tensor) -> tf.Tensor:
        """``x`` ``[n, ...]`` zero-padded to ``[n′, ...]``."""
        extra = self.padded_size - self.n
        if extra == 0:
            return x
        paddings = [[0, extra]] + [[0, 0]] * (len(x.shape) - 1)
        return tf.pad(x, paddings)

    def unpad(self, x: tf.Tensor) -> tf.Tensor:
        """The first ``n`` rows of a padded ``[n′, ...]`` tensor."""
        return x[: self.n]

    def local(self, x: tf.Tensor) -> tf.Tensor:
        """This rank's rows ``S_r`` of a full (unpadded ``[n]`` or padded ``[n′]``) tensor."""
        return self.pad(x)[self.start: self.stop] if x.shape[0] == self.n else \
            x[self.start: self.stop]
