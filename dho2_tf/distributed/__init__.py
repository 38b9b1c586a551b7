"""Distribution: communicators, shard layouts and the distributed DHO2 modes."""

from __future__ import annotations

from dho2_tf.distributed.comm import Communicator, Group, HorovodComm, LocalComm, default_comm
from dho2_tf.distributed.sharding import ShardLayout

__all__ = ["Communicator", "Group", "HorovodComm", "LocalComm", "ShardLayout", "default_comm"]
