"""``python -m lens_fast.eval``: score referring segmentation by the LISA protocol (cIoU, gIoU, boxes).

    python -m lens_fast.eval --data synthetic --split val --baseline largest
    python -m lens_fast.eval --data synthetic --split val --predictions preds.json
    python -m lens_fast.eval --data synthetic --split val --checkpoint DIR --batch-size 16 --vis 8
    python -m lens_fast.eval --data refcoco --data-root ROOT --dataset refcoco --split val --predictions preds.json
    python -m lens_fast.eval --data hf --data-root DIR_OR_NAME --dataset refcoco --split val --predictions preds.json

A predictions file is a JSON list with one entry per sentence::

    {"sent_id": 123, "segmentation": {"size": [h, w], "counts": "<COCO RLE string>"},
     "bbox": [x1, y1, x2, y2],   # optional, pixels
     "text": "..."}              # optional, the model's answer, shown by --vis

(synthetic data: sent_id = sample index; the lmms-lab and Seg-Zero forms of ``--data hf``: the sentence's
position in the split, see ``lens_fast.data.hf``). The run prints a table and writes ``metrics.json`` (cIoU and
gIoU as fractions in [0, 1], counts, box IoU and Acc@0.5 when any entry has a bbox) into --output-dir.

Policy, reported in the table and in metrics.json:
- a sentence of the split without a prediction ("missing") counts as failed: IoU 0;
- an entry whose segmentation is not a valid RLE of the image's size ("invalid") counts as failed;
  its bbox is scored on its own, a malformed bbox counts as no box (box IoU 0);
- the same sent_id twice in the file is an error: nothing is scored;
- sent_ids that are not sentences of the split ("unknown") are ignored, with a warning; sentences
  beyond --limit are ignored silently;
- a missing or corrupt image: a warning, and its samples count as failed (IoU 0) whatever the
  predictions say, so that a predictions file, a baseline and a model all score the same samples;
- --data hf: a row whose annotation is unusable is an error naming the row (nothing is written), or
  with --skip-bad-rows left out and counted ("bad_rows"); rows the form cannot represent (lmms-lab's
  multi-part and crowd objects) are always left out and counted ("excluded"), never scored.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lens_fast import ops, rle
from lens_fast.data.hf import BadRowError
from lens_fast.data.sample import ImageLoadError, RefSample, mask_to_box
from lens_fast.data.synthetic import DEFAULT_SIZES as SYNTHETIC_SIZES
from lens_fast.data.synthetic import SyntheticRefDataset, predict_largest_object
from lens_fast.metrics import EMPTY_UNION_POLICIES, ReferringMetrics
from lens_fast.vis import render_overlay

PREDICTIONS_FORMAT = (
    'expected a JSON list of {"sent_id": int, "segmentation": {"size": [h, w], "counts": str}, '
    '"bbox": [x1, y1, x2, y2] (optional), "text": str (optional)}'
)
WARNINGS_SHOWN = 5  # per kind; the rest are counted


def load_predictions(path: Path) -> Dict[int, dict]:
    """The entries of a predictions file by sent_id. FileNotFoundError / ValueError with the reason;
    a sent_id given twice is an error (which entry to score would be a guess)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}\n{PREDICTIONS_FORMAT}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {PREDICTIONS_FORMAT}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds a JSON {type(entries).__name__}; {PREDICTIONS_FORMAT}")
    by_id: Dict[int, dict] = {}
    duplicates = set()
    for k, entry in enumerate(entries):
        sent_id = entry.get("sent_id") if isinstance(entry, dict) else None
        if isinstance(sent_id, bool) or not isinstance(sent_id, int):
            raise ValueError(f"{path}: entry {k} has no integer sent_id ({str(entry)[:80]}); {PREDICTIONS_FORMAT}")
        if sent_id in by_id:
            duplicates.add(sent_id)
        by_id.setdefault(sent_id, entry)
    if duplicates:
        shown = sorted(duplicates)[:10]
        raise ValueError(
            f"{path}: {len(duplicates)} sent_id(s) appear more than once, e.g. {shown}; "
            "each sentence must be predicted exactly once"
        )
    return by_id


def parse_mask(entry: Mapping, height: int, width: int) -> np.ndarray:
    """bool [H, W] mask of a prediction entry's COCO RLE; ValueError saying what is wrong."""
    segmentation = entry.get("segmentation")
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ValueError('"segmentation" must be a COCO RLE {"size": [h, w], "counts": str}')
    size = segmentation["size"]
    if not isinstance(size, list) or len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in size):
        raise ValueError(f'"segmentation" size must be [h, w] ints, got {size!r}')
    if tuple(size) != (height, width):
        raise ValueError(f"segmentation size {size} differs from the image size [{height}, {width}]")
    counts = segmentation["counts"]
    if not isinstance(counts, (str, bytes, list)):
        raise ValueError(f'"segmentation" counts must be a string (or a list of run lengths), got {type(counts).__name__}')
    try:
        mask = rle.decode_masks([segmentation])[0]
    except (ValueError, TypeError) as error:
        raise ValueError(f"segmentation does not decode: {error}") from None
    return mask.view(torch.bool).numpy()


def parse_box(entry: Mapping) -> Optional[np.ndarray]:
    """float32 [4] xyxy of a prediction entry's "bbox", None when absent; ValueError if malformed."""
    box = entry.get("bbox")
    if box is None:
        return None
    if (
        not isinstance(box, list)
        or len(box) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in box)
    ):
        raise ValueError(f'"bbox" must be [x1, y1, x2, y2] finite numbers, got {str(box)[:80]}')
    return np.asarray(box, dtype=np.float32)


def encode_prediction(sent_id: int, mask: np.ndarray, text: Optional[str] = None) -> dict:
    """A predictions-file entry for a bool [H, W] mask: COCO RLE (str counts) and its xyxy box."""
    encoded = rle.encode_masks(mask[None])[0]
    counts = encoded["counts"]
    entry = {
        "sent_id": int(sent_id),
        "segmentation": {
            "size": [int(v) for v in encoded["size"]],
            "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
        },
        "bbox": [float(v) for v in mask_to_box(mask)],
    }
    if text is not None:
        entry["text"] = text
    return entry


def model_predictor(model, dataset, indices: Sequence[int], batch_size: int = 8) -> Callable[[RefSample], Optional[dict]]:
    """A LensModel (lens_fast.model) as a predictor, run ``batch_size`` samples at a time (greedy):
    asked for one sample, it segments that sample and the next ones of ``indices`` together and keeps
    their entries (mask as RLE, the policy's box in original pixels, its text) for when they are asked for."""
    order = {dataset.sent_ids[i]: k for k, i in enumerate(indices)}
    made: Dict[int, dict] = {}

    def predict(sample: RefSample) -> Optional[dict]:
        if sample.sent_id not in made:
            start = order[sample.sent_id]
            batch = [sample]
            for index in indices[start + 1 : start + batch_size]:
                try:
                    other = dataset[index]
                except (ImageLoadError, BadRowError):
                    continue  # evaluate() reports it when it gets there
                if other.sent_id not in made:
                    batch.append(other)
            results = model.segment([s.image for s in batch], [s.expression for s in batch], batch_size=batch_size)
            for s, result in zip(batch, results):
                entry = encode_prediction(s.sent_id, result.mask, result.text)
                if result.box is None:
                    del entry["bbox"]  # no box in the answer: scored as a missing box
                else:
                    entry["bbox"] = [float(v) for v in result.box]
                made[s.sent_id] = entry
        return made.pop(sample.sent_id)

    return predict


def largest_object_predictor(sample: RefSample) -> dict:
    """The "largest object" baseline as a predictor: it looks at the image only, never at the GT."""
    return encode_prediction(sample.sent_id, predict_largest_object(sample.image))


@dataclass
class EvalResult:
    """Metrics (see ``ReferringMetrics.compute`` plus failure counts) and the predictions made."""

    metrics: Dict[str, object]
    predictions: List[dict] = field(default_factory=list)
    warnings: Dict[str, List[str]] = field(default_factory=dict)


def evaluate(
    dataset,
    predict: Callable[[RefSample], Optional[dict]],
    indices: Sequence[int],
    *,
    empty_union_iou: float = 1.0,
    vis: int = 0,
    vis_dir: Optional[Path] = None,
    keep_predictions: bool = False,
    progress: bool = True,
    skip_bad_rows: bool = False,
) -> EvalResult:
    """Score ``predict`` (sample with image -> predictions-file entry, or None if it has none) on
    ``dataset[i]`` for ``i`` in ``indices``, by the policy of this module. The first ``vis`` samples
    with a readable image are drawn into ``vis_dir``. A BadRowError propagates unless ``skip_bad_rows``
    (then the sample is not scored and is counted in "bad_rows")."""
    metrics = ReferringMetrics(empty_union_iou)
    warnings: Dict[str, List[str]] = defaultdict(list)
    counts = {"missing": 0, "invalid": 0, "image_errors": 0, "invalid_boxes": 0, "bad_rows": 0}
    pred_boxes, gt_boxes, box_present = [], [], []
    any_box = False
    made: List[dict] = []
    failed_images = set()
    drawn = 0
    for index in tqdm(indices, desc="eval", unit="sample", disable=None if progress else True, leave=False):
        try:
            try:
                sample = dataset[index]
            except ImageLoadError as error:
                sample = dataset.target(index)
                counts["image_errors"] += 1
                if str(error) not in failed_images:
                    failed_images.add(str(error))
                    warnings["image"].append(f"{error}: its samples count as failed (IoU 0)")
        except BadRowError as error:
            if not skip_bad_rows:
                raise
            counts["bad_rows"] += 1
            warnings["bad_row"].append(f"{error}: left out (--skip-bad-rows)")
            continue
        entry = predict(sample) if sample.image is not None else None
        if keep_predictions and entry is not None:
            made.append(entry)
        gt = sample.mask
        pred_mask, pred_box, status = None, None, "ok"
        if sample.image is None:
            status = "image error"
        elif entry is None:
            status = "missing"
            counts["missing"] += 1
        else:
            try:
                pred_mask = parse_mask(entry, sample.height, sample.width)
            except ValueError as error:
                status = "invalid"
                counts["invalid"] += 1
                warnings["invalid"].append(f"sent_id {sample.sent_id}: {error}; counted as failed (IoU 0)")
            any_box = any_box or "bbox" in entry
            try:
                pred_box = parse_box(entry)
            except ValueError as error:
                counts["invalid_boxes"] += 1
                warnings["invalid_box"].append(f"sent_id {sample.sent_id}: {error}; counted as no box")
        if pred_mask is None:
            metrics.add_failed(int(np.count_nonzero(gt)))
            iou = 0.0
        else:
            stats = ops.mask_stats(torch.from_numpy(pred_mask)[None], torch.from_numpy(gt))
            iou = float(metrics.update(stats)[0])
        box_present.append(pred_box is not None)
        pred_boxes.append(pred_box if pred_box is not None else np.zeros(4, dtype=np.float32))
        gt_boxes.append(np.asarray(sample.box, dtype=np.float32))
        if drawn < vis and sample.image is not None and vis_dir is not None:
            caption = [f"sent_id {sample.sent_id}   mask IoU {iou:.3f}" + ("" if status == "ok" else f"   ({status})")]
            if entry is not None and isinstance(entry.get("text"), str):
                caption.append(f"model: {entry['text']}")
            picture = render_overlay(sample.image, gt, pred_mask, sample.expression, sample.box, pred_box, caption)
            vis_dir.mkdir(parents=True, exist_ok=True)
            picture.save(vis_dir / f"{drawn:04d}_sent{sample.sent_id}.png")
            drawn += 1
    if any_box:
        metrics.update_boxes(
            torch.from_numpy(np.stack(pred_boxes)),
            torch.from_numpy(np.stack(gt_boxes)),
            present=torch.tensor(box_present, dtype=torch.bool),
        )
    result = metrics.compute()
    result.update(counts)
    return EvalResult(result, made, dict(warnings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lens_fast.eval",
        description="Score referring-segmentation predictions by the LISA protocol (cIoU, gIoU, box IoU).",
        epilog="Policy, " + __doc__.split("Policy, ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", choices=("synthetic", "refcoco", "hf"), required=True,
        help="which data to score on: synthetic, refcoco (the refer files) or hf (a Hugging Face form of RefCOCO/+/g)",
    )
    parser.add_argument("--split", default="val", help="split: synthetic train/val/test; refcoco val/testA/testB...")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, metavar="PATH", help="predictions JSON to score")
    source.add_argument(
        "--baseline", choices=("largest",), help="'largest': predict the largest object from the image (synthetic)"
    )
    source.add_argument("--checkpoint", type=Path, metavar="DIR", help="run a LENS checkpoint (LensModel.save_pretrained)")
    model = parser.add_argument_group("model (--checkpoint)")
    model.add_argument("--batch-size", type=int, default=8, metavar="N", help="samples per model call (default 8)")
    model.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--write-predictions", type=Path, metavar="PATH", help="write the predictions made to PATH")
    parser.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="where metrics.json and vis/ go (default: beside the predictions file, else ./eval-output/<data>-<split>)",
    )
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N samples")
    parser.add_argument("--vis", type=int, default=0, metavar="N", help="draw N overlay PNGs into <output-dir>/vis")
    parser.add_argument(
        "--empty-union-iou", type=float, choices=sorted(EMPTY_UNION_POLICIES), default=1.0,
        help="per-sample IoU when prediction and GT are both empty: 1 (LISA, default) or 0 (Seg-Zero)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    refcoco = parser.add_argument_group("refcoco / hf data")
    refcoco.add_argument(
        "--data-root", type=Path, metavar="ROOT",
        help="refcoco: holds <dataset>/refs(<split_by>).p, instances.json; hf: a save_to_disk or parquet directory, "
        "or a hub name in the datasets cache (jxu124/refcoco, lmms-lab/RefCOCO, Seg-Zero's parquet)",
    )
    refcoco.add_argument("--dataset", choices=("refcoco", "refcoco+", "refcocog"), default="refcoco")
    refcoco.add_argument("--split-by", help="refs file variant (default: unc for refcoco/refcoco+, umd for refcocog)")
    refcoco.add_argument(
        "--image-root", type=Path,
        help="COCO train2014 images (refcoco default: ROOT/images/mscoco/images/train2014; hf: needed by the jxu124 form)",
    )
    refcoco.add_argument(
        "--skip-bad-rows", action="store_true",
        help="hf: leave out and count rows whose annotation is unusable instead of stopping with an error naming the row",
    )
    synthetic = parser.add_argument_group("synthetic data")
    synthetic.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    synthetic.add_argument(
        "--size", type=int, help=f"samples in the split (default {', '.join(f'{k} {v}' for k, v in SYNTHETIC_SIZES.items())})"
    )
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data in ("refcoco", "hf") and args.data_root is None:
        parser.error(f"--data {args.data} needs --data-root {'ROOT' if args.data == 'refcoco' else 'DIR_OR_NAME'}")
    if args.skip_bad_rows and args.data != "hf":
        parser.error("--skip-bad-rows applies to --data hf")
    if args.baseline == "largest" and args.data != "synthetic":
        parser.error(
            "--baseline largest segments saturated objects on a grey background (the synthetic data); "
            "it means nothing on photographs: use --data synthetic"
        )
    if args.write_predictions is not None and args.predictions is not None:
        parser.error("--write-predictions writes the predictions a run makes; with --predictions there are none")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    for name in ("limit", "vis", "size"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name} must be >= 0, got {value}")


def _build_dataset(args: argparse.Namespace):
    if args.data == "synthetic":
        return SyntheticRefDataset(args.split, size=args.size, seed=args.seed)
    from lens_fast.data.build import build_ref_dataset

    return build_ref_dataset(
        args.data, args.data_root, args.dataset, args.split, mode="eval", split_by=args.split_by,
        image_root=args.image_root, skip_bad_rows=args.skip_bad_rows,
    )


def _describe_run(args: argparse.Namespace, dataset) -> Dict[str, object]:
    run: Dict[str, object] = {"data": args.data, "split": args.split}
    if args.data == "refcoco":
        run.update(dataset=args.dataset, split_by=dataset.split_by, data_root=str(args.data_root))
    elif args.data == "hf":
        run.update(dataset=args.dataset, form=dataset.form, source_split=dataset.source_split,
                   data_root=str(args.data_root), excluded=dict(dataset.excluded))
    else:
        run.update(seed=args.seed, size=len(dataset))
    run.update(
        predictions=str(args.predictions) if args.predictions else None, baseline=args.baseline, limit=args.limit,
        checkpoint=str(args.checkpoint) if args.checkpoint else None,
    )
    return run


def _table(metrics: Mapping[str, object], run: Mapping[str, object], id_counts: Mapping[str, int]) -> str:
    name = f"{run['data']}" + (f" {run['dataset']} ({run['split_by']})" if run["data"] == "refcoco" else "")
    if run["data"] == "hf":
        name += f" {run['dataset']} ({run['form']} form)"
    if run.get("checkpoint"):
        source = f"checkpoint {run['checkpoint']}"
    elif run["predictions"]:
        source = f"predictions {run['predictions']}"
    else:
        source = f"baseline '{run['baseline']}'"
    rows = [
        ("cIoU", f"{100 * metrics['cIoU']:.2f} %"),
        ("gIoU", f"{100 * metrics['gIoU']:.2f} %"),
    ]
    if "box_IoU" in metrics:
        rows += [("box IoU", f"{100 * metrics['box_IoU']:.2f} %"), ("box Acc@0.5", f"{100 * metrics['box_Acc@0.5']:.2f} %")]
    failed = metrics["failed"]
    rows += [
        ("samples", f"{metrics['samples']}"),
        (
            "failed (IoU 0)",
            f"{failed}  (missing {metrics['missing']}, invalid {metrics['invalid']}, "
            f"image errors {metrics['image_errors']})",
        ),
    ]
    if metrics["bad_rows"]:
        rows.append(("bad rows", f"{metrics['bad_rows']}  (left out, --skip-bad-rows)"))
    if run.get("excluded"):
        rows.append(("rows left out", ", ".join(f"{k} {v}" for k, v in run["excluded"].items()) + "  (not scored)"))
    if id_counts["unknown"]:
        rows.append(("unknown ids", f"{id_counts['unknown']}  (ignored)"))
    if id_counts["beyond_limit"]:
        rows.append(("beyond --limit", f"{id_counts['beyond_limit']}  (ignored)"))
    policy = metrics["empty_union_iou"]
    rows.append(("empty-union IoU", f"{policy:.0f}  ({EMPTY_UNION_POLICIES[policy]})"))
    width = max(len(k) for k, _ in rows)
    lines = [f"lens_fast.eval: {name} {run['split']}, {source}", f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join(lines)


def _print_warnings(warnings: Mapping[str, Sequence[str]]) -> None:
    for messages in warnings.values():
        for message in messages[:WARNINGS_SHOWN]:
            print(f"warning: {message}", file=sys.stderr)
        if len(messages) > WARNINGS_SHOWN:
            print(f"warning: ... and {len(messages) - WARNINGS_SHOWN} more like these", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        dataset = _build_dataset(args)
        predictions = load_predictions(args.predictions) if args.predictions is not None else None
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    sent_ids = dataset.sent_ids
    count = len(sent_ids) if args.limit is None else min(args.limit, len(sent_ids))
    if count == 0:
        print(f"error: nothing to score: {args.data} {args.split} has {len(sent_ids)} samples, --limit {args.limit}", file=sys.stderr)
        return 2
    id_counts = {"unknown": 0, "beyond_limit": 0}
    warnings: Dict[str, List[str]] = {"data": list(getattr(dataset, "notes", []))}
    if predictions is not None:
        scored = set(sent_ids[:count])
        known = set(sent_ids)
        unknown = sorted(set(predictions) - known)
        id_counts = {"unknown": len(unknown), "beyond_limit": len(set(predictions) & (known - scored))}
        if unknown:
            warnings["unknown"] = [
                f"{len(unknown)} prediction(s) with sent_ids that are not sentences of {args.data} {args.split} "
                f"were ignored, e.g. {unknown[:10]}"
            ]
        missing = [s for s in sent_ids[:count] if s not in predictions]
        if missing:
            warnings["missing"] = [
                f"{len(missing)} sentence(s) have no prediction and count as failed (IoU 0), e.g. {missing[:10]}"
            ]
        predict: Callable[[RefSample], Optional[dict]] = lambda sample: predictions.get(sample.sent_id)  # noqa: E731
    elif args.checkpoint is not None:
        from lens_fast.model import LensModel  # the model stack (transformers) only when a model runs

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            model = LensModel.from_pretrained(args.checkpoint, device=device).eval()
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        predict = model_predictor(model, dataset, list(range(count)), args.batch_size)
    else:
        predict = largest_object_predictor

    if args.output_dir is not None:
        output_dir = args.output_dir
    elif args.predictions is not None:
        output_dir = args.predictions.parent
    elif args.write_predictions is not None:
        output_dir = args.write_predictions.parent
    else:
        output_dir = Path("eval-output") / f"{args.data}-{args.split}"
    try:
        result = evaluate(
            dataset,
            predict,
            range(count),
            empty_union_iou=args.empty_union_iou,
            vis=args.vis,
            vis_dir=output_dir / "vis",
            keep_predictions=args.write_predictions is not None,
            progress=not args.no_progress,
            skip_bad_rows=args.skip_bad_rows,
        )
    except BadRowError as error:
        print(f"error: {error}; --skip-bad-rows leaves such rows out", file=sys.stderr)
        return 2
    warnings.update(result.warnings)
    _print_warnings(warnings)

    run = _describe_run(args, dataset)
    metrics = {**result.metrics, **id_counts, **run}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if args.write_predictions is not None:
        args.write_predictions.parent.mkdir(parents=True, exist_ok=True)
        args.write_predictions.write_text(json.dumps(result.predictions))
    print(_table(result.metrics, run, id_counts))
    written = [output_dir / "metrics.json"]
    if args.write_predictions is not None:
        written.append(args.write_predictions)
    if args.vis:
        written.append(output_dir / "vis")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
