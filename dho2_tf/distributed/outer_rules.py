"""The outer rules of DHO2: the released code's window extrapolation and consensus ADMM.

Both are pure functions of arrays/tensors (plus a communicator for the consensus average).
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from dho2_tf.distributed.comm import Communicator
from dho2_tf.numerics import scalar


def window_jump(theta: tf.Tensor, theta_start: tf.Tensor,
                velocity: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The released DHO2 code's end-of-window rule, with v = π/σ_w stored.

    Gu et al., "DHO2", arXiv 2505.00982 (released implementation).

    Math:
        D_j = θ_end(j) − θ̃_j;  v_j = v_{j−1} + D_j (= Σ_{i≤j} D_i);  θ ← θ_end(j) + v_j.
        The gradient offset during the next window is σ_w·v_j (= π).

    Args:
        theta: θ_end(j), float [n].
        theta_start: θ̃_j, the weights at the start of the window.
        velocity: v_{j−1}.

    Returns:
        ``(new_theta, new_velocity)``.
    """
    new_velocity = velocity + (theta - theta_start)
    return theta + new_velocity, new_velocity


class ConsensusResult(NamedTuple):
    """Outcome of one consensus-ADMM round.

    Attributes:
        z: float [n], the new consensus variable (identical on every rank).
        dual: float [n], this rank's new dual π_i.
        primal_residual: (Σ_i ‖x_i − z‖²)^½ over all ranks.
        dual_residual: ρ·√P·‖z − z_old‖ (Boyd et al. §7.1 residual of the consensus problem).
    """

    z: tf.Tensor
    dual: tf.Tensor
    primal_residual: tf.Tensor
    dual_residual: tf.Tensor


def consensus_round(x: tf.Tensor, dual: tf.Tensor, z_old: tf.Tensor, rho: float,
                    comm: Communicator, *, name: str = "dho2/admm") -> ConsensusResult:
    """z- and dual-update of scaled consensus ADMM with one fused allreduce.

    Math (Boyd et al. 2011 §7.1):
        z ← mean_i(x_i + π_i/ρ);  π_i ← π_i + ρ(x_i − z).
        Since Σ_i π_i = 0 after every round, mean_i ‖x_i‖² − ‖z‖² = (1/P) Σ_i ‖x_i − z‖², so the
        primal residual rides along in the same allreduce as one extra element.

    Args:
        x: float [n], this rank's local iterate x_i.
        dual: float [n], π_i.
        z_old: float [n], the previous consensus value.
        rho: ρ > 0.
        comm: communicator over all ranks.
        name: collective name.
    """
    rho_t = scalar(rho, x.dtype)
    packed = tf.concat([x + dual / rho_t, tf.reshape(tf.reduce_sum(tf.square(x)), [1])], 0)
    mean = comm.allreduce(packed, "mean", name=f"{name}/consensus")
    z = mean[:-1]
    new_dual = dual + rho_t * (x - z)
    size = tf.cast(comm.size, x.dtype)
    primal = tf.sqrt(tf.maximum(size * (mean[-1] - tf.reduce_sum(tf.square(z))), 0.0))
    dual_res = rho_t * tf.sqrt(size) * tf.norm(z - z_old)
    return ConsensusResult(z, new_dual, primal, dual_res)
