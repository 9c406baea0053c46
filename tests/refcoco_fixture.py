"""A tiny RefCOCO-style dataset in exactly the standard ``refer`` layout, built by the tests.

    <root>/<dataset>/refs(<split_by>).p, <root>/<dataset>/instances.json,
    <root>/images/mscoco/images/train2014/COCO_train2014_<12-digit id>.jpg

Four images, annotations of every kind COCO uses (one polygon, several polygons, compressed RLE with a
str ``counts``, uncompressed RLE), refs in train / val / testA, sent_ids unique across the file.
Expected masks come from pycocotools directly (the reference), never from the code under test.
"""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

coco_mask = pytest.importorskip("pycocotools.mask")  # writes the fixture's COCO annotations

IMAGES = {1: (24, 32), 2: (20, 20), 3: (16, 28), 4: (18, 22)}  # id -> (height, width)


def image_name(image_id):
    return f"COCO_train2014_{image_id:012d}.jpg"


def _rle_block(height, width, y0, y1, x0, x1):
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    return mask


def annotations():
    """COCO annotations: id -> dict (segmentation, bbox xywh, image_id)."""
    block = _rle_block(*IMAGES[2], 3, 9, 4, 15)
    compressed = coco_mask.encode(block)
    compressed = {"size": compressed["size"], "counts": compressed["counts"].decode("ascii")}
    # Uncompressed RLE (column-major run lengths, starting with zeros) of a 4x5 block in image 3.
    uncompressed_mask = _rle_block(*IMAGES[3], 2, 6, 10, 15)
    flat = uncompressed_mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {
        11: dict(image_id=1, segmentation=[[2, 2, 12, 2, 12, 10, 2, 10]], bbox=[2, 2, 10, 8]),
        12: dict(
            image_id=1,
            segmentation=[[15, 3, 22, 3, 22, 9], [20, 14, 30, 14, 30, 22, 20, 22]],
            bbox=[15, 3, 15, 19],
        ),
        21: dict(image_id=2, segmentation=compressed, bbox=[4, 3, 11, 6]),
        31: dict(image_id=3, segmentation={"size": list(IMAGES[3]), "counts": counts}, bbox=[10, 2, 5, 4], iscrowd=1),
        41: dict(image_id=4, segmentation=[[1, 1, 8, 1, 8, 8, 1, 8]], bbox=[1, 1, 7, 7]),
    }


REFS = [
    # (ref_id, ann_id, split, sentences)
    (0, 11, "val", [(100, "left square"), (101, "the square on the left"), (102, "grey box")]),
    (1, 12, "val", [(103, "two parts")]),
    (2, 21, "val", [(104, "rle block"), (105, "the wide block")]),
    (3, 31, "testA", [(106, "crowd block")]),
    (4, 41, "train", [(107, "first"), (108, "second"), (109, "third")]),
    (5, 12, "train", [(110, "only one")]),
]


def expected_mask(ann_id):
    """bool [H, W] reference mask from pycocotools."""
    ann = annotations()[ann_id]
    h, w = IMAGES[ann["image_id"]]
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        encoded = coco_mask.merge(coco_mask.frPyObjects(segmentation, h, w))
    elif isinstance(segmentation["counts"], list):
        encoded = coco_mask.frPyObjects(segmentation, h, w)
    else:
        encoded = segmentation
    return coco_mask.decode(encoded).astype(bool)


def image_pixels(image_id):
    """Smooth colour ramps (JPEG keeps them within a few levels)."""
    h, w = IMAGES[image_id]
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 200 // w, ys * 200 // h, np.full((h, w), 40 * image_id)], axis=-1).astype(np.uint8)


def build_refcoco_fixture(root, dataset="refcoco", split_by="unc"):
    """Write the fixture under ``root``; returns ``root`` as a Path."""
    root = Path(root)
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    image_root = root / "images" / "mscoco" / "images" / "train2014"
    image_root.mkdir(parents=True, exist_ok=True)
    for image_id in IMAGES:
        Image.fromarray(image_pixels(image_id)).save(image_root / image_name(image_id), quality=95)
    anns = annotations()
    instances = {
        "images": [dict(id=i, file_name=image_name(i), height=h, width=w) for i, (h, w) in IMAGES.items()],
        "annotations": [
            dict(id=a, category_id=1, iscrowd=ann.pop("iscrowd", 0), area=0, **ann) for a, ann in anns.items()
        ],
        "categories": [dict(id=1, name="thing", supercategory="thing")],
    }
    (folder / "instances.json").write_text(json.dumps(instances))
    refs = [
        dict(
            ref_id=ref_id,
            ann_id=ann_id,
            image_id=anns[ann_id]["image_id"],
            split=split,
            category_id=1,
            file_name=f"COCO_train2014_{anns[ann_id]['image_id']:012d}_{ann_id}.jpg",
            sent_ids=[s for s, _ in sentences],
            sentences=[dict(sent_id=s, sent=text, raw=text.capitalize(), tokens=text.split()) for s, text in sentences],
        )
        for ref_id, ann_id, split, sentences in REFS
    ]
    with (folder / f"refs({split_by}).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    return root
