"""``python -m lens_fast.eval`` end to end: metrics.json values, the sent_id policy, bad files, --vis."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

coco_mask = pytest.importorskip("pycocotools.mask")  # the reference RLE of the predictions
from refcoco_fixture import REFS, build_refcoco_fixture, expected_mask, image_name

from lens_fast.data import SyntheticRefDataset, mask_to_box, predict_largest_object
from lens_fast.data.refcoco import default_image_root
from lens_fast.eval import main

# pycocotools, the reference here, trips a numpy 2 deprecation inside its own decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LIMIT = 24


def entry(sent_id, mask, box=None, **extra):
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    e = {"sent_id": sent_id, "segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()}}
    if box is not None:
        e["bbox"] = [float(v) for v in box]
    e.update(extra)
    return e


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def metrics_of(directory):
    return json.loads((Path(directory) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def synthetic_val():
    ds = SyntheticRefDataset("val")
    return [ds[i] for i in range(LIMIT)]


def test_largest_baseline_values_predictions_and_vis(tmp_path, capsys, synthetic_val):
    preds_path = tmp_path / "baseline" / "preds.json"
    code, out, err = run(
        ["--data", "synthetic", "--split", "val", "--baseline", "largest", "--limit", LIMIT,
         "--write-predictions", preds_path, "--vis", 3, "--no-progress"],
        capsys,
    )
    assert code == 0, err
    assert "cIoU" in out and "gIoU" in out and "box Acc@0.5" in out
    m = metrics_of(preds_path.parent)  # default output dir: beside the written predictions
    inter = union = 0
    ious, box_ious = [], []
    for sample in synthetic_val:
        pred = predict_largest_object(sample.image)
        i, u = int((pred & sample.mask).sum()), int((pred | sample.mask).sum())
        inter, union = inter + i, union + u
        ious.append(i / u)
        pb, gb = mask_to_box(pred), sample.box
        wi = max(0.0, min(pb[2], gb[2]) - max(pb[0], gb[0]))
        hi = max(0.0, min(pb[3], gb[3]) - max(pb[1], gb[1]))
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        box_ious.append(wi * hi / (area(pb) + area(gb) - wi * hi))
    assert m["samples"] == LIMIT and m["failed"] == 0 and m["baseline"] == "largest"
    assert m["cIoU"] == pytest.approx(inter / union, rel=1e-9)
    assert m["gIoU"] == pytest.approx(np.mean(ious), rel=1e-9)
    assert m["box_IoU"] == pytest.approx(np.mean(box_ious), rel=1e-5)
    assert m["box_Acc@0.5"] == pytest.approx(np.mean(np.array(box_ious) >= 0.5))
    assert m["gIoU"] < 0.6
    written = json.loads(preds_path.read_text())
    assert [e["sent_id"] for e in written] == list(range(LIMIT))
    for e, sample in zip(written, synthetic_val):
        decoded = coco_mask.decode(e["segmentation"]).astype(bool)
        assert np.array_equal(decoded, predict_largest_object(sample.image))
    pngs = sorted((preds_path.parent / "vis").glob("*.png"))
    assert [p.name for p in pngs] == ["0000_sent0.png", "0001_sent1.png", "0002_sent2.png"]
    assert Image.open(pngs[0]).size[0] >= synthetic_val[0].image.shape[1]

    # Scoring the written file gives the same numbers.
    code, _, err = run(["--data", "synthetic", "--predictions", preds_path, "--limit", LIMIT,
                        "--output-dir", tmp_path / "rescored", "--no-progress"], capsys)
    assert code == 0, err
    again = metrics_of(tmp_path / "rescored")
    for key in ("cIoU", "gIoU", "box_IoU", "box_Acc@0.5", "samples", "failed"):
        assert again[key] == pytest.approx(m[key])
    assert again["predictions"] == str(preds_path) and again["baseline"] is None


def test_missing_unknown_beyond_limit_and_invalid_entries(tmp_path, capsys, synthetic_val):
    entries = [entry(s.sent_id, s.mask, s.box) for s in synthetic_val]
    del entries[3], entries[5]  # sent_ids 3 and 6: missing
    entries.append(entry(10**6, synthetic_val[0].mask))  # unknown
    entries.append(entry(LIMIT + 5, synthetic_val[0].mask))  # a val sentence beyond --limit
    entries[0]["segmentation"]["size"] = [1, 1]  # sent 0: wrong size -> invalid
    h, w = synthetic_val[1].mask.shape
    too_long = entry(1, np.ones((h + 9, w + 9), dtype=bool))["segmentation"]["counts"]
    entries[1]["segmentation"]["counts"] = too_long  # sent 1: runs overflow the image -> invalid
    # sent 4: runs that stop short of h * w (pycocotools would return uninitialised pixels) -> invalid
    entries[3]["segmentation"]["counts"] = entry(4, np.ones((2, 2), dtype=bool))["segmentation"]["counts"]
    entries[2]["bbox"] = [0, 0, "x", 1]  # sent 2: good mask, bad box
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps(entries))
    code, out, err = run(["--data", "synthetic", "--predictions", preds, "--limit", LIMIT, "--no-progress"], capsys)
    assert code == 0, err
    m = metrics_of(tmp_path)
    assert (m["missing"], m["invalid"], m["failed"], m["unknown"], m["beyond_limit"]) == (2, 3, 5, 1, 1)
    assert m["invalid_boxes"] == 1 and m["samples"] == LIMIT
    failed = {0, 1, 3, 4, 6}
    assert m["gIoU"] == pytest.approx((LIMIT - len(failed)) / LIMIT)
    hit = sum(int(s.mask.sum()) for s in synthetic_val if s.sent_id not in failed)
    assert m["cIoU"] == pytest.approx(hit / sum(int(s.mask.sum()) for s in synthetic_val))
    # Boxes are scored on their own: perfect where given (sents 0 and 1 too), 0 where missing or bad.
    assert m["box_IoU"] == pytest.approx((LIMIT - 3) / LIMIT)
    assert "2 sentence(s) have no prediction" in err and "[3, 6]" in err
    assert "1 prediction(s) with sent_ids that are not sentences of synthetic val were ignored" in err
    assert "sent_id 0: segmentation size [1, 1] differs from the image size" in err
    assert "sent_id 1: segmentation does not decode" in err and "sent_id 4: segmentation does not decode" in err
    assert 'sent_id 2: "bbox" must be [x1, y1, x2, y2]' in err
    assert "unknown ids" in out and re.search(r"failed \(IoU 0\)\s+5  \(missing 2, invalid 3, image errors 0\)", out)


def test_duplicates_and_malformed_files_are_errors(tmp_path, capsys, synthetic_val):
    s = synthetic_val[0]
    preds = tmp_path / "dup.json"
    preds.write_text(json.dumps([entry(0, s.mask), entry(1, s.mask), entry(0, s.mask)]))
    code, _, err = run(["--data", "synthetic", "--predictions", preds], capsys)
    assert code == 2 and "1 sent_id(s) appear more than once, e.g. [0]" in err
    assert not (tmp_path / "metrics.json").exists()
    for content, message in (
        ("{not json", "is not valid JSON"),
        ('{"sent_id": 0}', "holds a JSON dict"),
        ('[{"segmentation": {}}]', "entry 0 has no integer sent_id"),
    ):
        preds.write_text(content)
        code, _, err = run(["--data", "synthetic", "--predictions", preds], capsys)
        assert code == 2 and message in err and "expected a JSON list" in err
    code, _, err = run(["--data", "synthetic", "--predictions", tmp_path / "nope.json"], capsys)
    assert code == 2 and f"predictions file not found: {tmp_path / 'nope.json'}" in err


def test_empty_union_policy_option(tmp_path, capsys):
    ds = SyntheticRefDataset("val")
    empty = np.zeros(ds[0].mask.shape, dtype=bool)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([entry(0, empty)]))
    for policy in ("1", "0"):
        out_dir = tmp_path / policy
        code, _, err = run(["--data", "synthetic", "--predictions", preds, "--limit", 1,
                            "--empty-union-iou", policy, "--output-dir", out_dir], capsys)
        assert code == 0, err
        assert metrics_of(out_dir)["empty_union_iou"] == float(policy)
    assert metrics_of(tmp_path / "0")["gIoU"] == 0.0  # GT not empty: an empty prediction is IoU 0 either way


@pytest.fixture
def refcoco_root(tmp_path):
    return build_refcoco_fixture(tmp_path / "data")


def _perfect_refcoco_predictions(path, split="val"):
    ann_of_sent = {s: a for _, a, sp, sentences in REFS if sp == split for s, _ in sentences}
    path.write_text(json.dumps([entry(s, expected_mask(a), text=f"answer {s}") for s, a in ann_of_sent.items()]))
    return ann_of_sent


def test_refcoco_scores_and_counts_corrupt_images_as_failed(refcoco_root, tmp_path, capsys):
    preds = tmp_path / "preds.json"
    ann_of_sent = _perfect_refcoco_predictions(preds)
    code, out, err = run(["--data", "refcoco", "--data-root", refcoco_root, "--dataset", "refcoco",
                          "--split", "val", "--predictions", preds, "--vis", 2, "--no-progress"], capsys)
    assert code == 0, err
    m = metrics_of(tmp_path)
    assert m["cIoU"] == m["gIoU"] == 1.0 and m["samples"] == 6 and m["failed"] == 0
    assert "box_IoU" not in m  # no entry had a bbox
    assert (m["dataset"], m["split_by"], m["split"]) == ("refcoco", "unc", "val")
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2

    corrupt = default_image_root(refcoco_root) / image_name(2)  # sentences 104, 105
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, out, err = run(["--data", "refcoco", "--data-root", refcoco_root, "--split", "val",
                          "--predictions", preds, "--output-dir", tmp_path / "corrupt", "--no-progress"], capsys)
    assert code == 0, err
    m = metrics_of(tmp_path / "corrupt")
    assert m["image_errors"] == 2 and m["failed"] == 2 and m["samples"] == 6
    assert m["gIoU"] == pytest.approx(4 / 6)
    areas = {s: int(expected_mask(a).sum()) for s, a in ann_of_sent.items()}
    assert m["cIoU"] == pytest.approx(sum(v for s, v in areas.items() if s not in (104, 105)) / sum(areas.values()))
    assert f"cannot read image {corrupt}" in err and err.count("cannot read image") == 1


def test_missing_data_files_name_the_path_and_layout(tmp_path, capsys):
    preds = tmp_path / "preds.json"
    preds.write_text("[]")
    code, _, err = run(["--data", "refcoco", "--data-root", tmp_path / "empty", "--dataset", "refcocog",
                        "--split", "val", "--predictions", preds], capsys)
    assert code == 2
    assert f"refs file not found: {tmp_path / 'empty' / 'refcocog' / 'refs(umd).p'}" in err
    assert "expected the standard refer layout" in err and "instances.json" in err


def test_argument_errors(tmp_path, capsys):
    for argv, message in (
        (["--data", "refcoco", "--baseline", "largest", "--data-root", tmp_path], "--baseline largest segments"),
        (["--data", "refcoco", "--predictions", "p.json"], "--data refcoco needs --data-root"),
        (["--data", "synthetic", "--predictions", "p.json", "--write-predictions", "q.json"], "--write-predictions"),
        (["--data", "synthetic", "--baseline", "largest", "--limit", "-1"], "--limit must be >= 0"),
        (["--data", "synthetic"], "one of the arguments --predictions --baseline --checkpoint is required"),
    ):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    """The README's command, in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-m", "lens_fast.eval", "--data", "synthetic", "--split", "val", "--baseline", "largest",
         "--limit", "10", "--output-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:lens_fast"},
    )
    assert result.returncode == 0, result.stderr
    assert "lens_fast.eval: synthetic val, baseline 'largest'" in result.stdout
    assert metrics_of(tmp_path)["samples"] == 10
