"""The refer fixture (refcoco_fixture.py) written in the three Hugging Face forms lens_fast.data.hf reads,
with ``datasets`` itself (its Image feature, its parquet writer), locally: nothing is downloaded.

- jxu124: ``<root>/jxu124/data/<hub split>-00000-of-00001.parquet``, one row per ref (hub split names:
  validation = val, test = testA), or the same as a ``save_to_disk`` DatasetDict in ``<root>/jxu124_disk``;
- lmms: ``<root>/lmms/data/<split>-00000-of-00001.parquet``, one row per ref of val and testA, the image's
  bytes embedded, one flat polygon (the first part; [] for RLE objects);
- segzero: ``<root>/segzero_<split>/data/test-00000-of-00001.parquet`` (Seg-Zero names every split "test"),
  here one row per sentence so that every refer sample has its twin.
"""
import json
from pathlib import Path

import pytest
from refcoco_fixture import IMAGES, REFS, annotations, build_refcoco_fixture, expected_mask, image_name

datasets = pytest.importorskip("datasets")

HUB_SPLIT = {"train": "train", "val": "validation", "testA": "test"}


def _image_bytes(root, image_id):
    return (Path(root) / "images" / "mscoco" / "images" / "train2014" / image_name(image_id)).read_bytes()


def jxu124_rows(split):
    anns = annotations()
    rows = []
    for ref_id, ann_id, ref_split, sentences in REFS:
        if ref_split != split:
            continue
        ann = dict(anns[ann_id], id=ann_id, category_id=1)
        image_id = ann["image_id"]
        h, w = IMAGES[image_id]
        x, y, bw, bh = ann["bbox"]
        rows.append(dict(
            sent_ids=[s for s, _ in sentences],
            file_name=f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
            ann_id=ann_id, ref_id=ref_id, image_id=image_id, split=ref_split,
            sentences=[dict(raw=t.capitalize(), sent=t, sent_id=s, tokens=t.split()) for s, t in sentences],
            category_id=1,
            raw_anns=json.dumps(ann),
            raw_image_info=json.dumps(dict(file_name=image_name(image_id), height=h, width=w, id=image_id)),
            raw_sentences=json.dumps([dict(sent_id=s, sent=t) for s, t in sentences]),
            image_path=f"coco/train2014/{image_name(image_id)}",
            bbox=[float(x), float(y), float(x + bw), float(y + bh)],  # xyxy, as the hub's rows hold it
            captions=[t for _, t in sentences],
        ))
    return rows


def build_jxu124(root):
    """``(parquet dir, save_to_disk dir)`` of the fixture's refs in the jxu124 form."""
    root = Path(root)
    splits = {hub: datasets.Dataset.from_list(jxu124_rows(split)) for split, hub in HUB_SPLIT.items()}
    for hub, ds in splits.items():
        (root / "jxu124" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "jxu124" / "data" / f"{hub}-00000-of-00001.parquet"))
    datasets.DatasetDict(splits).save_to_disk(str(root / "jxu124_disk"))
    return root / "jxu124", root / "jxu124_disk"


def lmms_rows(root, split):
    anns = annotations()
    rows = []
    for ref_id, ann_id, ref_split, sentences in REFS:
        if ref_split != split:
            continue
        ann = anns[ann_id]
        seg = ann["segmentation"]
        rows.append(dict(
            question_id=str(ann_id),
            image={"bytes": _image_bytes(root, ann["image_id"]), "path": None},
            question="Provide a short description for this region.",
            answer=[t for _, t in sentences],
            segmentation=[float(v) for v in seg[0]] if isinstance(seg, list) else [],
            bbox=[float(v) for v in ann["bbox"]],
            iscrowd=int(ann.get("iscrowd", 0)),
            file_name=image_name(ann["image_id"]),
        ))
    return rows


def lmms_features():
    return datasets.Features({
        "question_id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Sequence(datasets.Value("string")), "segmentation": datasets.Sequence(datasets.Value("float32")),
        "bbox": datasets.Sequence(datasets.Value("float32")), "iscrowd": datasets.Value("int8"),
        "file_name": datasets.Value("string"),
    })


def write_lmms(root, split, rows):
    folder = Path(root) / "lmms" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=lmms_features()).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return Path(root) / "lmms"


def build_lmms(root):
    for split in ("val", "testA"):
        write_lmms(root, split, lmms_rows(root, split))
    return Path(root) / "lmms"


def segzero_rows(root, split):
    anns = annotations()
    rows = []
    for _, ann_id, ref_split, sentences in REFS:
        if ref_split != split:
            continue
        ann = anns[ann_id]
        h, w = IMAGES[ann["image_id"]]
        x, y, bw, bh = ann["bbox"]
        for _, text in sentences:
            rows.append(dict(
                image={"bytes": _image_bytes(root, ann["image_id"]), "path": None},
                text=text, mask=expected_mask(ann_id).tolist(), image_id=str(ann["image_id"]), ann_id=str(ann_id),
                img_height=h, img_width=w, bbox=[x, y, x + bw, y + bh],
            ))
    return rows


def write_segzero(root, split, rows):
    features = datasets.Features({
        "image": datasets.Image(), "text": datasets.Value("string"),
        "mask": datasets.Sequence(datasets.Sequence(datasets.Value("bool"))), "image_id": datasets.Value("string"),
        "ann_id": datasets.Value("string"), "img_height": datasets.Value("int32"), "img_width": datasets.Value("int32"),
        "bbox": datasets.Sequence(datasets.Value("int32")),
    })
    folder = Path(root) / f"segzero_{split}" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    return folder.parent


def build_all(root):
    """The refer fixture plus every form; returns a dict of their paths."""
    build_refcoco_fixture(root)
    parquet, disk = build_jxu124(root)
    return dict(
        refer=Path(root), jxu124=parquet, jxu124_disk=disk, lmms=build_lmms(root),
        segzero_val=write_segzero(root, "val", segzero_rows(root, "val")),
        image_root=Path(root) / "images" / "mscoco" / "images" / "train2014",
    )
