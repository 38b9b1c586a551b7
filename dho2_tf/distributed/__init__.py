"""Distribution: communicators, shard layouts and the distributed DHO2 modes."""

from __future__ import annotations

from dho2_tf.distributed.comm import (CountingComm, Communicator, Group, HorovodComm, LocalComm,
                                      default_comm)
from dho2_tf.distributed.pipeline import PipelineGroups, pipeline_process_sets
from dho2_tf.distributed.sharding import ShardLayout

__all__ = ["Communicator", "CountingComm", "Group", "HorovodComm", "LocalComm", "PipelineGroups",
           "ShardLayout", "default_comm", "pipeline_process_sets"]
