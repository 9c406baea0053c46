"""Synthetic referring segmentation: determinism, disjoint splits, unique referents, exact masks."""
import hashlib
import re

import numpy as np
import pytest
import torch

from lens_fast.data import RefBatch, SyntheticConfig, SyntheticRefDataset, collate_samples, predict_largest_object
from lens_fast.data.synthetic import COLOURS, SHAPES

N = 150  # samples per check: enough for every kind and shape, quick on two cores


@pytest.fixture(scope="module")
def val():
    return SyntheticRefDataset("val", size=N, seed=0)


@pytest.fixture(scope="module")
def val_scenes(val):
    return [val.scene(i) for i in range(N)]


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = (SyntheticRefDataset("train", size=20, seed=s) for s in (7, 7, 8))
    for i in (0, 5, 19):
        x, y, z = a[i], b[i], c[i]
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert x.expression == y.expression and np.array_equal(x.box, y.box)
        assert not (x.image.shape == z.image.shape and np.array_equal(x.image, z.image))
    # Random access order does not matter.
    assert np.array_equal(a[3].image, SyntheticRefDataset("train", size=20, seed=7)[3].image)
    assert a[-1].sent_id == 19 and np.array_equal(a[-1].image, a[19].image)


def test_splits_never_share_a_scene():
    def digests(split):
        ds = SyntheticRefDataset(split, size=120, seed=0)
        images = (ds[i].image for i in range(len(ds)))
        return {hashlib.sha1(str(im.shape).encode() + im.tobytes()).hexdigest() for im in images}

    train, val, test = digests("train"), digests("val"), digests("test")
    assert len(train) == len(val) == len(test) == 120
    assert not (train & val) and not (train & test) and not (val & test)


def test_sizes_and_aspect_ratios_vary(val):
    shapes = [val[i].image.shape for i in range(60)]
    heights = {h for h, _, _ in shapes}
    widths = {w for _, w, _ in shapes}
    aspects = [w / h for h, w, _ in shapes]
    assert len(heights) > 20 and len(widths) > 20
    assert min(aspects) < 0.75 and max(aspects) > 1.33
    config = SyntheticConfig()
    assert all(config.min_side <= s <= config.max_side * config.max_aspect for h, w, _ in shapes for s in (h, w))


def _props(mask):
    ys, xs = np.nonzero(mask)
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return dict(cx=(x1 + x2) / 2, cy=(y1 + y2) / 2, w=x2 - x1, h=y2 - y1, area=mask.sum())


NOUN = rf"(?:(?P<{{p}}colour>{'|'.join(COLOURS)}) )?(?P<{{p}}shape>{'|'.join(SHAPES)}|object)"
GRAMMAR = [
    ("size", re.compile(rf"the (?P<word>biggest|largest|smallest) {NOUN.format(p='')}$")),
    ("position", re.compile(rf"the (?P<word>leftmost|rightmost|topmost|bottommost) {NOUN.format(p='')}$")),
    (
        "relation",
        re.compile(rf"the {NOUN.format(p='')} (?P<word>left of|right of|above|below) the {NOUN.format(p='a_')}$"),
    ),
    ("attribute", re.compile(rf"the {NOUN.format(p='')}$")),
]


def _matching(objects, colour, shape):
    return [
        i for i, o in enumerate(objects)
        if (colour is None or o.colour == colour) and (shape == "object" or o.shape == shape)
    ]


def _resolve(expression, objects):
    """An independent reading of an expression: the indices of every object it could mean."""
    for kind, pattern in GRAMMAR:
        m = pattern.match(expression)
        if m:
            break
    else:
        raise AssertionError(f"expression outside the grammar: {expression!r}")
    props = [_props(o.mask) for o in objects]
    group = _matching(objects, m["colour"], m["shape"])
    if kind == "attribute":
        return kind, group
    word = m["word"]
    if kind == "size":
        areas = {i: props[i]["area"] for i in group}
        best = (min if word == "smallest" else max)(group, key=areas.get)
        rivals = [a for i, a in areas.items() if i != best]
        # Only a clear winner counts: 1.5x (or 1/1.5x) the area of every rival.
        if word == "smallest":
            clear = all(1.5 * areas[best] <= a for a in rivals)
        else:
            clear = all(areas[best] >= 1.5 * a for a in rivals)
        return kind, [best] if clear and len(group) >= 2 else group
    if kind == "position":
        axis, sign = {"leftmost": ("cx", 1), "rightmost": ("cx", -1), "topmost": ("cy", 1), "bottommost": ("cy", -1)}[word]
        best = min(group, key=lambda i: sign * props[i][axis])
        return kind, [best] if len(group) >= 2 else group
    anchors = _matching(objects, m["a_colour"], m["a_shape"])
    assert len(anchors) == 1, f"anchor of {expression!r} is not unique: {anchors}"
    a = props[anchors[0]]
    offset = {
        "left of": lambda p: a["cx"] - p["cx"],
        "right of": lambda p: p["cx"] - a["cx"],
        "above": lambda p: a["cy"] - p["cy"],
        "below": lambda p: p["cy"] - a["cy"],
    }[word]
    return kind, [i for i in group if i != anchors[0] and offset(props[i]) > 0]


def test_every_expression_picks_out_exactly_its_target(val_scenes):
    kinds = {}
    for scene in val_scenes:
        kind, referents = _resolve(scene.expression, scene.objects)
        assert kind == scene.kind, scene.expression
        assert referents == [scene.target], (scene.expression, referents, scene.target)
        kinds[kind] = kinds.get(kind, 0) + 1
        # Every listed alternative is valid too, not just the one drawn.
        for alternatives in scene.candidates.values():
            for text in alternatives:
                assert _resolve(text, scene.objects)[1] == [scene.target], text
    assert set(kinds) == {"attribute", "size", "position", "relation"}
    assert all(count >= 0.08 * len(val_scenes) for count in kinds.values()), kinds


def test_expression_kinds_can_be_restricted():
    config = SyntheticConfig(kinds=("attribute", "size"))
    ds = SyntheticRefDataset("train", size=40, seed=1, config=config)
    scenes = [ds.scene(i) for i in range(40)]
    assert {s.kind for s in scenes} == {"attribute", "size"}
    for scene in scenes:
        assert set(scene.candidates) == {"attribute", "size"}
        assert _resolve(scene.expression, scene.objects)[1] == [scene.target]
    with pytest.raises(ValueError, match="kinds must be distinct names from"):
        SyntheticConfig(kinds=("colour",))


def test_masks_boxes_and_pixels_agree(val, val_scenes):
    seen_shapes, seen_counts = set(), set()
    for i, scene in enumerate(val_scenes):
        sample = val[i]
        h, w, _ = sample.image.shape
        assert sample.image.dtype == np.uint8 and sample.mask.dtype == bool and sample.mask.shape == (h, w)
        assert np.array_equal(sample.mask, scene.objects[scene.target].mask)
        assert sample.expression == scene.expression and sample.sent_id == i
        assert 2 <= len(scene.objects) <= 5
        seen_counts.add(len(scene.objects))
        covered = np.zeros((h, w), dtype=np.int32)
        for obj in scene.objects:
            seen_shapes.add(obj.shape)
            covered += obj.mask
            p = _props(obj.mask)
            x1, y1 = p["cx"] - p["w"] / 2, p["cy"] - p["h"] / 2
            assert np.array_equal(obj.box, [x1, y1, x1 + p["w"], y1 + p["h"]]) and obj.box.dtype == np.float32
            assert obj.area == p["area"] >= 10
            # The visible pixels carry the object's colour (jitter +-12, noise std 3).
            mean = sample.image[obj.mask].astype(np.float64).mean(axis=0)
            assert np.abs(mean - COLOURS[obj.colour]).max() < 16, (obj.colour, mean)
        assert covered.max() <= 1, "visible masks must not overlap"
        assert np.array_equal(sample.box, scene.objects[scene.target].box)
        # The background is nearly grey: objects are the saturated pixels.
        bg = sample.image[covered == 0].astype(np.float64)
        saturation = (bg.max(axis=1) - bg.min(axis=1)) / np.maximum(bg.max(axis=1), 1)
        assert np.quantile(saturation, 0.999) < 0.45
    assert seen_shapes == set(SHAPES)
    assert seen_counts == {2, 3, 4, 5}


def test_occlusion_happens_and_leaves_every_object_mostly_visible(val_scenes):
    fractions = [o.area / o.drawn_area for scene in val_scenes for o in scene.objects]
    assert min(fractions) >= SyntheticConfig().min_visible
    assert sum(f < 0.97 for f in fractions) >= 10
    assert all(scene.objects[-1].area == scene.objects[-1].drawn_area for scene in val_scenes)  # on top


def test_largest_object_baseline_is_far_from_solving_it(val, val_scenes):
    ious, ious_when_largest = [], []
    for i, scene in enumerate(val_scenes):
        sample = val[i]
        pred = predict_largest_object(sample.image)
        iou = (pred & sample.mask).sum() / (pred | sample.mask).sum()
        ious.append(iou)
        if max(o.area for o in scene.objects) == scene.objects[scene.target].area:
            ious_when_largest.append(iou)
    giou = float(np.mean(ious))
    print(f"largest-object baseline gIoU on {len(ious)} val samples: {giou:.3f}")
    assert 0.1 < giou < 0.5
    # The baseline itself works: when the referent is the largest object it usually finds it.
    assert np.median(ious_when_largest) > 0.8 and len(ious_when_largest) >= 20


def test_largest_object_baseline_edges():
    grey = np.full((9, 11, 3), 120, dtype=np.uint8)
    assert not predict_largest_object(grey).any()
    image = grey.copy()
    image[2:7, 3:9] = COLOURS["red"]
    image[0, 0] = COLOURS["blue"]  # one pixel: below min_pixels
    expected = np.zeros((9, 11), dtype=bool)
    expected[2:7, 3:9] = True
    assert np.array_equal(predict_largest_object(image), expected)
    with pytest.raises(ValueError, match=r"image must be a uint8 numpy array \[H, W, 3\], got float32"):
        predict_largest_object(image.astype(np.float32))


def test_collate_for_a_dataloader():
    ds = SyntheticRefDataset("train", size=6, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 2]
    batch = batches[0]
    assert isinstance(batch, RefBatch)
    assert batch.boxes.shape == (4, 4) and batch.boxes.dtype == torch.float32
    assert batch.sent_ids.tolist() == [0, 1, 2, 3]
    for k in range(4):
        sample = ds[k]
        assert batch.images[k].dtype == torch.uint8 and np.array_equal(batch.images[k].numpy(), sample.image)
        assert batch.masks[k].dtype == torch.bool and np.array_equal(batch.masks[k].numpy(), sample.mask)
        assert batch.expressions[k] == sample.expression
    assert batch.to("cpu").boxes.data_ptr() != 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticRefDataset("validation")
    with pytest.raises(ValueError, match="size must be an int >= 0, got -1"):
        SyntheticRefDataset("val", size=-1)
    with pytest.raises(ValueError, match="min_side"):
        SyntheticConfig(min_side=300, max_side=200)
    with pytest.raises(IndexError, match="out of range"):
        SyntheticRefDataset("val", size=3)[3]
    with pytest.raises(TypeError, match="index must be an int, got float 1.0"):
        SyntheticRefDataset("val", size=3)[1.0]
    with pytest.raises(ValueError, match="collate_samples needs at least one sample"):
        collate_samples([])


@pytest.mark.parametrize("ramp", [1.0, 40.0, 127.0])
def test_coordinate_ramp_adds_the_position_to_every_pixel_and_nothing_else(ramp):
    plain = SyntheticRefDataset("val", size=6, seed=3)
    ramped = SyntheticRefDataset("val", size=6, seed=3, config=SyntheticConfig(coordinate_ramp=ramp))
    for a, b in zip(plain, ramped):
        assert a.expression == b.expression and np.array_equal(a.mask, b.mask) and np.array_equal(a.box, b.box)
        h, w = a.image.shape[:2]
        x = ramp * np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        y = ramp * np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        # the same scene before rounding: the ramped pixels differ from the plain ones by the ramp, to within
        # the two roundings, except where either image is clipped
        diff = b.image.astype(np.float32) - a.image.astype(np.float32)
        inside = lambda channel: (a.image[..., channel] > 0) & (a.image[..., channel] < 255) & (b.image[..., channel] > 0) & (b.image[..., channel] < 255)  # noqa: E731
        assert np.abs(diff[..., 0] - x)[inside(0)].max() <= 1.0
        assert np.abs(diff[..., 2] - y)[inside(2)].max() <= 1.0
        assert np.abs(diff[..., 1])[inside(1)].max() == 0.0
        # left-to-right in red, top-to-bottom in blue: the column means rise with x
        assert diff[:, -1, 0].mean() - diff[:, 0, 0].mean() > 1.5 * ramp
        assert diff[-1, :, 2].mean() - diff[0, :, 2].mean() > 1.5 * ramp


@pytest.mark.parametrize("ramp", [-1.0, 128.0, float("nan")])
def test_coordinate_ramp_out_of_range_is_refused(ramp):
    with pytest.raises(ValueError, match="coordinate_ramp"):
        SyntheticConfig(coordinate_ramp=ramp)
