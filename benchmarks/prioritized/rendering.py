"""Markdown report of the prioritized-SGD benchmark (rows written by
``benchmarks/bench_prioritized.py``).

A row is one run: the fields of :class:`~benchmarks.prioritized.harness.RunSpec` and
:class:`~benchmarks.prioritized.harness.RunResult`. Times are medians over seeds; a run that
missed the target counts as its clock budget (the row's ``budget_s``, else the model's), so a
speed-up involving a miss is a bound. Speed-up = median T_SGD / median T_method; the bracket is
the min–max of the per-seed ratios.

Cost split (medians over seeds): light and full steps, their mean in-graph times T̄_light and
T̄_full (SGD: every step is light), and the bookkeeping's share of the clock,
full·(T̄_full − T̄_light) (scores, priority scatter, τ; "–" when every step is full).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.common import provenance_lines
from benchmarks.prioritized import harness as bench

Row = dict[str, Any]
Key = tuple[str, int, str, int]  # (model, ranks, method, batch)

HEADER = ("| model | P | method | lr | hits | time to target, median [min–max] s | "
          "initial pass s | grad evals (k) | best acc | speed-up vs SGD equal work | "
          "speed-up vs SGD best batch |\n|---|---|---|---|---|---|---|---|---|---|---|")
#: Extra columns of results files with step times (the cost split).
SPLIT_HEADER = (" light / full steps | step ms light / full | bookkeeping s |", "---|---|---|")


def group_runs(rows: list[Row]) -> dict[Key, list[Row]]:
    """Runs grouped by (model, ranks, method, batch)."""
    groups: dict[Key, list[Row]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["ranks"], row["method"], row["batch"]),
                          []).append(row)
    return groups


def seed_times(runs: list[Row], budget: float) -> dict[int, float]:
    """Time to target per seed; a miss counts as the run's own budget (``budget_s``), or as
    ``budget`` for rows that do not record one."""
    return {r["seed"]: (r.get("budget_s") or budget) if r["time_to_target"] is None
            else r["time_to_target"] for r in runs}


def speedup(reference: dict[int, float], times: dict[int, float]) -> str:
    """``"1.23× [0.9–1.5]"``: ratio of medians and the range of per-seed ratios."""
    seeds = sorted(set(reference) & set(times))
    if not seeds:
        return "–"
    ratios = [reference[s] / times[s] for s in seeds]
    ratio = np.median(list(reference.values())) / np.median(list(times.values()))
    return f"{ratio:.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]"


def best_batch(groups: dict[Key, list[Row]], model: str, ranks: int, budget: float) -> int:
    """The SGD batch with the lowest median time among those run with several seeds.

    With a single seed per batch (e.g. ``--seeds 0``) every swept batch is a candidate.
    """
    sgd = {key[3]: runs for key, runs in groups.items() if key[:3] == (model, ranks, "sgd")}
    several = {b: runs for b, runs in sgd.items() if len(runs) > 1} or sgd
    multi_seed = {b: seed_times(runs, budget) for b, runs in several.items()}
    return min(multi_seed, key=lambda b: (np.median(list(multi_seed[b].values())), b))


def _row(key: Key, runs: list[Row], groups: dict[Key, list[Row]], target: float,
         budget: float, eq_batch: int, best: int, split: bool) -> str:
    model, ranks, method, batch = key
    times = seed_times(runs, budget)
    values = list(times.values())
    if method == "sgd":
        tags = [t for t, b in (("equal work", eq_batch), ("best", best)) if batch == b]
        name, ratios = f"sgd b={batch}" + (f" ({', '.join(tags)})" if tags else ""), ["", ""]
    else:
        name = method
        ratios = [speedup(seed_times(groups[(model, ranks, "sgd", b)], budget), times)
                  for b in (eq_batch, best)]
    hits = sum(r["time_to_target"] is not None for r in runs)
    return (f"| {model} ({target:.0%}) | {ranks} | {name} | {runs[0]['learning_rate']} | "
            f"{hits}/{len(runs)} | {np.median(values):.2f} [{min(values):.2f}–{max(values):.2f}] "
            f"| {np.median([r['init_seconds'] for r in runs]):.2f} | "
            f"{np.median([r['evaluations'] for r in runs]) / 1e3:.0f} | "
            f"{np.median([r['best_accuracy'] for r in runs]):.3f} | {ratios[0]} | {ratios[1]} |"
            + (f" {cost_split(runs)} |" if split else ""))


def bookkeeping_seconds(run: Row) -> float:
    """full·(T̄_full − T̄_light) of one run, in seconds."""
    return run.get("full_steps", 0) * (run.get("full_step_ms", 0.0)
                                       - run.get("light_step_ms", 0.0)) / 1e3


def cost_split(runs: list[Row]) -> str:
    """``light / full steps | T̄_light / T̄_full ms | bookkeeping s`` (medians over seeds)."""
    def median(key: str) -> float:
        return float(np.median([r.get(key, 0) for r in runs]))

    light, full = median("light_steps"), median("full_steps")
    if light + full == 0:
        return "– | – | –"
    times = " / ".join("–" if n == 0 else f"{median(key):.2f}" for n, key in (
        (light, "light_step_ms"), (full, "full_step_ms")))
    bookkeeping = (f"{np.median([bookkeeping_seconds(r) for r in runs]):.2f}"
                   if light > 0 and full > 0 else "–")
    return f"{light:.0f} / {full:.0f} | {times} | {bookkeeping}"


def markdown(rows: list[Row], targets: dict[str, float], budgets: dict[str, float],
             meta: Mapping[str, Any] | None, results: str, tuning: list[Row] = (),
             calibration: Mapping[str, Any] | None = None, min_base_seconds: float = 30.0
             ) -> str:
    """The benchmark section: the run's command, commit, date and results file (``meta``, see
    :func:`~benchmarks.common.run_metadata`; ``None`` if not recorded), one table row
    per method, the SGD batch sweep, the strong scaling, the learning-rate grid (``tuning``:
    the seed-0 runs at the rates not chosen), the calibrated targets (``calibration``) and
    whether the base runs (SGD at its best batch, P = 1) took ≥ ``min_base_seconds``."""
    groups = group_runs(rows)
    split = any("light_steps" in r for r in rows)  # older results files have no step times
    head, rule = HEADER.split("\n")
    header = f"{head}{SPLIT_HEADER[0]}\n{rule}{SPLIT_HEADER[1]}" if split else HEADER
    lines = [*provenance_lines(meta, results), "", header]
    for model, ranks in sorted({key[:2] for key in groups}):
        psgd = next(r for r in rows if r["model"] == model and r["ranks"] == ranks
                    and r["method"] != "sgd")
        eq_batch = bench.equal_work_batch(psgd["k"], psgd["r"], psgd["n_train"], ranks)
        best = best_batch(groups, model, ranks, budgets[model])
        for key in sorted(k for k in groups if k[:2] == (model, ranks)):
            if key[2] != "sgd" or len(groups[key]) > 1:  # skip single-seed sweep points
                lines.append(_row(key, groups[key], groups, targets[model], budgets[model],
                                  eq_batch, best, split))
    lines += ["", sweep_note(groups), "", scaling_note(groups, budgets)]
    notes = [budget_note(rows),
             tuning_note(list(rows) + list(tuning), budgets) if tuning else "",
             calibration_note(calibration or {}, targets),
             base_note(groups, budgets, min_base_seconds) if split else ""]
    lines += [line for note in notes if note for line in ("", note)]
    return "\n".join(lines) + "\n"


def budget_note(rows: list[Row]) -> str:
    """The clock budgets the rows record (``budget_s``), per model and P; empty for older
    rows."""
    budgets: dict[str, dict[int, float]] = {}
    for r in rows:
        if r.get("budget_s"):
            budgets.setdefault(r["model"], {})[r["ranks"]] = r["budget_s"]
    parts = [f"{model} " + ", ".join(f"{b:g} s at P = {p}" for p, b in sorted(by_p.items()))
             for model, by_p in sorted(budgets.items())]
    return ("Clock budget per run (a miss counts as the budget): " + "; ".join(parts) + "."
            ) if parts else ""


def tuning_note(rows: list[Row], budgets: dict[str, float]) -> str:
    """Seed-0 time to target at every learning rate tried, per model, P, method and batch."""
    trials: dict[tuple[str, int, str, int], dict[float, float | None]] = {}
    for r in rows:
        if r["seed"] == min(x["seed"] for x in rows):
            trials.setdefault((r["model"], r["ranks"], r["method"], r["batch"]),
                              {})[r["learning_rate"]] = r["time_to_target"]
    parts = []
    for (model, ranks, method, batch), times in sorted(trials.items()):
        if len(times) > 1:
            name = f"sgd b={batch}" if method == "sgd" else method
            grid = ", ".join(f"{lr:g}: {'miss' if t is None else f'{t:.1f} s'}"
                             for lr, t in sorted(times.items()))
            parts.append(f"{model} P={ranks} {name} ({grid})")
    return ("Learning rates tuned on one grid (seed 0; time to target per rate): "
            + "; ".join(parts) + ".") if parts else ""


def calibration_note(calibration: Mapping[str, Any], targets: dict[str, float]) -> str:
    """The calibrated targets and when the calibration run first reached them."""
    parts = []
    for label, entry in sorted(calibration.items()):
        target = entry.get("target")
        if target is None:
            parts.append(f"{label}: no improvement after the calibration time, target "
                         f"{targets.get(label, float('nan')):.3f} from the command line")
            continue
        first = next(t for t, acc in entry["curve"] if acc >= target)
        parts.append(f"{label}: {target:.3f} (first reached at {first:.1f} s)")
    return ("Targets calibrated on SGD at the equal-work batch (P = 1, seed 0): "
            + "; ".join(parts) + ".") if parts else ""


def base_note(groups: dict[Key, list[Row]], budgets: dict[str, float],
              min_base_seconds: float) -> str:
    """Median time of SGD at its best batch at P = 1 per model, flagged when < the minimum."""
    parts = []
    for model in sorted({key[0] for key in groups if key[1] == 1}):
        if not any(key[:3] == (model, 1, "sgd") for key in groups):
            continue
        batch = best_batch(groups, model, 1, budgets[model])
        t = float(np.median(list(seed_times(groups[(model, 1, "sgd", batch)],
                                            budgets[model]).values())))
        parts.append(f"{model} {t:.1f} s" + ("" if t >= min_base_seconds else " (short)"))
    return (f"Base runs (SGD at its best batch, P = 1, median; ≥ {min_base_seconds:g} s "
            "wanted): " + "; ".join(parts) + ".") if parts else ""


def sweep_note(groups: dict[Key, list[Row]]) -> str:
    """Seed-0 times of every swept SGD batch."""
    parts = []
    for (model, ranks, method, batch), runs in sorted(groups.items()):
        if method == "sgd":
            t = min(runs, key=lambda r: r["seed"])["time_to_target"]
            parts.append(f"{model} P={ranks} b={batch}: {'miss' if t is None else f'{t:.2f} s'}")
    return "SGD batch sweep (first seed): " + "; ".join(parts) + "."


def scaling_note(groups: dict[Key, list[Row]], budgets: dict[str, float]) -> str:
    """Strong scaling T(P=1)/T(P) of every method run with several seeds at both P."""
    parts = []
    for (model, ranks, method, batch), runs in sorted(groups.items()):
        single = groups.get((model, 1, method, batch))
        if ranks > 1 and single and len(single) > 1 and len(runs) > 1:
            t1 = np.median(list(seed_times(single, budgets[model]).values()))
            tp = np.median(list(seed_times(runs, budgets[model]).values()))
            label = f"sgd b={batch}" if method == "sgd" else method
            missed = any(r["time_to_target"] is None for r in single + runs)
            parts.append(f"{model} {label}: {t1 / tp:.2f}{'*' if missed else ''}")
    if not parts:
        return ""
    return ("Strong scaling T(1)/T(2) (P ranks share the same 2 cores): " + "; ".join(parts)
            + ". * includes misses counted at the budget.")

