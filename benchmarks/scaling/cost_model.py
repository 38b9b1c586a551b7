"""The scaling benchmark's cost model: what docs/algorithm.md §8 predicts per rank.

:func:`predict` gives the state bytes (§8.4) and the ring bytes per step and per refresh (§8.2,
§8.3) of a mode and a rank's role; :data:`FORMULAS` states the same as text for the report;
:func:`ring_bytes` turns the payload of one recorded collective into the bytes a ring
implementation sends, so measured and predicted traffic compare directly.
"""

from __future__ import annotations


def ring_bytes(kind: str, payload: float, group: int) -> float:
    """Bytes one rank sends for a collective on a ring of ``group`` ranks (payload = its input).

    allreduce 2(g−1)/g·N; reduce-scatter (g−1)/g·N (input N = full vector); all-gather
    (g−1)·N (input N = this rank's shard); broadcast ≈ N; alltoall ≤ N (what this rank sends).
    """
    if group <= 1:
        return 0.0
    factor = {"allreduce": 2 * (group - 1) / group, "reducescatter": (group - 1) / group,
              "allgather": group - 1.0, "broadcast": 1.0, "alltoall": 1.0}[kind]
    return factor * payload


# docs/algorithm.md §8.2–§8.3 (ring bytes per rank) and §8.4 (state bytes) as text, per role.
FORMULAS = {
    ("faithful", "all"): ("(12+8+4k)·n", "2(P−1)/P·4n", "m·(4n + 2(P−1)/P·8n′) + (P−1)/P·4kn"),
    ("sharded", "all"): ("(12+4k)·n/P", "(P−1)/P·8n + 2(P−1)/P·12k", "(P−1)/P·8mn"),
    ("pipelined", "U"): ("(12+4k)·n/P_U", "as sharded over P_U", "4n (rank 0: bridge)"),
    ("pipelined", "C"): ("0", "0", "(P_C−1)/P_C·8mn + 4n + 4kn/P_C"),
    ("admm", "all"): ("(12+4+4+4k)·n", "2(P−1)/P·4n/τ", "(P−1)/P·(8mn + 4kn)"),
}


def predict(mode: str, role: str, n: int, k: int, m: int, p: int, tau: int) -> dict[str, float]:
    """State bytes (docs/algorithm.md §8.4), ring bytes per step and refresh (§8.2, §8.3).

    Group sizes: P for every mode but ``pipelined`` (U: P_U = P − P//2, C: P_C = P//2).
    ``basis`` is the transient Lanczos basis 8·m·⌈n/g⌉ (docs/algorithm.md §8.4; none on U ranks).
    """
    g = {"U": p - p // 2, "C": p // 2}.get(role, p)
    rs, ar = (g - 1) / g, 2 * (g - 1) / g
    return {**COST_MODELS[mode](role, n, k, m, g, tau, rs, ar),
            "basis": 0.0 if role == "U" else 8.0 * m * -(-n // g)}


def _cost_faithful(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                   ar: float) -> dict[str, float]:
    return {"state": (20 + 4 * k) * n, "step_ring": ar * 4 * n,
            "refresh_ring": m * ((4 * n if g > 1 else 0) + ar * 8 * n) + rs * 4 * k * n}


def _cost_sharded(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                  ar: float) -> dict[str, float]:
    return {"state": (12 + 4 * k) * n / g, "step_ring": rs * 8 * n + ar * 12 * k,
            "refresh_ring": rs * 8 * m * n if role == "all" else 4 * n}


def _cost_pipelined(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
                    ar: float) -> dict[str, float]:
    if role == "U":
        return _cost_sharded(role, n, k, m, g, tau, rs, ar)
    return {"state": 0.0, "step_ring": 0.0, "refresh_ring": rs * 8 * m * n + 4 * n + 4 * k * n / g}


def _cost_admm(role: str, n: int, k: int, m: int, g: int, tau: int, rs: float,
               ar: float) -> dict[str, float]:
    return {"state": (20 + 4 * k) * n, "step_ring": ar * 4 * n / tau,
            "refresh_ring": rs * (8 * m * n + 4 * k * n)}


#: The cost model of each mode (docs/algorithm.md §8.2–§8.4), per role of a rank.
COST_MODELS = {"faithful": _cost_faithful, "sharded": _cost_sharded,
               "pipelined": _cost_pipelined, "admm": _cost_admm}
