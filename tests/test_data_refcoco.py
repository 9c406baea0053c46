"""RefCOCO-family loader on a fixture in the standard layout (see refcoco_fixture.py)."""
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from refcoco_fixture import IMAGES, REFS, annotations, build_refcoco_fixture, expected_mask, image_name, image_pixels

from lens_fast.data import ImageLoadError, RefSample, collate_samples
from lens_fast.data.refcoco import RefCocoDataset, annotation_mask, default_image_root, load_refs


# pycocotools, the reference here, trips a numpy 2 deprecation inside its own decode.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

@pytest.fixture
def root(tmp_path):
    return build_refcoco_fixture(tmp_path)


def test_eval_mode_one_sample_per_sentence(root):
    ds = RefCocoDataset(root, "refcoco", "val")
    assert len(ds) == 6
    assert ds.sent_ids == [100, 101, 102, 103, 104, 105]
    anns = annotations()
    texts = {s: t for _, _, _, sentences in REFS for s, t in sentences}
    ann_of_sent = {s: a for _, a, _, sentences in REFS for s, _ in sentences}
    for i in range(len(ds)):
        sample = ds[i]
        assert isinstance(sample, RefSample)
        ann_id = ann_of_sent[sample.sent_id]
        image_id = anns[ann_id]["image_id"]
        assert sample.expression == texts[sample.sent_id]
        assert sample.image_id == image_id and sample.file_name == image_name(image_id)
        assert sample.mask.dtype == bool and np.array_equal(sample.mask, expected_mask(ann_id))
        x, y, w, h = anns[ann_id]["bbox"]
        assert sample.box.dtype == np.float32 and sample.box.tolist() == [x, y, x + w, y + h]
        assert sample.image.dtype == np.uint8 and sample.image.shape == (*IMAGES[image_id], 3)
        # JPEG at quality 95: close to what was written.
        assert np.abs(sample.image.astype(int) - image_pixels(image_id)).mean() < 4
        annotation_only = ds.target(i)
        assert annotation_only.image is None and annotation_only.sent_id == sample.sent_id
        assert np.array_equal(annotation_only.mask, sample.mask)


def test_every_annotation_kind_decodes_like_pycocotools(root):
    for ann_id, ann in annotations().items():
        h, w = IMAGES[ann["image_id"]]
        mask = annotation_mask(ann["segmentation"], h, w)
        assert mask.shape == (h, w) and mask.any()
        assert np.array_equal(mask, expected_mask(ann_id)), ann_id
    assert not annotation_mask([], 5, 7).any()
    multi = expected_mask(12)
    first_part_only = annotation_mask([annotations()[12]["segmentation"][0]], *IMAGES[1])
    assert multi.sum() > first_part_only.sum() > 0  # several polygons are one object: the union


def test_train_mode_one_sample_per_ref_with_a_random_sentence(root):
    ds = RefCocoDataset(root, "refcoco", "train", mode="train")
    assert len(ds) == 2
    with pytest.raises(ValueError, match="mode='eval' only"):
        ds.sent_ids
    torch.manual_seed(0)
    draws = [ds[0] for _ in range(60)]
    seen = Counter((s.sent_id, s.expression) for s in draws)
    assert set(seen) == {(107, "first"), (108, "second"), (109, "third")}
    torch.manual_seed(0)
    assert [ds[0].sent_id for _ in range(60)] == [s.sent_id for s in draws]
    assert ds[1].sent_id == 110 and ds[1].ref_id == 5


def test_other_splits_datasets_and_image_root(root, tmp_path):
    assert RefCocoDataset(root, "refcoco", "testA").sent_ids == [106]
    build_refcoco_fixture(root, dataset="refcocog", split_by="umd")
    assert len(RefCocoDataset(root, "refcocog", "val")) == 6  # refs(umd).p by default
    build_refcoco_fixture(root, dataset="refcoco+", split_by="unc")
    assert len(RefCocoDataset(root, "refcoco+", "val")) == 6
    moved = tmp_path / "elsewhere"
    default_image_root(root).rename(moved)
    ds = RefCocoDataset(root, "refcoco", "val", image_root=moved)
    assert ds[0].image.shape == (*IMAGES[1], 3)


def test_missing_files_name_the_path_and_the_layout(root, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        RefCocoDataset(root, "refcocog", "val")
    message = str(info.value)
    assert f"refs file not found: {root / 'refcocog' / 'refs(umd).p'}" in message
    assert "expected the standard refer layout" in message and "instances.json" in message
    (root / "refcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances file not found: .*instances.json"):
        RefCocoDataset(root, "refcoco", "val")
    build_refcoco_fixture(root)
    with pytest.raises(FileNotFoundError, match="image root not found: .*nowhere"):
        RefCocoDataset(root, "refcoco", "val", image_root=tmp_path / "nowhere")


def test_bad_arguments_and_files(root):
    with pytest.raises(ValueError, match=r"split 'testB' has no refs in .*; its splits are \['testA', 'train', 'val'\]"):
        RefCocoDataset(root, "refcoco", "testB")
    with pytest.raises(ValueError, match="dataset must be one of"):
        RefCocoDataset(root, "coco", "val")
    with pytest.raises(ValueError, match="mode must be one of"):
        RefCocoDataset(root, "refcoco", "val", mode="test")
    refs_path = root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps(Counter(a=1)))  # a pickle that needs a class to load
    with pytest.raises(ValueError, match="is not a refs pickle: .*refusing to load collections.Counter"):
        load_refs(refs_path)
    refs_path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="is not a refs pickle"):
        RefCocoDataset(root, "refcoco", "val")


def test_missing_corrupt_or_wrong_size_images_raise_image_load_error(root):
    image_root = default_image_root(root)
    (image_root / image_name(1)).unlink()
    (image_root / image_name(2)).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    from PIL import Image

    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(image_root / image_name(3))
    ds = RefCocoDataset(root, "refcoco", "val")
    with pytest.raises(ImageLoadError, match=f"cannot read image .*{image_name(1)}"):
        ds[0]
    with pytest.raises(ImageLoadError, match=f"cannot read image .*{image_name(2)}"):
        ds[4]
    assert ds.target(0).mask.any()  # annotations stay usable without the image
    testa = RefCocoDataset(root, "refcoco", "testA")
    with pytest.raises(ImageLoadError, match=r"is 5x5 \(HxW\); its annotation says 16x28"):
        testa[0]


def test_dataloader_collates_samples(root):
    ds = RefCocoDataset(root, "refcoco", "val")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_samples)))
    assert batch.sent_ids.tolist() == [100, 101, 102]
    assert [tuple(m.shape) for m in batch.masks] == [IMAGES[1]] * 3
    assert batch.boxes[0].tolist() == [2, 2, 12, 10]
