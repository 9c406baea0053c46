"""The Hugging Face forms of RefCOCO (lens_fast.data.hf) against the refer reader on the same refs, the
eval CLI on either form, bad rows, the train-side entry point and the missing-extra error."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
from hf_fixture import build_all, jxu124_rows, lmms_rows, segzero_rows, write_lmms, write_segzero  # noqa: E402
from refcoco_fixture import IMAGES, annotations, image_name  # noqa: E402

from lens_fast import rle  # noqa: E402
from lens_fast.data import (  # noqa: E402
    BadRowError, HfRefDataset, ImageLoadError, RefCocoDataset, build_ref_dataset, build_ref_datasets, collate_samples,
)
from lens_fast.data.hf import detect_form, open_source, segmentation_error  # noqa: E402
from lens_fast.eval import main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("forms"))


def rle_counts(mask):
    return rle.encode_masks(np.asarray(mask, dtype=bool)[None])[0]["counts"]


def assert_same(a, b, ids=True):
    """Two RefSamples of the same sentence: expression, RLE-identical mask, box, pixels (and ids)."""
    assert a.expression == b.expression
    assert a.mask.dtype == bool and a.mask.shape == b.mask.shape and rle_counts(a.mask) == rle_counts(b.mask)
    assert a.box.dtype == np.float32 and a.box.tolist() == b.box.tolist()
    assert a.image_id == b.image_id
    assert np.array_equal(a.image, b.image)
    if ids:
        assert (a.sent_id, a.ref_id, a.file_name) == (b.sent_id, b.ref_id, b.file_name)


@pytest.mark.parametrize("source", ["jxu124", "jxu124_disk"])
@pytest.mark.parametrize("split", ["val", "testA"])
def test_jxu124_equals_refer_sample_for_sample(forms, source, split):
    refer = RefCocoDataset(forms["refer"], "refcoco", split)
    hf = HfRefDataset(forms[source], "refcoco", split, image_root=forms["image_root"])
    assert hf.form == "jxu124" and hf.source_split == {"val": "validation", "testA": "test"}[split]
    assert hf.sent_ids == refer.sent_ids and len(hf) == len(refer)
    for i in range(len(refer)):
        assert_same(hf[i], refer[i])
        assert hf.target(i).image is None and rle_counts(hf.target(i).mask) == rle_counts(refer[i].mask)
    assert any("refer's standard refcoco" in n for n in hf.notes)  # 3 refs is not the standard val


def test_jxu124_train_mode_draws_sentences_like_refer(forms):
    refer = RefCocoDataset(forms["refer"], "refcoco", "train", mode="train")
    hf = HfRefDataset(forms["jxu124"], "refcoco", "train", image_root=forms["image_root"], mode="train")
    assert len(hf) == len(refer) == 2
    torch.manual_seed(0)
    drawn = [hf[0].sent_id for _ in range(30)]
    torch.manual_seed(0)
    assert drawn == [refer[0].sent_id for _ in range(30)] and set(drawn) == {107, 108, 109}
    with pytest.raises(ValueError, match="mode='eval' only"):
        hf.sent_ids
    batch = collate_samples([hf[1]])
    assert batch.sent_ids.tolist() == [110] and batch.ref_ids.tolist() == [5]


def test_lmms_keeps_one_polygon_objects_and_counts_the_rest(forms):
    refer = RefCocoDataset(forms["refer"], "refcoco", "val")
    hf = HfRefDataset(forms["lmms"], "refcoco", "val")
    # ref 0 (one polygon) is kept; ref 1 (two polygons) and ref 2 (an RLE) cannot be one flat polygon.
    assert hf.form == "lmms" and dict(hf.excluded) == {"multipart": 1, "not_polygon": 1}
    assert hf.sent_ids == [0, 1, 2]  # positions among the split's sentences
    assert any("cannot hold 1 multi-part object(s) and 1 crowd/RLE" in n for n in hf.notes)
    for i in range(3):
        assert_same(hf[i], refer[i], ids=False)
        assert hf[i].ref_id == 0 and hf[i].file_name == image_name(1)
    with pytest.raises(ValueError, match=r"no usable samples for split 'testA' \(excluded: \{'not_polygon': 1\}\)"):
        HfRefDataset(forms["lmms"], "refcoco", "testA")  # its only ref is a crowd RLE


def test_segzero_rows_equal_refer_samples(forms):
    refer = RefCocoDataset(forms["refer"], "refcoco", "val")
    hf = HfRefDataset(forms["segzero_val"], "refcoco", "val")
    assert hf.form == "segzero" and hf.source_split == "test" and hf.sent_ids == list(range(6))
    assert any("read the source's split 'test' for 'val'" in n for n in hf.notes)
    for i in range(len(refer)):
        assert_same(hf[i], refer[i], ids=False)
        assert hf[i].ref_id == i


def _predictions(samples, sent_ids, path):
    """The same imperfect masks (GT shifted one column right) keyed by each form's sent_ids."""
    entries = []
    for sample, sent_id in zip(samples, sent_ids):
        mask = np.roll(sample.mask, 1, axis=1)
        encoded = rle.encode_masks(mask[None])[0]
        counts = encoded["counts"]
        entries.append({"sent_id": sent_id, "segmentation": {"size": [int(v) for v in encoded["size"]],
                        "counts": counts.decode() if isinstance(counts, bytes) else counts}})
    path.write_text(json.dumps(entries))
    return path


def _eval(argv, capsys):
    code = main([str(a) for a in argv] + ["--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.mark.parametrize("form", ["jxu124", "jxu124_disk", "lmms", "segzero_val"])
def test_eval_gives_identical_metrics_from_either_form(forms, form, tmp_path, capsys):
    refer = RefCocoDataset(forms["refer"], "refcoco", "val")
    hf = HfRefDataset(forms[form], "refcoco", "val", image_root=forms["image_root"] if "jxu124" in form else None)
    samples = [refer[i] for i in range(len(hf))]  # lmms: refer's first 3 samples are its 3 kept ones
    limit = ["--limit", len(hf)]
    _eval(["--data", "refcoco", "--data-root", forms["refer"], "--split", "val", *limit, "--output-dir", tmp_path / "a",
           "--predictions", _predictions(samples, refer.sent_ids, tmp_path / "refer.json")], capsys)
    image_root = ["--image-root", forms["image_root"]] if "jxu124" in form else []
    out, err = _eval(["--data", "hf", "--data-root", forms[form], "--dataset", "refcoco", "--split", "val", *image_root,
                      "--output-dir", tmp_path / "b", "--predictions", _predictions(samples, hf.sent_ids, tmp_path / "hf.json")],
                     capsys)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert 0 < a["gIoU"] < 1 and a["samples"] == len(hf)
    for key in ("cIoU", "gIoU", "samples", "failed", "missing", "invalid"):
        assert b[key] == a[key], key
    assert b["form"] == hf.form and b["excluded"] == dict(hf.excluded)
    assert f"hf refcoco ({hf.form} form)" in out
    if form == "lmms":
        assert "rows left out" in out and "multipart 1, not_polygon 1" in out and "multi-part" in err


def test_bad_polygon_is_an_error_naming_the_row_or_skipped(forms, tmp_path, capsys):
    rows = lmms_rows(forms["refer"], "val")
    rows[2]["segmentation"] = [4.0, 3.0, 15.0, 3.0, 15.0]  # an odd number of coordinates
    source = write_lmms(tmp_path, "val", rows)
    with pytest.raises(BadRowError, match=r"row 2 of .*lmms \[val\] \(val-00000-of-00001.parquet row 2\): segmentation: a polygon must be a flat list"):
        HfRefDataset(source, "refcoco", "val")
    code = main(["--data", "hf", "--data-root", str(source), "--split", "val", "--predictions", str(tmp_path / "p.json")])
    assert code == 2 and "row 2 of" in capsys.readouterr().err
    skipped = HfRefDataset(source, "refcoco", "val", skip_bad_rows=True)
    assert dict(skipped.excluded) == {"multipart": 1, "bad_row": 1} and list(skipped.bad_rows) == [2]
    assert skipped.sent_ids == [0, 1, 2] and any("1 bad row(s) left out" in n and "row 2 of" in n for n in skipped.notes)


def test_rows_across_files_and_row_groups(forms, tmp_path):
    """A split over two parquet files of one-row groups reads the same samples and names rows by file."""
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(next((forms["lmms"] / "data").glob("val-*.parquet")))
    (tmp_path / "data").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "data" / "val-00000-of-00002.parquet", row_group_size=1)
    pq.write_table(table.slice(2), tmp_path / "data" / "val-00001-of-00002.parquet", row_group_size=1)
    split = open_source(tmp_path)["val"]
    assert len(split) == 3 and len(split.parts) == 3
    assert split.describe(2).endswith("(val-00001-of-00002.parquet row 0)")
    whole, parts = HfRefDataset(forms["lmms"], "refcoco", "val"), HfRefDataset(tmp_path, "refcoco", "val")
    assert parts.sent_ids == whole.sent_ids and dict(parts.excluded) == dict(whole.excluded)
    for i in range(len(whole)):
        assert_same(parts[i], whole[i])


def test_jxu124_bad_annotations_are_found_up_front(forms, tmp_path):
    rows = jxu124_rows("val")
    ann = json.loads(rows[1]["raw_anns"])
    ann["segmentation"][1] = [20, 14, 30]  # a polygon of 1.5 points
    rows[1]["raw_anns"] = json.dumps(ann)
    rows[2]["raw_image_info"] = "{not json"
    (tmp_path / "bad" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad" / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(BadRowError, match=r"row 1 of .*: a polygon must be a flat list .* got 3"):
        HfRefDataset(tmp_path / "bad", "refcoco", "val", image_root=forms["image_root"])
    ds = HfRefDataset(tmp_path / "bad", "refcoco", "val", image_root=forms["image_root"], skip_bad_rows=True)
    assert ds.sent_ids == [100, 101, 102] and sorted(ds.bad_rows) == [1, 2] and "unusable" in ds.bad_rows[2]
    for ann_id, a in annotations().items():
        assert segmentation_error(a["segmentation"], *IMAGES[a["image_id"]]) is None, ann_id
    assert "RLE size [5, 5]" in segmentation_error({"size": [5, 5], "counts": "x"}, 20, 20)


def test_corrupt_image_and_bad_mask_name_the_row(forms, tmp_path, capsys):
    rows = segzero_rows(forms["refer"], "val")
    rows[1]["image"] = {"bytes": b"\xff\xd8\xff\xe0 truncated", "path": None}
    rows[4]["mask"] = rows[4]["mask"][:-1]  # one row of pixels short
    source = write_segzero(tmp_path, "val", rows)
    ds = HfRefDataset(source, "refcoco", "val")
    with pytest.raises(ImageLoadError, match=r"cannot read image row 1 of .*test-00000-of-00001.parquet"):
        ds[1]
    with pytest.raises(BadRowError, match=r"row 4 of .*: mask must be 20x20 bools"):
        ds.target(4)
    preds = _predictions([RefCocoDataset(forms["refer"], "refcoco", "val")[i] for i in range(6)], range(6), tmp_path / "p.json")
    code = main(["--data", "hf", "--data-root", str(source), "--split", "val", "--predictions", str(preds), "--no-progress",
                 "--output-dir", str(tmp_path / "stop")])
    assert code == 2 and "row 4 of" in capsys.readouterr().err and not (tmp_path / "stop" / "metrics.json").exists()
    out, err = _eval(["--data", "hf", "--data-root", source, "--split", "val", "--predictions", preds, "--skip-bad-rows",
                      "--output-dir", tmp_path / "skip"], capsys)
    m = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert (m["bad_rows"], m["image_errors"], m["samples"], m["failed"]) == (1, 1, 5, 1)
    assert "bad rows" in out and "row 4 of" in err and "cannot read image row 1 of" in err


def test_train_mode_skips_bad_rows_and_records_them(forms, tmp_path):
    image_root = tmp_path / "train2014"
    shutil.copytree(forms["image_root"], image_root)
    (image_root / image_name(4)).unlink()  # ref 4's image (train row 0)
    strict = HfRefDataset(forms["jxu124"], "refcoco", "train", image_root=image_root, mode="train")
    with pytest.raises(ImageLoadError, match=rf"cannot read image .*{image_name(4)} \(row 0 of "):
        strict[0]
    lenient = HfRefDataset(forms["jxu124"], "refcoco", "train", image_root=image_root, mode="train", skip_bad_rows=True)
    assert lenient[0].ref_id == 5 and list(lenient.bad_rows) == [0]  # row 1 stands in
    assert lenient[1].ref_id == 5


def test_build_ref_datasets_for_both_readers(forms):
    for data, root, image_root in (("refcoco", forms["refer"], None), ("hf", forms["jxu124"], forms["image_root"])):
        train, val = build_ref_datasets(data, root, "refcoco", "val", image_root=image_root)
        assert (len(train), train.mode, val.mode, val.sent_ids) == (2, "train", "eval", [100, 101, 102, 103, 104, 105])
    with pytest.raises(ValueError, match="an evaluation set; train from the jxu124 form"):
        build_ref_datasets("hf", forms["lmms"], "refcoco", "val")
    with pytest.raises(ValueError, match="skip_bad_rows applies to data 'hf'"):
        build_ref_dataset("refcoco", forms["refer"], "refcoco", "val", skip_bad_rows=True)
    with pytest.raises(ValueError, match="data must be one of"):
        build_ref_dataset("coco", forms["refer"], "refcoco", "val")


def test_sources_splits_and_forms_errors(forms, tmp_path):
    assert sorted(open_source(forms["jxu124"])) == ["test", "train", "validation"]
    with pytest.raises(ValueError, match=r"split column holds \['testA'\], not 'test'"):
        HfRefDataset(forms["jxu124"], "refcoco", "test", image_root=forms["image_root"])  # hub "test" is testA
    with pytest.raises(ValueError, match=r"has no split 'testB' .*its splits are \['test', 'train', 'validation'\]"):
        HfRefDataset(forms["jxu124"], "refcoco", "testB", image_root=forms["image_root"])
    with pytest.raises(FileNotFoundError, match="image_root must be the COCO train2014 folder"):
        HfRefDataset(forms["jxu124"], "refcoco", "val")
    with pytest.raises(FileNotFoundError, match="holds no parquet files"):
        open_source(tmp_path)
    with pytest.raises(ValueError, match=r"none of the known forms \(jxu124: ref_id"):
        detect_form(["image", "caption"], "x.parquet")


def test_missing_extra_is_named(forms, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"need the 'data' extra: pip install -e \"\.\[data\]\""):
        open_source(forms["lmms"])
    code = main(["--data", "hf", "--data-root", str(forms["jxu124_disk"]), "--split", "val", "--predictions", "p.json"])
    assert code == 2 and "pip install -e \".[data]\"" in capsys.readouterr().err


def test_the_trainer_trains_and_validates_on_the_jxu124_form(forms, tmp_path):
    """``python -m lens_fast.train --data hf``: the trainer's datasets are the Hugging Face form's, and a short
    run of both stages validates on its val split."""
    from lens_fast import train
    from lens_fast.training.config import TrainConfig

    options = dict(data="hf", data_root=str(forms["jxu124"]), image_root=str(forms["image_root"]), dataset="refcoco")
    train_set, val_set, full = train.build_datasets(TrainConfig(**options))
    assert isinstance(train_set, HfRefDataset) and isinstance(val_set, HfRefDataset) and full is None
    assert (train_set.mode, val_set.mode, val_set.sent_ids) == ("train", "eval", [100, 101, 102, 103, 104, 105])
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    code = train.main([*argv, "--output-dir", str(tmp_path), "--stage1-steps", "2", "--stage2-steps", "1", "--val-size", "6",
                       "--val-batch-size", "6", "--stage1-batch-size", "2", "--batch-size", "2", "--num-generations", "2",
                       "--max-new-tokens", "8", "--progress", "false"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [v["after"] for v in summary["val"]] == ["start", "stage1", "stage2"]
