"""The active-learning simulation protocol: the plan, and its jobs, each resumable round by round.

* :func:`make_plan` -- the pool (datalist items whose object is the label word), the labelled count per round
  (an initial share, then at most ``step`` % of the pool per round) and, per seed, the initial labelled set. The
  initial set of seed ``s`` is the same for every arm (paired seeds).
* Jobs (:func:`run_job`), each writing its result as JSON under the work folder **last**, so a killed job leaves
  no half result and a re-run continues where it stopped:

  - ``full`` -- the app's train task on the whole pool (from random initialisation): the full-data Dice;
  - ``init:<seed>`` -- the same on seed's initial set: round 0 of every arm of that seed (trained once, shared);
  - ``curve:<arm>:<seed>`` -- rounds 1.. of one arm: select with the app's strategy (:class:`vlseg.bench.active.AppPool`),
    train with the app's train task **warm-started from the previous round's checkpoint**, test Dice. Each round
    leaves ``r<k>.json`` (labelled set, picks, checkpoint hashes before and after training, Dice, seconds) and its
    checkpoint ``ckpt_r<k>.pt``; a resumed curve restores the last finished round's checkpoint and labelled set and
    goes on from the next round.

Every training and scoring runs in a bundle copy whose ``configs/<VARIANT>.json`` is the chosen size variant plus the
protocol's overrides (image size, early stopping, time cap): what the app serves with ``--conf variant``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

from vlseg.bench.active import AppPool, file_sha256, item_key
from vlseg.bench.data import write_datalist

__all__ = ["VARIANT", "ARMS", "PLAN_KEYS", "round_counts", "make_plan", "load_plan", "jobs_of", "job_done",
           "prepare_bundle", "run_job", "read_json", "curve_records"]

VARIANT = "al"  # the override file every bundle copy of the simulation gets
ARMS = ("random", "uncertainty", "diverse")
#: settings that make a work folder's results comparable: a resumed run must have the same ones
PLAN_KEYS = ("bundle_path", "base_variant", "overrides", "full_overrides", "word", "arms", "initial", "step",
             "max_fraction", "seeds", "epochs_init", "epochs_round", "epochs_full", "scoring_samples",
             "scoring_max_images", "eval_samples", "datalist")


def read_json(path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_json(path, obj) -> None:
    write_datalist(obj, Path(path))  # atomic: a temporary file replaced into place


def round_counts(n: int, initial: float, step: float, max_fraction: float) -> list[int]:
    """Labelled images per round: ``initial`` % of the pool, then ``step`` % of the pool more per round (at least one
    image) up to ``max_fraction`` %, and at least one round. ``step`` above 5 % is refused (the protocol adds at most
    5 % per round; only a pool under 20 images, where 5 % is less than one image, gets one image per round)."""
    if n < 2:
        raise ValueError(f"the pool has {n} item(s); active learning needs at least 2")
    if not 0 < step <= 5.0:
        raise ValueError(f"--step must be in (0, 5] % of the pool (rounds add at most 5 %), got {step}")
    if not 0 < initial < max_fraction <= 100:
        raise ValueError(f"need 0 < --initial ({initial}) < --max-fraction ({max_fraction}) <= 100")
    first = min(n - 1, max(1, int(math.floor(n * initial / 100.0 + 1e-9))))
    add = max(1, int(math.floor(n * step / 100.0 + 1e-9)))
    last = max(first + 1, min(n, int(math.floor(n * max_fraction / 100.0 + 1e-9))))
    return list(range(first, last + 1, add)) if (last - first) % add == 0 else list(range(first, last + 1, add)) + [last]


def make_plan(settings: dict, pool: list[dict], val: list[dict], test: list[dict]) -> dict:
    """The plan: settings, pool / validation / test items keyed by :func:`item_key`, counts per round, and the
    initial labelled set of every seed (seeded random choice, shared by all arms)."""
    keys = [item_key(it, i) for i, it in enumerate(pool)]
    if len(set(keys)) != len(keys):
        raise ValueError("pool items have duplicate keys")
    counts = round_counts(len(keys), settings["initial"], settings["step"], settings["max_fraction"])
    initial = {str(s): sorted(random.Random(s).sample(sorted(keys), counts[0])) for s in range(settings["seeds"])}
    return {"settings": dict(settings), "pool": dict(zip(keys, pool)), "validation": val, "test": test,
            "counts": counts, "initial": initial}


def load_plan(work: Path, fresh: dict | None = None) -> dict:
    """The work folder's plan; with ``fresh`` (a new plan) write it when there is none, and refuse to mix results
    of different settings (the error names the differing keys and what to do)."""
    path = Path(work) / "plan.json"
    old = read_json(path)
    if fresh is None:
        if old is None:
            raise FileNotFoundError(f"no plan in {work}: run the benchmark without --job first")
        return old
    if old is None:
        _write_json(path, fresh)
        return fresh
    diff = [k for k in PLAN_KEYS if old["settings"].get(k) != fresh["settings"].get(k)]
    if diff or old["counts"] != fresh["counts"] or old["initial"] != fresh["initial"]:
        raise SystemExit(f"{work} holds a run with other settings ({', '.join(diff) or 'pool / rounds'} differ): "
                         "resume with the same options, or pass another --work-dir (or --restart to discard it)")
    return old


def jobs_of(plan: dict) -> dict[str, list[str]]:
    """The jobs by phase: ``first`` (full data + initial sets; the regime check), ``curves``."""
    st = plan["settings"]
    seeds = range(st["seeds"])
    return {"first": ["full"] + [f"init:{s}" for s in seeds],
            "curves": [f"curve:{a}:{s}" for s in seeds for a in st["arms"]]}


def _job_dir(work: Path, job: str) -> Path:
    return Path(work) / job.replace(":", "/")


def curve_records(work: Path, job: str) -> dict[int, dict]:
    d = _job_dir(work, job)
    out = {}
    for p in sorted(d.glob("r*.json")) if d.is_dir() else []:
        rec = read_json(p)
        if rec is not None and p.stem[1:].isdigit():
            out[int(p.stem[1:])] = rec
    return out


def job_done(work: Path, plan: dict, job: str) -> bool:
    if job.startswith("curve:"):
        return len(plan["counts"]) - 1 in curve_records(work, job)
    return read_json(_job_dir(work, job) / "record.json") is not None


def prepare_bundle(src: Path, dest: Path, base_variant: str | None, overrides: dict) -> Path:
    """Copy the bundle (without models/) to ``dest`` and write ``configs/<VARIANT>.json`` = the base variant's
    override file (if any) updated with ``overrides``."""
    from vlseg.bench.train import copy_bundle

    copy = copy_bundle(Path(src), Path(dest))
    conf = {}
    if base_variant and base_variant != "paper":
        conf = json.loads((copy / "configs" / f"{base_variant}.json").read_text())
    conf.update(overrides)
    (copy / "configs" / f"{VARIANT}.json").write_text(json.dumps(conf, indent=1) + "\n")
    return copy


def _drop_trainer_checkpoints(bundle: Path) -> None:
    """The bundle's trainer also saves ``checkpoint_epoch=N.pt`` (model + optimizer) beside ``model.pt``; the
    simulation only needs ``model.pt`` (what the app serves and fine-tunes from)."""
    for p in (Path(bundle) / "models").glob("*.pt"):
        if p.name != "model.pt":
            p.unlink()


def _items(plan: dict, keys) -> dict[str, dict]:
    return {k: plan["pool"][k] for k in keys}


def evaluate(bundle: Path, items: list[dict], word: str, num_samples: int = 1) -> dict:
    """Test Dice of the bundle copy's ``models/model.pt``, every item prompted with the label word."""
    from vlseg.bench.bundles import load_bundle_model
    from vlseg.bench.evaluate import evaluate_items

    bm = load_bundle_model(Path(bundle), VARIANT, checkpoint=Path(bundle) / "models" / "model.pt")
    worded = [{**{k: v for k, v in it.items() if k != "prompts"}, "text": word} for it in items]
    s = evaluate_items(bm, worded, num_samples=num_samples)["summary"]
    return {"dice": float(s["dice"]), "iou": float(s["iou"])}


def _train_from_scratch(work: Path, plan: dict, job: str, keys: list[str], epochs: int, overrides: dict, log) -> dict:
    st = plan["settings"]
    d = _job_dir(work, job)
    if d.exists():
        shutil.rmtree(d)  # an unfinished job starts over (it has no rounds)
    bundle = prepare_bundle(Path(st["bundle_path"]), d / "bundle", st["base_variant"], overrides)
    t0 = time.perf_counter()
    pool = AppPool(_items(plan, plan["pool"]), keys, d / "studies", bundle, VARIANT, st["word"])
    train = pool.train(epochs, d / "train")
    _drop_trainer_checkpoints(bundle)
    t1 = time.perf_counter()
    ev = evaluate(bundle, plan["test"], st["word"], st["eval_samples"])
    rec = {"job": job, "n_labeled": len(keys), "labeled": sorted(keys), **train, **ev,
           "train_wall_s": round(t1 - t0, 1), "eval_wall_s": round(time.perf_counter() - t1, 1)}
    _write_json(d / "record.json", rec)
    log(f"{job}: {len(keys)} labelled -> test Dice {ev['dice']:.3f} ({rec['train_wall_s']:.0f} s training)")
    return rec


def run_job(work: Path, job: str, score: str | None = None, log=print) -> dict:
    """Run (or finish) one job of the plan in ``work``; returns its record (a curve: ``{round: record}``)."""
    work = Path(work)
    plan = load_plan(work)
    st = plan["settings"]
    if job_done(work, plan, job):
        return curve_records(work, job) if job.startswith("curve:") else read_json(_job_dir(work, job) / "record.json")
    if job == "full":
        return _train_from_scratch(work, plan, job, sorted(plan["pool"]), st["epochs_full"], st["full_overrides"], log)
    kind, _, rest = job.partition(":")
    if kind == "init":
        return _train_from_scratch(work, plan, job, plan["initial"][rest], st["epochs_init"], st["overrides"], log)
    if kind != "curve":
        raise ValueError(f"unknown job {job!r} (full, init:<seed>, curve:<arm>:<seed>)")
    arm, _, seed = rest.partition(":")
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; use one of {ARMS}")
    if arm != "random" and not score:
        raise ValueError(f"{job}: the {arm} arm needs the score chosen by the gate")
    return _run_curve(work, plan, job, arm, int(seed), score, log)


def _run_curve(work: Path, plan: dict, job: str, arm: str, seed: int, score: str | None, log) -> dict[int, dict]:
    st = plan["settings"]
    counts = plan["counts"]
    init = read_json(_job_dir(work, f"init:{seed}") / "record.json")
    if init is None:
        raise RuntimeError(f"{job}: round 0 (job init:{seed}) has not finished")
    d = _job_dir(work, job)
    d.mkdir(parents=True, exist_ok=True)
    recs = curve_records(work, job)
    recs[0] = {"round": 0, "shared_from": f"init:{seed}", **{k: init[k] for k in ("n_labeled", "labeled", "dice", "iou",
                                                                                   "checkpoint_sha256")}}
    last = max(k for k in range(len(counts)) if all(j in recs for j in range(k + 1)))
    ckpt = _job_dir(work, f"init:{seed}") / "bundle" / "models" / "model.pt" if last == 0 else d / f"ckpt_r{last}.pt"
    if file_sha256(ckpt) != recs[last]["checkpoint_sha256"]:
        raise RuntimeError(f"{job}: the checkpoint of round {last} ({ckpt}) is missing or changed; rerun with --restart")
    bundle = prepare_bundle(Path(st["bundle_path"]), d / "bundle", st["base_variant"], st["overrides"])
    shutil.copy2(ckpt, bundle / "models" / "model.pt")
    pool = AppPool(_items(plan, plan["pool"]), recs[last]["labeled"], d / "studies", bundle, VARIANT, st["word"])
    if last:
        log(f"{job}: resuming after round {last} ({len(recs[last]['labeled'])} labelled)")
    for k in range(last + 1, len(counts)):
        t0 = time.perf_counter()
        n_add = counts[k] - counts[k - 1]
        sel: dict[str, Any] = {}
        if arm == "random":
            picked = pool.select_random(n_add, seed * 1000 + k)
        else:
            sc = pool.score(score, st["scoring_samples"], st["scoring_max_images"], seed * 1000 + k)
            sel = {"scored": len(sc.get("scored", {})), "images_per_s": sc.get("images_per_s")}
            picked = pool.select_uncertain(n_add, score) if arm == "uncertainty" else pool.select_diverse(n_add, score, seed)
        t1 = time.perf_counter()
        labeled = pool.labeled()
        if len(labeled) != counts[k]:
            raise RuntimeError(f"{job} round {k}: {len(labeled)} labelled after selection, the plan says {counts[k]}")
        train = pool.train(st["epochs_round"], d / "train")
        _drop_trainer_checkpoints(bundle)
        t2 = time.perf_counter()
        ev = evaluate(bundle, plan["test"], st["word"], st["eval_samples"])
        shutil.copy2(bundle / "models" / "model.pt", d / f"ckpt_r{k}.pt")
        rec = {"round": k, "arm": arm, "seed": seed, "n_labeled": len(labeled), "labeled": labeled, "added": picked,
               "score": score if arm != "random" else None, **sel, **train, **ev,
               "select_wall_s": round(t1 - t0, 1), "train_wall_s": round(t2 - t1, 1),
               "eval_wall_s": round(time.perf_counter() - t2, 1)}
        _write_json(d / f"r{k}.json", rec)
        prev = d / f"ckpt_r{k - 1}.pt"
        if prev.is_file():
            prev.unlink()
        recs[k] = rec
        log(f"{job} round {k}: {len(labeled)} labelled -> test Dice {ev['dice']:.3f} "
            f"(select {rec['select_wall_s']:.0f} s, train {rec['train_wall_s']:.0f} s)")
    return recs
