"""Which training rows each step and each rank use: one rule, whatever the number of ranks.

The data position of a run is its global step t. With N training rows, a global batch of B
rows and S = ⌊N/B⌋ steps per epoch, step t = e·S + j (epoch e, batch j < S) trains on

    batch_t = π_e[j·B : (j+1)·B],   π_e = np.random.default_rng([seed, e]).permutation(N)

(:func:`global_batch_rows`; the last N − S·B rows of π_e are not used in epoch e), and rank r of
P trains on the contiguous slice :func:`rank_rows` (B, r, P) of batch_t (the first B mod P ranks
one row more). The batches depend on the seed, the epoch and B only, so runs on any number of
ranks with the same global batch, and a checkpoint resumed on another number of ranks, see the
same batches in the same order. Elastic runs (:mod:`~dho2_tf.training.elastic`) and the
``tf.data`` input of ``jobs/train.py`` (:func:`~dho2_tf.training.data.make_tf_dataset`) both
follow it.

Two fixed row sets take a tag in place of the epoch (epochs stay below 2**31):

* the curvature batch (:func:`curvature_rows`): the first C rows of the permutation drawn from
  ``(seed, CURVATURE_TAG)``, sorted; rank r of P binds slice ``rank_rows(C, r, P)`` of it
  (:func:`rank_curvature_rows`), so the ranks together hold the same C rows for any P;
* a rank's fixed shard, for what keeps per-example state on its rank (prioritized SGD's
  priorities; :func:`shard_rows`): slice ``rank_rows(N', r, P)`` of the permutation drawn from
  ``(seed, SHARD_TAG)``, sorted, with N' = N, or P·⌊N/P⌋ when every rank must hold as many rows.

Everything here is numpy on row indices: no TensorFlow, no communication (so the callbacks
use it as well as the run level).
"""

from __future__ import annotations

import numpy as np

#: Second seed word of the curvature batch's permutation (epoch numbers stay below it).
CURVATURE_TAG = 2**31
#: Second seed word of the fixed shards' permutation.
SHARD_TAG = 2**31 + 1


def _check(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)


def _check_rank(rank: int, size: int) -> tuple[int, int]:
    size = _check("size", size, 1)
    rank = _check("rank", rank, 0)
    if rank >= size:
        raise ValueError(f"`rank` must be below `size`. Received: rank={rank}, size={size}")
    return rank, size


def rank_rows(batch: int, rank: int, size: int) -> tuple[int, int]:
    """Bounds ``[start, stop)`` of rank ``rank``'s slice of a batch split over ``size`` ranks.

    Math:
        q, m = divmod(batch, size);  start_r = r·q + min(r, m);  stop_r = start_r + q + [r < m]

    The first ``batch mod size`` ranks get one row more; the slices tile ``[0, batch)``.
    """
    base, extra = divmod(batch, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_slice(rows: np.ndarray, rank: int, size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous part of ``rows``: ``rows[start:stop]`` of :func:`rank_rows`."""
    start, stop = rank_rows(len(rows), *_check_rank(rank, size))
    return rows[start:stop]


def epoch_order(num_rows: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """π_e: the order of the ``num_rows`` training rows in epoch ``epoch``.

    ``np.random.default_rng([seed, epoch]).permutation(num_rows)``; ``0..N-1`` in order when
    ``shuffle`` is false.
    """
    num_rows, epoch = _check("num_rows", num_rows, 0), _check("epoch", epoch, 0)
    if not shuffle:
        return np.arange(num_rows)
    return np.random.default_rng([_check("seed", seed, 0), epoch]).permutation(num_rows)


def steps_per_epoch(num_rows: int, global_batch: int) -> int:
    """S = ⌊N/B⌋: full global batches in ``num_rows`` rows.

    Raises:
        ValueError: when there are fewer rows than one global batch.
    """
    global_batch = _check("global_batch", global_batch, 1)
    if num_rows < global_batch:
        raise ValueError(f"`global_batch` must not exceed the {num_rows} training rows. "
                         f"Received: global_batch={global_batch}")
    return num_rows // global_batch


def global_batch_rows(step: int, num_rows: int, global_batch: int, seed: int,
                      shuffle: bool = True) -> np.ndarray:
    """Training rows of global step ``step``: ``π_e[j·B:(j+1)·B]`` with ``(e, j) =
    divmod(step, S)`` (the same on every rank and for every number of ranks)."""
    epoch, j = divmod(_check("step", step, 0), steps_per_epoch(num_rows, global_batch))
    order = epoch_order(num_rows, epoch, seed, shuffle)
    return order[j * global_batch:(j + 1) * global_batch]


def epoch_rank_batches(epoch: int, num_rows: int, global_batch: int, rank: int, size: int,
                       seed: int, shuffle: bool = True, drop_remainder: bool = True
                       ) -> list[np.ndarray]:
    """Rank ``rank``'s rows of every step of epoch ``epoch``, in step order.

    Element j is ``rank_slice(batch_{e·S+j}, rank, size)``, j < S. With ``drop_remainder``
    false, the rows π_e[S·B:] left over form one more, smaller global batch, split the same
    way (a rank whose slice of it is empty gets no element for it).
    """
    rank, size = _check_rank(rank, size)
    global_batch = _check("global_batch", global_batch, 1)
    order = epoch_order(num_rows, epoch, seed, shuffle)
    start, stop = rank_rows(global_batch, rank, size)
    full = len(order) // global_batch
    batches = list(order[:full * global_batch].reshape(full, global_batch)[:, start:stop])
    if not drop_remainder:
        last = rank_slice(order[full * global_batch:], rank, size)
        if len(last):
            batches.append(last)
    return batches


def curvature_rows(num_rows: int, batch: int, seed: int) -> np.ndarray:
    """The C = ``batch`` rows of the curvature batch, sorted: the first C of the permutation
    drawn from ``(seed, CURVATURE_TAG)``. The same rows for every number of ranks.

    Raises:
        ValueError: when ``batch`` is not in [1, num_rows].
    """
    batch = _check("curvature_batch", batch, 1)
    if batch > num_rows:
        raise ValueError(f"`curvature_batch` must not exceed the {num_rows} training rows. "
                         f"Received: curvature_batch={batch}")
    order = np.random.default_rng([_check("seed", seed, 0), CURVATURE_TAG]).permutation(num_rows)
    return np.sort(order[:batch])


def rank_curvature_rows(num_rows: int, batch: int, rank: int, size: int, seed: int
                        ) -> np.ndarray:
    """Rank ``rank``'s slice ``rank_rows(C, rank, size)`` of :func:`curvature_rows`.

    Raises:
        ValueError: when the batch has fewer rows than there are ranks (a rank would get none).
    """
    rank, size = _check_rank(rank, size)
    if _check("curvature_batch", batch, 1) < size:
        raise ValueError(f"`curvature_batch` must be at least the {size} ranks it is split "
                         f"over. Received: curvature_batch={batch}")
    return rank_slice(curvature_rows(num_rows, batch, seed), rank, size)


def shard_rows(num_rows: int, rank: int, size: int, seed: int,
               drop_remainder: bool = False) -> np.ndarray:
    """Rank ``rank``'s fixed shard, sorted: slice ``rank_rows(N', rank, size)`` of the
    permutation drawn from ``(seed, SHARD_TAG)``, N' = ``num_rows`` or, with
    ``drop_remainder``, ``size·⌊num_rows/size⌋`` (every rank then holds ⌊N/P⌋ rows).

    The shards of the ``size`` ranks are disjoint and cover the N' rows; on one rank the shard
    is every row (N' = N).
    """
    rank, size = _check_rank(rank, size)
    num_rows = _check("num_rows", num_rows, 0)
    kept = num_rows - num_rows % size if drop_remainder else num_rows
    order = np.random.default_rng([_check("seed", seed, 0), SHARD_TAG]).permutation(num_rows)
    return np.sort(rank_slice(order[:kept], rank, size))
