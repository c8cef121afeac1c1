#!/usr/bin/env python
"""Score the app's unlabelled pool (and write its maps / masks) as a torchrun job: one process per GPU or CPU worker.

    torchrun --standalone --nproc_per_node=2 scripts/score_pool.py --studies STUDIES --bundle bundles/uavls \\
        --variant small --prompts polyp,cyst,lesion --num-samples 8 [--datalist X] [--masks]
    python scripts/score_pool.py ...           # the same as a single process

Writes what the MONAI Label app's ``POST /scoring/uncertainty`` writes (image-info scores with the checkpoint's
identity, so the app's strategies use them and its scoring skips these images), plus the uncertainty maps under the
infer task's label tags and, with ``--masks``, the masks under the tag ``original``. Backend: NCCL with CUDA (each
process takes the GPU of its LOCAL_RANK), gloo on CPU. Images are cut into chunks of ``--batch-images`` images
(all prompts of a chunk in one forward), chunk k runs on rank k % world_size; rank 0 gathers the results and is the
only writer of the datastore. See apps/vlseg/README.md, "Scoring a large pool with torchrun".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "apps" / "vlseg"))  # the app's ``lib`` package (datastore layout, image helpers)

from lib.params import parse_label_names  # noqa: E402
from lib.scoring import pool as app_pool  # noqa: E402
from vlseg.app_support.bundles import BundleError, checkpoint_identity, checkpoint_path, read_checkpoint_record  # noqa: E402
from vlseg.distributed.context import broadcast_from_main, close_distributed, init_distributed  # noqa: E402
from vlseg.distributed.pool import run_pool  # noqa: E402
from vlseg.scores import DEFAULT_SCORE, SCORES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", required=True, help="the app's studies folder (MONAI Label folder datastore)")
    p.add_argument("--bundle", required=True, help="bundle folder (with models/model.pt, as the app serves it)")
    p.add_argument("--variant", default="", help="size variant the app serves (--conf variant), e.g. small / tiny")
    p.add_argument("--model", default=None, help="model name the app knows the bundle by (default: its folder name)")
    p.add_argument("--prompts", default=None,
                   help="the app's label words (--conf labels), e.g. polyp,cyst,lesion (default: the app's)")
    p.add_argument("--num-samples", type=int, default=8, help="stochastic passes per image (app: scoring_samples)")
    p.add_argument("--seed", type=int, default=None, help="seed of every chunk's passes (default: the bundle's)")
    p.add_argument("--datalist", default=None, help="score only the images of this datalist JSON")
    p.add_argument("--masks", action="store_true", help="also store the masks (label tag --mask-tag)")
    p.add_argument("--mask-tag", default=app_pool.MASK_TAG, help="label tag of the masks (default: original)")
    p.add_argument("--uncertainty-tag", default="uncertainty", help="the app's --conf uncertainty_tag")
    p.add_argument("--include-labelled", action="store_true", help="labelled images too (batch inference)")
    p.add_argument("--force", action="store_true", help="re-score images already scored with the same set-up")
    p.add_argument("--batch-images", type=int, default=4, help="images per forward pass (x prompts items)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loader processes per rank (preprocessing)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--score", default=DEFAULT_SCORE, choices=list(SCORES), help="score shown in the summary")
    p.add_argument("--report", default=None, help="write the summary JSON here too (rank 0)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2 (uncertainty needs several stochastic passes)")
    if args.batch_images < 1:
        p.error("--batch-images must be >= 1")
    return args


def _setup(args) -> app_pool.PoolSetup:
    bundle = Path(args.bundle).resolve()
    if not (bundle / "configs" / "inference.json").is_file():
        raise BundleError(f"{bundle} is not a bundle folder (no configs/inference.json)")
    ckpt = checkpoint_path(bundle)
    if not ckpt.is_file():
        raise BundleError(f"no checkpoint {ckpt}; make one with: python -m vlseg.app_support.checkpoints --bundle "
                          f"{bundle} --variant {args.variant!r}")
    record = read_checkpoint_record(bundle)
    if record and record.get("variant", "") != args.variant:
        raise BundleError(f"models/model.pt was made for variant {record.get('variant') or 'default'!r}, not "
                          f"{args.variant or 'default'!r} (the app refuses it too)")
    labels = parse_label_names(args.prompts)
    return app_pool.PoolSetup(
        model=args.model or bundle.name, variant=args.variant, prompts=list(labels.items()),
        num_samples=args.num_samples, checkpoint_sha256=checkpoint_identity(ckpt).get("sha256"),
        uncertainty_tag=args.uncertainty_tag, masks=args.masks, mask_tag=args.mask_tag,
        staging=os.path.join(os.path.abspath(args.studies), app_pool.STAGING_DIR, uuid.uuid4().hex[:12]))


def _plan(args) -> dict:
    """Rank 0: the set-up and the work list (or the error), for every rank."""
    try:
        setup = _setup(args)
        datastore = app_pool.open_datastore(os.path.abspath(args.studies))
        datalist = app_pool.read_datalist(args.datalist) if args.datalist else None
        work = app_pool.select_images(datastore, setup, datalist, force=args.force,
                                      include_labelled=args.include_labelled)
        return {"setup": setup, "work": work}
    except (BundleError, ValueError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = init_distributed(args.device)
    try:
        plan = broadcast_from_main(_plan(args) if ctx.is_main else None, ctx)
        if "error" in plan:
            if ctx.is_main:
                print(f"score_pool: {plan['error']}", file=sys.stderr)
            return 2
        setup, work = plan["setup"], plan["work"]
        from vlseg.bench.bundles import load_bundle_model
        from vlseg.distributed.batch_infer import BatchedBundleInference

        model = load_bundle_model(Path(args.bundle).resolve(), args.variant or None,
                                  checkpoint=checkpoint_path(Path(args.bundle).resolve()))
        engine = BatchedBundleInference(model, ctx.device)
        os.makedirs(setup.staging, exist_ok=True)
        result = run_pool(ctx, engine, work["items"], setup.prompts, setup.num_samples,
                          lambda item, pred: app_pool.stage_image(setup, item, pred), seed=args.seed,
                          images_per_batch=args.batch_images, num_workers=args.num_workers,
                          progress=not args.no_progress)
        if not ctx.is_main:
            return 0
        datastore = app_pool.open_datastore(os.path.abspath(args.studies))
        write_failed = app_pool.commit_results(datastore, setup, result.results)
        app_pool.remove_staging(setup)
        scored = {k: round(v["scores"][args.score], 6) if args.score in v["scores"] else None
                  for k, v in sorted(result.results.items()) if k not in write_failed}
        summary = {
            "model": setup.model, "variant": setup.variant, "num_samples": setup.num_samples,
            "prompts": setup.prompt_texts, "checkpoint": setup.checkpoint_sha256, "signature": setup.signature,
            "score": args.score, "scored": scored, "ranks": result.ranks,
            "failed": {**result.failed, **write_failed}, "skipped": work["skipped"],
            "volumes_not_scored": work["volumes"], "unsupported": work["unsupported"],
            "world_size": ctx.world_size, "backend": ctx.backend or "none (single process)",
            "device": str(ctx.device), "batch_images": args.batch_images, "seconds": round(result.seconds, 3),
            "images_per_s": round(result.images_per_s, 3), "masks": setup.masks,
        }
        if work["volumes"]:
            summary["note"] = ("volumes are scored slice by slice by the app's own scoring (POST /scoring/uncertainty)"
                               "; this job scores 2D images only")
        text = json.dumps(summary, indent=2)
        if args.report:
            Path(args.report).write_text(text + "\n")
        print(text)
        print(f"score_pool: {len(scored)} image(s) scored on {ctx.world_size} process(es) in "
              f"{result.seconds:.1f}s ({result.images_per_s:.2f} images/s), {len(summary['failed'])} failed, "
              f"{len(work['skipped'])} unchanged", file=sys.stderr)
        return 1 if summary["failed"] else 0
    finally:
        close_distributed(ctx)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    sys.exit(main())
