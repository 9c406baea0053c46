"""``python -m lens_fast.segment``: segment one image with a trained LENS checkpoint.

    python -m lens_fast.segment --checkpoint DIR IMAGE "the red circle" [--out overlay.png] [--json out.json]

Prints the policy's answer and its box (xyxy pixels of IMAGE), writes an overlay PNG (``--out``) and a
JSON record with the mask as COCO RLE (``--json``; without it the record is printed). DIR is a
checkpoint written by ``LensModel.save_pretrained`` (``python -m lens_fast.train`` writes them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

NEEDS_CHECKPOINT = (
    "a trained checkpoint is needed: --checkpoint DIR, a directory written by LensModel.save_pretrained.\n"
    "`python -m lens_fast.train` writes one (see its --help); a model with random weights would only draw noise,\n"
    "so lens_fast.segment does not run without one."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lens_fast.segment",
        description="Segment one image with a trained LENS checkpoint: print the answer and its box, write an "
        "overlay PNG (--out) and the mask as COCO RLE (--json).",
        epilog="DIR is a checkpoint written by LensModel.save_pretrained; `python -m lens_fast.train` writes them.",
    )
    parser.add_argument("image", type=Path, help="image file (any format PIL reads; grey/RGBA/palette become RGB)")
    parser.add_argument("expression", help='the referring expression, e.g. "the red circle"')
    parser.add_argument("--checkpoint", type=Path, metavar="DIR", help="trained LENS checkpoint (LensModel.save_pretrained)")
    parser.add_argument("--out", type=Path, metavar="PNG", help="write an overlay picture here")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write text, box, score and the mask's COCO RLE here")
    parser.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length cap (default: the checkpoint's)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.checkpoint is None:
        print(f"error: {NEEDS_CHECKPOINT}", file=sys.stderr)
        return 2
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    import numpy as np
    import torch

    from lens_fast import rle
    from lens_fast.model import LensModel
    from lens_fast.model.image_processing import load_image
    from lens_fast.vis import render_overlay

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        image = load_image(args.image, str(args.image))
        model = LensModel.from_pretrained(args.checkpoint, device=device).eval()
        (result,) = model.segment([image], [args.expression], max_new_tokens=args.max_new_tokens)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    box = None if result.box is None else [round(float(v), 2) for v in result.box]
    encoded = rle.encode_masks(result.mask[None])[0]
    counts = encoded["counts"]
    record = {
        "image": str(args.image),
        "expression": args.expression,
        "text": result.text,
        "box": box,
        "score": result.score,
        "segmentation": {"size": [int(v) for v in encoded["size"]],
                         "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts},
    }
    print(f"answer: {result.text}")
    print(f"box: {box if box is not None else 'none (the answer holds no box)'}")
    print(f"mask: {int(result.mask.sum())} of {result.mask.size} pixels, SAM score {result.score:.3f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        picture = render_overlay(image, np.zeros(result.mask.shape, dtype=bool), result.mask, args.expression,
                                 pred_box=result.box, caption=["(no ground truth)", f"model: {result.text}"])
        picture.save(args.out)
        print(f"wrote {args.out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    else:
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
