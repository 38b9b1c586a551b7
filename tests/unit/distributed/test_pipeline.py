"""Pipelined mode's rank sets (dho2_tf/distributed/pipeline.py): pure bookkeeping, no
collectives. The pipelined mode itself runs under horovodrun at P = 2, 3, 4
(tests/parallel/modes_check.py)."""

from __future__ import annotations

import pytest

from dho2_tf.distributed.pipeline import PipelineGroups, pipeline_process_sets
from dho2_tf.distributed.sharding import ShardLayout


@pytest.mark.parametrize("n,world,curv", [(10, 3, 1), (11, 4, 2), (7, 5, 3), (100, 4, 1)])
def test_deliver_splits_cover_each_update_shard_exactly(n, world, curv):
    groups = PipelineGroups.of(world, curv)
    p_u = len(groups.update)
    received = {u: [] for u in groups.update}
    for c in range(curv):
        c_layout = ShardLayout(n, curv, c)
        for rank, (a, b) in enumerate(groups.deliver_splits(n, c)):
            if rank in groups.curvature:
                assert (a, b) == (0, 0)
            elif b > a:
                received[rank].extend(range(c_layout.start + a, c_layout.start + b))
    for u in groups.update:
        start, stop = ShardLayout(n, p_u, u).bounds(u)
        assert received[u] == list(range(start, min(stop, n)))


def test_pipeline_groups_and_process_sets():
    g = PipelineGroups.of(4, 2)
    assert (g.update, g.curvature, g.bridge, g.curvature_root) == ((0, 1), (2, 3), (0, 2, 3), 2)
    assert PipelineGroups.of(2, 1).process_sets() == [(0,), (1,)]   # bridge = world: global set


def test_pipeline_group_sizes_must_fit_world():
    with pytest.raises(ValueError, match=r"`update_ranks` \+ `curvature_ranks` must equal the "
                                         r"world size 4. Received: update_ranks=3"):
        PipelineGroups.of(4, 2, update_ranks=3)
    with pytest.raises(ValueError, match="must leave at least one update rank"):
        PipelineGroups.of(3, 3)


@pytest.mark.parametrize("world,curv", [(2, 1), (3, 1), (3, 2), (4, 1), (4, 2), (4, 3), (6, 2)])
def test_sets_partition_the_world(world, curv):
    """U = {0 … P_U−1}, C = {P_U … P−1}, B = {0} ∪ C; Horovod registers every set that is not
    the whole world, once."""
    g = PipelineGroups.of(world, curv)
    p_u = world - curv
    assert g.update == tuple(range(p_u)) and g.curvature == tuple(range(p_u, world))
    assert g.bridge == (0, *range(p_u, world)) and g.curvature_root == p_u
    assert sorted(g.update + g.curvature) == list(range(world))
    wanted = [s for s in (g.update, g.curvature, g.bridge) if len(s) < world]
    assert g.process_sets() == list(dict.fromkeys(wanted))
    assert len(set(g.process_sets())) == len(g.process_sets())
    assert PipelineGroups.of(world, curv, update_ranks=p_u) == g


def test_process_sets_at_the_world_sizes_the_parallel_checks_use():
    assert pipeline_process_sets(1, world_size=2) == [(0,), (1,)]
    assert pipeline_process_sets(1, world_size=3) == [(0, 1), (2,), (0, 2)]
    assert pipeline_process_sets(2, world_size=4) == [(0, 1), (2, 3), (0, 2, 3)]


def test_process_sets_read_the_world_size_horovodrun_sets(monkeypatch):
    monkeypatch.setenv("HOROVOD_SIZE", "3")
    assert pipeline_process_sets(1) == [(0, 1), (2,), (0, 2)]
    monkeypatch.delenv("HOROVOD_SIZE")
    with pytest.raises(ValueError, match="needs at least 2 ranks"):
        pipeline_process_sets(1)                              # one process: no pipeline


@pytest.mark.parametrize("world,curv,message", [
    (1, 1, "needs at least 2 ranks"),
    (4, 0, "`curvature_ranks` must be a positive integer"),
    (2, 2, "must leave at least one update rank: it must be < the world size 2"),
])
def test_groups_that_do_not_fit_are_rejected(world, curv, message):
    with pytest.raises(ValueError, match=message):
        PipelineGroups.of(world, curv)
