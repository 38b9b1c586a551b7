"""Selection rules over a shard's estimated priorities p̂ [n].

Each rule returns ``(idx, weights)``: local example indices and loss weights such that the
training loss is Σ_j weights_j·ℓ_{idx_j} (so uniform weights 1/K give the mean). See
:class:`dho2_tf.prioritized.PrioritizedSampler` for the equations (Zhou & Gao, IC2E 2021;
docs/prioritized.md).

* :func:`select_topk` — the paper's deterministic top-K (biased, weights 1/K).
* :func:`select_importance` — K i.i.d. draws from q_i = (1−γ)ψ_i/Σψ + γ/n, weights 1/(K·n·q_i)
  (unbiased).
* :func:`draw` — i.i.d. draws from any proposal q (``adaptive`` uses q or uniform, see
  :mod:`dho2_tf.prioritized.switch`).
* :func:`draw_uniform` — K i.i.d. uniform draws, weights 1/K (the light steps of ``adaptive``).
* :func:`uniform_pool`, :func:`select_pool_topk` — loss-ranked selection from a random candidate
  pool (``pool``; Loshchilov & Hutter 2015, Jiang et al. 2019).
* :func:`select_global_topk` — the exact top-K of the union of all shards: every rank allgathers
  its top-K candidate priorities and computes the same winners (positions identify the owner).
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator

SELECTIONS = ("topk", "importance", "global", "adaptive", "pool")


def select_topk(p_hat: tf.Tensor, num_selected: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices of the ``num_selected`` largest p̂ (ties: lower index first), weights 1/K.

    Args:
        p_hat: float32 [n].
        num_selected: K (static, 1 ≤ K ≤ n).

    Returns:
        ``(idx int32 [K], weights float32 [K])``.
    """
    idx = tf.math.top_k(p_hat, k=num_selected, sorted=False).indices
    return idx, tf.fill([num_selected], 1.0 / num_selected)


def importance_proposal(p_hat: tf.Tensor, gamma: float, use_sqrt: bool) -> tf.Tensor:
    """q_i = (1−γ)·ψ_i/Σ_l ψ_l + γ/n with ψ = sqrt(max(p̂, 0)) or max(p̂, 0): float32 [n].

    ``use_sqrt`` is for length priorities (ψ = ‖g_i‖, the minimum-variance proposal). When every
    ψ is 0 the proposal is uniform.
    """
    psi = tf.maximum(p_hat, 0.0)
    if use_sqrt:
        psi = tf.sqrt(psi)
    n = tf.cast(tf.size(p_hat), tf.float32)
    total = tf.reduce_sum(psi)
    shape = tf.where(total > 0.0, tf.math.divide_no_nan(psi, total), tf.ones_like(psi) / n)
    return (1.0 - gamma) * shape + gamma / n


def select_importance(p_hat: tf.Tensor, num_selected: int, gamma: float, use_sqrt: bool,
                      seed: tf.Tensor, max_weight: float | None = None
                      ) -> tuple[tf.Tensor, tf.Tensor]:
    """K i.i.d. draws from :func:`importance_proposal` with weights 1/(K·n·q_i).

    Args:
        p_hat: float32 [n].
        num_selected: K (static).
        gamma: floor mixing weight γ ∈ (0, 1]; weights are ≤ 1/(K·γ).
        use_sqrt: ψ = sqrt(p̂) (length priorities) instead of ψ = p̂.
        seed: int [2] stateless seed.
        max_weight: optional clip of K·weight (biased when active).

    Returns:
        ``(idx int32 [K], weights float32 [K])`` with E[Σ_j w_j g_{idx_j}] = (1/n) Σ_i g_i.
    """
    return draw(importance_proposal(p_hat, gamma, use_sqrt), num_selected, seed, max_weight)


def draw(q: tf.Tensor, num_selected: int, seed: tf.Tensor, max_weight: float | None = None
         ) -> tuple[tf.Tensor, tf.Tensor]:
    """K i.i.d. draws i_j ~ q with weights 1/(K·n·q_{i_j}) (optionally K·weight clipped).

    Args:
        q: float32 [n], a distribution with every q_i > 0.
        num_selected: K (static).
        seed: int [2] stateless seed.
        max_weight: optional clip of K·weight (biased when active).

    Returns:
        ``(idx int32 [K], weights float32 [K])``.
    """
    draws = tf.random.stateless_categorical(tf.math.log(q)[None], num_selected, seed,
                                            dtype=tf.int32)[0]
    n = tf.cast(tf.size(q), tf.float32)
    scale = 1.0 / (n * tf.gather(q, draws))
    if max_weight is not None:
        scale = tf.minimum(scale, max_weight)
    return draws, scale / num_selected


def draw_uniform(n: int, num_selected: int, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """K i.i.d. draws i_j ~ U{0, …, n−1} with weights 1/K: :func:`draw` with q_i = 1/n, without
    its O(n) proposal.

    Args:
        n: the shard size n_j.
        num_selected: K (static).
        seed: int [2] stateless seed.

    Returns:
        ``(idx int32 [K], weights float32 [K])``.
    """
    idx = tf.random.stateless_uniform([num_selected], seed, 0, n, dtype=tf.int32)
    return idx, tf.fill([num_selected], 1.0 / num_selected)


def uniform_pool(n: int, pool_size: int, seed: tf.Tensor) -> tf.Tensor:
    """``pool_size`` distinct indices of ``range(n)``, uniformly at random: int32 [C]."""
    keys = tf.random.stateless_uniform([n], seed)
    return tf.math.top_k(keys, k=pool_size, sorted=False).indices


def select_pool_topk(pool: tf.Tensor, pool_losses: tf.Tensor, num_selected: int
                     ) -> tuple[tf.Tensor, tf.Tensor]:
    """The K examples of the candidate pool with the largest current loss, weights 1/K.

    Online batch selection (Loshchilov & Hutter, 2015) / Selective Backprop (Jiang et al.,
    2019): a forward pass scores the pool, the backward pass runs on the K highest losses only
    (biased towards hard examples, like the paper's top-k).

    Args:
        pool: int32 [C], candidate indices.
        pool_losses: float32 [C], ℓ_i of the candidates at the current weights.
        num_selected: K (static, K ≤ C).

    Returns:
        ``(idx int32 [K], weights float32 [K])``.
    """
    top = tf.math.top_k(pool_losses, k=num_selected, sorted=False).indices
    return tf.gather(pool, top), tf.fill([num_selected], 1.0 / num_selected)


def candidate_counts(shard_sizes: Sequence[int], num_selected_total: int) -> list[int]:
    """Static candidate-list length C_j = min(K_total, n_j) of every rank."""
    return [min(num_selected_total, n_j) for n_j in shard_sizes]


def select_global_topk(p_hat: tf.Tensor, shard_sizes: Sequence[int], num_selected_total: int,
                       rank: int, comm: Communicator) -> tuple[tf.Tensor, tf.Tensor]:
    """This rank's share of the exact top-K_total of the union of all shards.

    Every rank offers its C_j = min(K_total, n_j) best candidates (sorted by p̂); one allgather
    gives every rank the same list of P·C values in rank order, whose top-K_total (ties: lower
    position first) is the global selection. A candidate's position in that list identifies
    (rank, local index), so no index needs to be exchanged.

    Args:
        p_hat: float32 [n_j], this rank's estimated priorities.
        shard_sizes: n_j of every rank (static, identical on all ranks).
        num_selected_total: K_total = Σ_j K_j.
        rank: this rank (position in ``shard_sizes``).
        comm: the communicator (one allgather, issued by every rank).

    Returns:
        ``(idx int32 [C_j], weights float32 [C_j])``: this rank's candidates, weight
        P/K_total if selected and 0 otherwise (so the mean over P ranks of Σ w·ℓ is the mean
        loss over the K_total selected points).
    """
    counts = candidate_counts(shard_sizes, num_selected_total)
    top = tf.math.top_k(p_hat, k=counts[rank], sorted=True)
    all_p = comm.allgather(top.values, name="dho2/prioritized/global_topk_values")
    winners = tf.math.top_k(all_p, k=num_selected_total, sorted=False).indices
    is_selected = tf.scatter_nd(winners[:, None], tf.ones([num_selected_total]),
                                tf.shape(all_p))
    start = sum(counts[:rank])
    mine = is_selected[start:start + counts[rank]]
    return top.indices, mine * (len(shard_sizes) / num_selected_total)
