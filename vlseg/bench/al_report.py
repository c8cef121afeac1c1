"""The numbers of an active-learning simulation: learning-curve area, labels needed to reach a target Dice, paired
bootstrap confidence intervals over seeds, the regime check, the target check and the learning-curve plot.

A *curve* is the test Dice after each round of one (arm, seed): ``labels`` (labelled images per round, the same for
every arm and seed) and ``dice`` (one value per round). Arms are compared **paired over seeds**: seed ``s`` of every
arm starts from the same initial labelled set, so a bootstrap resample draws seeds and keeps each seed's curves of
all arms together.

* :func:`curve_auc` -- area under the learning curve, normalised by the label range (trapezoids): the mean Dice over
  the labelling range, in Dice units.
* :func:`labels_to_reach` -- labels needed until the curve first reaches a target (linear interpolation between
  rounds); ``None`` when it never does.
* :func:`compare_arms` -- per arm, with percentile bootstrap 95 % CIs over seeds: mean AUC, the paired AUC
  difference to the reference arm, labels to reach the target on the seed-mean curve and the saving
  ``1 - labels(arm) / labels(reference)``.
* :func:`regime_check` -- is the initial point data-limited (``<= ratio x`` the full-data Dice)?
* :func:`target_check` -- does an uncertainty arm save ``>= min_saving`` of the labels with an AUC-difference CI
  above 0?
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["curve_auc", "labels_to_reach", "seed_mean", "compare_arms", "regime_check", "target_check",
           "learning_curve_plot", "write_report"]


def curve_auc(labels: Sequence[float], dice: Sequence[float]) -> float:
    """Trapezoidal area under ``dice`` over ``labels`` divided by the label range (a mean Dice); a single point is
    its own value. NaN when a value is missing."""
    x, y = np.asarray(labels, np.float64), np.asarray(dice, np.float64)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"labels ({x.size}) and dice ({y.size}) must be non-empty and of one length")
    if not np.isfinite(y).all():
        return float("nan")
    if x.size == 1:
        return float(y[0])
    if np.any(np.diff(x) <= 0):
        raise ValueError("labels must increase from round to round")
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def labels_to_reach(labels: Sequence[float], dice: Sequence[float], target: float) -> float | None:
    """Labels at which the curve first reaches ``target`` (interpolated linearly from the round before; the first
    round itself when it is already there); ``None`` if no round does."""
    prev = None
    for x, y in zip(labels, dice):
        if y is not None and math.isfinite(y) and y >= target:
            if prev is None or prev[1] == y:
                return float(x)
            px, py = prev
            return float(px + (x - px) * (target - py) / (y - py))
        prev = (x, y) if y is not None and math.isfinite(y) else None
    return None


def seed_mean(curves: Sequence[Sequence[float]]) -> np.ndarray:
    """Round-wise mean over seeds of equally long curves."""
    return np.asarray(curves, np.float64).mean(axis=0)


def _ci(values, level: float = 0.95) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return None
    a = (1.0 - level) / 2.0
    return [float(np.quantile(v, a)), float(np.quantile(v, 1.0 - a))]


def compare_arms(labels: Sequence[float], curves: Mapping[str, Mapping[int, Sequence[float]]], target: float | None,
                 reference: str = "random", n_boot: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Per arm: ``auc`` (mean over seeds) and its CI, ``auc_diff`` (paired, arm minus ``reference``) and its CI,
    ``labels_needed`` (on the seed-mean curve; ``None``: not reached) and its CI, ``saving`` (``1 - labels /
    labels of the reference``) and its CI, ``reached_share`` (bootstrap resamples whose mean curve reaches the
    target). ``curves[arm][seed]`` is the Dice per round; only seeds present in every arm are used (paired)."""
    if reference not in curves:
        raise ValueError(f"reference arm {reference!r} has no curves (arms: {sorted(curves)})")
    seeds = sorted(set.intersection(*[set(c) for c in curves.values()]))
    if not seeds:
        raise ValueError("no seed has a finished curve in every arm")
    x = np.asarray(labels, np.float64)
    y = {arm: np.asarray([c[s] for s in seeds], np.float64) for arm, c in curves.items()}  # [seeds, rounds]
    auc = {arm: np.asarray([curve_auc(x, row) for row in v]) for arm, v in y.items()}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(seeds), size=(int(n_boot), len(seeds)))

    def need(arm, idx):
        return labels_to_reach(x, y[arm][idx].mean(axis=0), target) if target is not None else None

    out = {}
    ref_need = need(reference, np.arange(len(seeds)))
    ref_boot = [need(reference, d) for d in draws]
    for arm in curves:
        n0 = need(arm, np.arange(len(seeds)))
        boot_need = [need(arm, d) for d in draws]
        boot_saving = [1.0 - a / r if a is not None and r else None for a, r in zip(boot_need, ref_boot)]
        diff = auc[arm] - auc[reference]
        out[arm] = {
            "seeds": seeds,
            "auc": float(auc[arm].mean()),
            "auc_ci": _ci([auc[arm][d].mean() for d in draws]),
            "auc_diff": float(diff.mean()),
            "auc_diff_ci": _ci([diff[d].mean() for d in draws]) if arm != reference else [0.0, 0.0],
            "labels_needed": n0,
            "labels_needed_ci": _ci(boot_need),
            "saving": (1.0 - n0 / ref_need) if n0 is not None and ref_need else None,
            "saving_ci": _ci(boot_saving) if arm != reference else None,
            "reached_share": float(np.mean([b is not None for b in boot_need])) if target is not None else 0.0,
            "mean_curve": seed_mean(y[arm]).tolist(),
            "curve_ci": [_ci([y[arm][d, r].mean() for d in draws]) for r in range(x.size)],
        }
    return out


def regime_check(initial_dice: Sequence[float], full_dice: float, ratio: float = 0.9) -> dict:
    """The data-limited check: the mean Dice of the initial labelled sets must be ``<= ratio x`` the full-data Dice,
    else more labels cannot help much and an active-learning comparison is not meaningful."""
    init = [float(d) for d in initial_dice if d is not None and math.isfinite(d)]
    if not init or full_dice is None or not math.isfinite(full_dice):
        return {"data_limited": None, "initial_dice": None, "full_dice": full_dice, "ratio": ratio,
                "verdict": "regime check incomplete (no initial or no full-data Dice)"}
    m = float(np.mean(init))
    if full_dice <= 0:
        return {"data_limited": None, "initial_dice": m, "initial_dice_per_seed": init, "full_dice": float(full_dice),
                "ratio": ratio, "verdict": "the full-data model did not learn (Dice 0): no regime to compare in"}
    ok = m <= ratio * full_dice
    return {"data_limited": bool(ok), "initial_dice": m, "initial_dice_per_seed": init, "full_dice": float(full_dice),
            "ratio": ratio, "initial_over_full": m / full_dice if full_dice else float("nan"),
            "verdict": (f"data-limited: the initial point ({m:.3f}) is <= {ratio:g} x the full-data Dice "
                        f"({full_dice:.3f})") if ok else
                       (f"NOT data-limited: the initial point ({m:.3f}) is above {ratio:g} x the full-data Dice "
                        f"({full_dice:.3f}); more labels barely help, so the comparison of strategies is not "
                        "meaningful")}


def target_check(comparison: Mapping[str, Mapping], uncertainty_arms: Sequence[str], min_saving: float = 0.3) -> dict:
    """Met when some arm of ``uncertainty_arms`` saves ``>= min_saving`` of the labels and the CI of its AUC
    difference to the reference lies above 0. Also names the best measured arm (largest mean AUC)."""
    best = max(comparison, key=lambda a: comparison[a]["auc"])
    meeting = [a for a in uncertainty_arms if a in comparison
               and comparison[a]["saving"] is not None and comparison[a]["saving"] >= min_saving
               and comparison[a]["auc_diff_ci"] is not None and comparison[a]["auc_diff_ci"][0] > 0]
    return {"met": bool(meeting), "arms_meeting": meeting, "min_saving": min_saving, "best_arm": best}


def learning_curve_plot(path, labels: Sequence[float], comparison: Mapping[str, Mapping], pool_size: int,
                        title: str, target: float | None = None, full: float | None = None):
    """Seed-mean test Dice per arm against the labelled share of the pool, with the bootstrap 95 % CI as a band."""
    from vlseg.viz import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    xs = 100.0 * np.asarray(labels, np.float64) / pool_size
    for arm, r in comparison.items():
        (line,) = ax.plot(xs, r["mean_curve"], marker="o", ms=4, label=f"{arm} (mean of {len(r['seeds'])} seeds)")
        ci = r["curve_ci"]
        if all(c is not None for c in ci):
            ax.fill_between(xs, [c[0] for c in ci], [c[1] for c in ci], alpha=0.2, color=line.get_color())
    for name, y in (("full-data Dice", full), ("95 % of full-data Dice", target)):
        if y is not None and math.isfinite(y):
            ax.axhline(y, ls="--", lw=1, color="grey")
            ax.text(xs[0], y, f" {name}", va="bottom", fontsize=8, color="grey")
    ax.set_xlabel("labelled share of the pool (%)")
    ax.set_ylabel("test Dice")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


ARM_WORDS = {
    "random": "`random` = a seeded uniform draw of the unlabelled images",
    "uncertainty": "`uncertainty` = the app's `UncertaintyScoring` ({scoring_samples} passes, {scoring_max_images} "
                   "unlabelled images drawn per round, 0 = all) + `MostUncertain`",
    "diverse": "`diverse` = the same scores + `DiverseUncertain` (k-means of image thumbnails, the most uncertain "
               "image per cluster)",
}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f} %"


def _ci_txt(ci, scale: float = 1.0, digits: int = 3) -> str:
    if not ci or not all(c is not None and math.isfinite(c) for c in ci):
        return "n/a"
    return f"[{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def write_report(rep, res: Mapping) -> None:
    """The Markdown of an active-learning run (``rep``: a :class:`vlseg.bench.report.Report`) from ``res``: the
    dict the benchmark also writes to results.json (settings, regime, gate, comparison, target)."""
    st, regime, gate, cmp_ = res["settings"], res["regime"], res.get("gate") or {}, res.get("comparison") or {}
    n_pool, counts = res["data"]["n_pool"], res["counts"]
    seeds = len(next(iter(cmp_.values()))["seeds"]) if cmp_ else 0
    rep.h2("Protocol")
    rep.bullets([
        f"Data: {res['data']['name']}; pool = {n_pool} training images, {res['data']['n_val']} validation images "
        f"(score choice only), {res['data']['n_test']} test images (reported Dice). Every prompt is the app's label "
        f"word **{st['word']!r}** (scoring, training and testing), never a caption.",
        f"Model: `{st['bundle_name']}` variant `{st['base_variant']}` + overrides {json_short(st['overrides'])}, trained "
        "by the app's own train task (`TextBundleTrainTask`: 80/20 split of the labelled images, early stopping on "
        f"that validation split with patience {st['overrides'].get('patience')}, best checkpoint kept).",
        f"Rounds: {', '.join(str(c) for c in counts)} labelled images ({100 * counts[0] / n_pool:.1f} % first, at most "
        f"{st['step']:g} % of the pool added per round). Round 0 of seed s is one training on seed s's random initial "
        f"set, shared by every arm (paired seeds); each later round **fine-tunes from the previous round's "
        f"checkpoint** (the app's train task loads models/model.pt), up to {st['epochs_round']} epochs.",
        f"Arms: {', '.join(st['arms'])}; **{seeds} seeds** per arm. Selection: "
        + "; ".join(ARM_WORDS[a].format(**st) for a in st["arms"]) + ".",
    ])
    if res.get("run_wall_s") is not None:
        rep.p(f"This invocation ran {res['run_wall_s'] / 60:.1f} min (a resumed run counts only its own part; every "
              "round's seconds are in results.json).")
    rep.h2("Regime check (shown first)")
    n_init = len(regime.get("initial_dice_per_seed") or [])
    rep.p(f"Full-data Dice {_f(regime.get('full_dice'))}; initial-set Dice (mean of {n_init} seeds) "
          f"{_f(regime.get('initial_dice'))}. Verdict: **{regime['verdict']}**.")
    rep.h2("Score choice (gate on the validation split)")
    if gate.get("forced"):
        rep.p(f"Score `{gate['score']}` given on the command line (no gate run).")
    elif gate:
        rep.p(f"The gate (`scripts/benchmark_uncertainty.py`'s measurement, validation split, seed 0's round-0 model, "
              f"{gate.get('samples')} passes) chose **`{gate['score']}`** (largest Spearman(score, 1 - Dice)).")
        rep.table(["score", "Spearman [95 % CI]", "worst 10 % in top 10 % [95 % CI]"],
                  [[k, f"{_f(g['spearman'])} {_ci_txt(g['spearman_ci'])}", f"{_f(g['worst_in_top'])} "
                    f"{_ci_txt(g['worst_in_top_ci'])}"] for k, g in gate.get("table", {}).items()])
    if not cmp_:
        rep.p("No finished curves yet: run the command again to continue.")
        return
    rep.h2("Results")
    ref = st.get("reference", "random")
    rows = []
    for arm, r in cmp_.items():
        need = f"not reached by {counts[-1]}" if r["labels_needed"] is None else f"{r['labels_needed']:.0f}"
        rows.append([arm, f"{r['auc']:.3f} {_ci_txt(r['auc_ci'])}",
                     "-" if arm == ref else f"{r['auc_diff']:+.3f} {_ci_txt(r['auc_diff_ci'])}",
                     f"{need} {_ci_txt(r['labels_needed_ci'], digits=0)}",
                     "-" if arm == ref else f"{_pct(r['saving'])} {_ci_txt(r['saving_ci'], 100, 0)}",
                     f"{100 * r['reached_share']:.0f} %"])
    rep.table(["arm", "AUC (mean Dice over the rounds) [95 % CI]", f"AUC difference to {ref} [95 % CI]",
               "labels to 95 % of full-data Dice [95 % CI]", "fewer labels than random [95 % CI]",
               "bootstrap resamples reaching the target"], rows)
    rep.p(f"{seeds} seeds, paired bootstrap over seeds ({st['n_boot']} resamples, percentile 95 % CIs). Target = 95 % "
          f"of the full-data Dice = {_f(res.get('target_dice'))}; labels are read off the seed-mean curve "
          "(linear interpolation between rounds).")
    if res.get("plot"):
        rep.image(Path(rep.out_dir) / res["plot"], "Test Dice per round, mean over seeds (band: bootstrap 95 % CI)")
    tgt = res["target"]
    rep.h2("Target check")
    lines = []
    for arm in [a for a in st["arms"] if a != ref]:
        r = cmp_[arm]
        if r["saving"] is None:
            who = "this arm" if r["labels_needed"] is None else "random"
            saving = f"the label saving is not measurable ({who} does not reach the target within {counts[-1]} labels)"
        else:
            saving = f"{100 * r['saving']:.0f} % fewer labels than random"
        lines.append(f"`{arm}`: {saving}; AUC difference {r['auc_diff']:+.3f} {_ci_txt(r['auc_diff_ci'])}")
    rep.bullets(lines)
    if regime.get("data_limited") is False:
        rep.p("**The regime is not data-limited, so this comparison is not meaningful** (see the regime check).")
    if tgt["met"]:
        rep.p(f"**Target met** by {', '.join(tgt['arms_meeting'])}: >= {100 * tgt['min_saving']:.0f} % fewer labels and "
              "an AUC-difference CI above 0.")
    else:
        rep.p(f"**Target not met**: no uncertainty-driven arm needs >= {100 * tgt['min_saving']:.0f} % fewer labels than "
              "random with an AUC-difference CI above 0 (evidence above).")
    rep.p(f"Best measured strategy (largest mean AUC): **{tgt['best_arm']}** -- the app's default strategy should be it.")


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def json_short(d: Mapping) -> str:
    import json

    return "`" + json.dumps(dict(d), separators=(",", ":")) + "`"
