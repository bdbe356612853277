"""Evaluate a checkpoint with the official protocol (ALGORITHM.md section 9), on 1..N processes.

    python -m eagle_dist.evaluate --checkpoint runs/NAME --shards shards/cocostuff27/val
    python -m eagle_dist.evaluate --checkpoint runs/NAME/checkpoints/step-00000400 --shards DIR
    python -m eagle_dist.evaluate --checkpoint runs/NAME --step 400 --shards DIR --no-crf data.val_batch_size=8
    torchrun --nproc_per_node 4 -m eagle_dist.evaluate --checkpoint runs/NAME --shards DIR
    accelerate launch --multi_gpu --num_processes 4 -m eagle_dist.evaluate --checkpoint runs/NAME --shards DIR

Checkpoint selection is explicit and never looks at evaluation scores (quirk 16): a run folder
means its newest complete checkpoint ("last"); a ``step-XXXXXXXX`` folder or ``--step N`` means
that step.  A folder without its COMPLETE marker is refused.

Protocol (defaults = official): the checkpoint's ``data.val_resolution`` centre crops (320 in
the official configs; override with ``data.val_resolution=R``), flip test-time augmentation
(``--no-flip``), DenseCRF with the official parameters on the linear log-softmax and on the
cluster probe's log-softmax(alpha x cosine), alpha = ``eval.cluster_alpha`` = 4 (``--no-crf``;
the CRF needs ``pip install 'eagle-dist[crf]'`` and runs in a pool of ``--crf-workers`` CPU
processes per rank), Hungarian matching with the extra clusters.  Scores: cluster and linear
mIoU / accuracy under the ``official`` protocol (pixels predicted as extra clusters dropped)
and the ``strict`` one (every labelled pixel counts), IoU per class, the dropped pixel count.

Every rank evaluates its share of the shards; the confusion matrices are summed; rank 0 writes
to ``--out`` (default ``<run>/eval/step-XXXXXXXX/``):

* ``metrics.json``: all scores, per-class IoU, confusion matrices, protocol, checkpoint;
* ``assignment.json``: the Hungarian cluster -> class table, which ``eagle_dist.cli.predict`` reads
  from this default location to write class ids (``strict`` matching: every cluster may win a
  class; unmatched clusters have -1);
* ``confusion_cluster.png``, ``confusion_linear.png`` (class names on the columns),
  ``samples.png`` (image / ground truth / linear / cluster prediction, clusters mapped to
  classes by the Hungarian table, unmatched clusters black).

MLflow: when ``--tracking-uri``, ``tracking.uri`` of the run, ``$MLFLOW_TRACKING_URI`` or the
run's own ``<run>/mlflow.db`` gives a store, the same metrics and files are logged to a new
run, nested under the training run (tag ``mlflow.parentRunId``) when the checkpoint carries
its MLflow run id.  ``--no-mlflow`` skips it.  The files on disk are written first, so an
MLflow failure only costs a warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from eagle_dist.evaluation.inference import EvaluateError, LoadedModel, open_checkpoint

# --------------------------------------------------------------------------- report


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def build_report(result, loaded: LoadedModel, selection: str, shards: str, protocol: dict, wall_s: float) -> dict:
    """Everything ``metrics.json`` holds (plain JSON types; NaN becomes null)."""
    scores = result.scores()
    cluster, linear = result.cluster, result.linear
    return {
        "checkpoint": {
            "path": str(loaded.step_dir.resolve()),
            "step": loaded.step,
            "selected": selection,
            "run_dir": str(loaded.run_dir.resolve()),
            "mlflow_parent_run_id": (loaded.state.get("extra") or {}).get("mlflow_run_id"),
        },
        "shards": str(Path(shards).resolve()),
        "images": result.n_images,
        "protocol": protocol,
        "metrics": {name: {"mIoU": _finite(s["mIoU"]), "accuracy": _finite(s["Accuracy"])}
                    for name, s in scores.items()},
        "per_class_iou": result.per_class_iou(),
        "pixels": {
            "labelled": cluster.labelled_pixels,
            "dropped_official_cluster": cluster.dropped_official,
            "dropped_official_cluster_fraction": cluster.dropped_official / max(cluster.labelled_pixels, 1),
            "dropped_official_linear": linear.dropped_official,
        },
        "class_names": list(result.class_names),
        "assignment": result.assignment(),
        "confusion": {"cluster": cluster.table.cpu().tolist(), "linear": linear.table.cpu().tolist(),
                      "layout": "rows = predictions (last row: out of range), columns = classes"},
        "wall_s": wall_s,
    }


def format_report(report: dict) -> str:
    """The metrics table and per-class IoU as printed at the end."""
    m = report["metrics"]

    def cell(name: str, key: str) -> str:
        value = m.get(name, {}).get(key)
        return f"{value:8.2f}" if value is not None else "       -"

    p = report["protocol"]
    ck = report["checkpoint"]
    lines = [
        f"checkpoint {ck['path']} (step {ck['step']}, selected: {ck['selected']}); {report['images']} images",
        f"protocol: {p['resolution']}x{p['resolution']} centre crops, flip={p['flip']}, crf={p['crf']}, "
        f"cluster alpha={p['cluster_alpha']}, world size {p['world_size']}",
        f"{'':<14}{'official':>16}{'strict':>16}",
        f"{'probe':<14}{'mIoU':>8}{'acc':>8}{'mIoU':>8}{'acc':>8}",
    ]
    for probe in ("cluster", "linear"):
        lines.append(f"{probe:<14}{cell(probe + '_official', 'mIoU')}{cell(probe + '_official', 'accuracy')}"
                     f"{cell(probe + '_strict', 'mIoU')}{cell(probe + '_strict', 'accuracy')}")
    px = report["pixels"]
    lines.append(f"official protocol dropped {px['dropped_official_cluster']} of {px['labelled']} labelled pixels "
                 f"({100 * px['dropped_official_cluster_fraction']:.2f} %, predicted as extra clusters)")
    iou = report["per_class_iou"]
    width = max(12, *(len(n) for n in report["class_names"])) + 2
    lines.append("")
    lines.append(f"{'IoU per class':<{width}}{'cluster/off':>12}{'cluster/str':>12}{'linear':>12}")
    for name in report["class_names"]:
        row = [iou["cluster_official"][name], iou["cluster_strict"][name], iou["linear_strict"][name]]
        lines.append(f"{name:<{width}}" + "".join(f"{v:12.2f}" if v is not None else f"{'-':>12}" for v in row))
    return "\n".join(lines)


def write_outputs(result, report: dict, out: Path) -> list[Path]:
    """metrics.json, assignment.json and the PNG figures in `out`."""
    from eagle_dist.evaluation import figures

    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "metrics.json"
    path.write_text(json.dumps(report, indent=1))
    written.append(path)
    assignment = dict(report["assignment"], checkpoint=report["checkpoint"], protocol=report["protocol"])
    path = out / "assignment.json"
    path.write_text(json.dumps(assignment, indent=1))
    written.append(path)

    names = list(result.class_names)
    strict_map = report["assignment"]["strict"]
    order, pred_names = figures.cluster_order(strict_map, names)
    counts = result.cluster.counts.cpu().numpy()
    written.append(figures.confusion_png(counts[order], names, out / "confusion_cluster.png", pred_names=pred_names,
                                         title="cluster probe (clusters matched to classes, strict)"))
    written.append(figures.confusion_png(result.linear.counts.cpu().numpy(), names, out / "confusion_linear.png",
                                         title="linear probe"))
    written.append(figures.iou_bars_png(report["per_class_iou"], out / "iou_per_class.png"))
    if result.samples:
        samples = [dict(s, cluster_class=figures.clusters_to_classes(s["cluster"], strict_map)) for s in result.samples]
        written.append(figures.sample_grid_png(samples, out / "samples.png", names))
    return written


# --------------------------------------------------------------------------- MLflow


def tracking_uri_for(loaded: LoadedModel, explicit: str | None) -> str | None:
    """--tracking-uri, the run's tracking.uri, $MLFLOW_TRACKING_URI, or the run's own sqlite store."""
    from eagle_dist.engine.tracking import default_uri, env_uri

    uri = explicit or loaded.cfg.tracking.uri or env_uri()
    if uri:
        return uri
    if (loaded.run_dir / "mlflow.db").is_file():
        return default_uri(loaded.run_dir)
    return None


def evaluation_metrics(report: dict) -> dict[str, float]:
    """The scalars of `report` as MLflow metrics: scores, pixel counts, per-class IoU."""
    values = {f"eval/{name}_{key}": v for name, s in report["metrics"].items() for key, v in s.items()}
    values["eval/official_dropped_pixels"] = report["pixels"]["dropped_official_cluster"]
    values["eval/labelled_pixels"] = report["pixels"]["labelled"]
    for probe_name, per_class in report["per_class_iou"].items():
        for i, v in enumerate(per_class.values()):
            values[f"iou/{probe_name}/{i:03d}"] = v  # class names may hold characters MLflow refuses
    return {k: v for k, v in values.items() if v is not None}


def log_to_mlflow(uri: str, report: dict, files: list[Path], experiment: str) -> str | None:
    """A (nested) MLflow run with the scalars, per-class IoU and files; its id, None if MLflow failed.

    Through engine.tracking (the one MLflow client): an unreachable store or an MLflow error
    costs one warning, the files on disk are already written.
    """
    from eagle_dist.engine.tracking import MlflowTracker

    ck = report["checkpoint"]
    tracker = MlflowTracker(files[0].parent, uri=uri, experiment=experiment, job="evaluation")
    try:
        tracker.start(
            run_name=f"eval-step-{ck['step']:08d}",
            params={"protocol": report["protocol"], "checkpoint": ck, "shards": report["shards"]},
            parent_run_id=ck.get("mlflow_parent_run_id"),
            tags={"eagle_dist.kind": "evaluation", "eagle_dist.checkpoint": ck["path"]},
        )
        tracker.log_metrics(evaluation_metrics(report), step=int(ck["step"]))
        for path in files:
            tracker.log_artifact(path)
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close()
    return None if tracker.failed else tracker.run_id


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eagle_dist.evaluate",
        description="Evaluate an eagle-dist checkpoint with the official protocol (flip TTA + DenseCRF, "
                    "Hungarian matching), official and strict scores.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="run folder (newest complete checkpoint), a step-XXXXXXXX folder, or an "
                             "official EAGLE .ckpt file")
    parser.add_argument("--step", type=int, default=None, help="evaluate this step of the run folder")
    parser.add_argument("--shards", default=None, help="validation shard folder (default: the run's data.val_shards)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/eval/step-XXXXXXXX)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                        help="flip test-time augmentation (default: on, official)")
    parser.add_argument("--crf", action=argparse.BooleanOptionalAction, default=True,
                        help="DenseCRF refinement (default: on, official; needs eagle-dist[crf])")
    parser.add_argument("--crf-workers", type=int, default=None,
                        help="CRF processes per rank (default: cores / ranks on this node; 0 = in-process)")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch threads per rank (default: cores / ranks on this node)")
    parser.add_argument("--samples", type=int, default=6, help="images in samples.png (default 6)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (see the module docstring)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the checkpoint's config, e.g. data.val_resolution=320 "
                             "data.val_batch_size=8 data.num_workers=2 eval.cluster_alpha=4 eval.max_batches=10")
    args = parser.parse_args(argv)
    for text in args.overrides:
        if "=" not in text:
            parser.error(f"'{text}' is not a key=value override")
    return args


def main(argv: list[str] | None = None) -> int:
    from eagle_dist import distributed as dist_mod
    from eagle_dist.errors import EagleError
    from eagle_dist.evaluation.crf import CRFPool, require
    from eagle_dist.evaluation.loop import evaluate_stream

    args = parse_args(argv)
    # Plain DDP process group: nothing is trained, so DeepSpeed would have nothing to shard (a
    # DeepSpeed accelerate config is refused by setup() with a message naming a DDP config).
    d = dist_mod.setup(strategy="ddp", mixed_precision="no", cpu_threads=args.cpu_threads)
    pool = None
    try:
        if args.crf:
            require()
        loaded, selection = open_checkpoint(args.checkpoint, args.step, d.device, args.overrides, quiet=not d.is_main)
        step_dir = loaded.step_dir
        cfg = loaded.cfg
        if cfg.model.unlabeled:
            raise EvaluateError(
                f"{step_dir} was trained without labels (model.n_classes=0): there are no classes to score "
                f"it against. Its training run already reports the label-free measures (segment shares, "
                f"EiCue agreement: {loaded.run_dir}/metrics.jsonl and figures/); for segment maps run "
                f"`python -m eagle_dist.predict --checkpoint {loaded.run_dir} --input IMAGES --out OUT`")
        shards = args.shards or cfg.data.val_shards
        if args.crf:
            workers = args.crf_workers if args.crf_workers is not None else dist_mod.cpu_threads_for(d.local_world_size)
            pool = CRFPool(workers)
        protocol = {
            "resolution": cfg.data.val_resolution,
            "centre_crop": "shorter side -> resolution (nearest), centre crop",
            "flip": bool(args.flip),
            "crf": bool(args.crf),
            "crf_params": None,
            "cluster_alpha": cfg.eval.cluster_alpha if args.crf else None,
            "matching": "Hungarian, maximising matched pixels, with extra clusters",
            "n_classes": cfg.model.n_classes,
            "extra_clusters": cfg.model.extra_clusters,
            "max_batches": cfg.eval.max_batches,
            "batch_size_per_rank": cfg.data.val_batch_size,
            "world_size": d.world_size,
        }
        if args.crf:
            from eagle_dist.evaluation.crf import PARAMS

            protocol["crf_params"] = PARAMS
        t0 = time.perf_counter()
        result = evaluate_stream(
            loaded.backbone, loaded.heads, d, cfg.data, dataclasses.replace(cfg.eval, flip=bool(args.flip)),
            n_samples=args.samples, shards=shards, crf_pool=pool, seed=cfg.train.seed, eicue_samples=False,
        )
        wall = time.perf_counter() - t0
        if d.is_main:
            report = build_report(result, loaded, selection, shards, protocol, wall)
            out = Path(args.out) if args.out else loaded.eval_dir
            files = write_outputs(result, report, out)
            print(format_report(report))
            print(f"wrote {', '.join(p.name for p in files)} to {out}  ({wall:.1f} s)")
            uri = None if args.no_mlflow else tracking_uri_for(loaded, args.tracking_uri)
            if uri:
                run_id = log_to_mlflow(uri, report, files, cfg.tracking.experiment)
                if run_id:
                    parent = report["checkpoint"]["mlflow_parent_run_id"]
                    print(f"MLflow: run {run_id}" + (f" (child of {parent})" if parent else "") + f" in {uri}")
        return 0
    except EagleError as err:  # CRFUnavailableError, EvaluateError, CheckpointError ...
        if d.is_main:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if pool is not None:
            pool.close()
        d.cleanup()


if __name__ == "__main__":
    sys.exit(main())
