"""The segmenter follows SAM v1's own geometry (segment_anything's ``SamPredictor``): longest side resized
to SAM's input size with the aspect kept, zero-padded to the square, boxes and points through
``ResizeLongestSide.apply_coords``, masks cropped back before the final resize. Checked against
``SamPredictor`` itself on a tiny random SAM and non-square images, and the training paths (mask loss,
mask statistics, the reward's mask IoU) against ``Sam.postprocess_masks`` in the padded frame."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lens_fast import ops
from lens_fast.model import build_tiny_tokenizer, tiny_config
from lens_fast.model.answer_segmenter import AnswerSegmenter
from lens_fast.model.image_processing import sam_input
from lens_fast.model.segmenter import Segmenter, build_sam
from lens_fast.rewards import parse_answer
from lens_fast.training.rollout_rewards import mask_iou_from_low_res

segment_anything = pytest.importorskip("segment_anything")
from segment_anything import SamPredictor  # noqa: E402
from segment_anything.utils.transforms import ResizeLongestSide  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEAR = 1e-4  # |reference logit| below which float32 rounding (the fused decoder) may flip a pixel
SIZES = [(90, 150), (150, 90), (77, 33)]  # landscape, portrait, odd sides


@pytest.fixture(scope="module")
def sams():
    """(our Segmenter, SamPredictor) over the same tiny random SAM v1 weights (the tiny default's sizes)."""
    torch.manual_seed(0)
    sam = build_sam(tiny_config(build_tiny_tokenizer()).sam_config).eval()
    predictor = SamPredictor(copy.deepcopy(sam))  # Segmenter fuses its mask decoder in place
    return Segmenter(sam).eval(), predictor


def scene(height, width, seed=0):
    """A non-square RGB uint8 picture: an ellipse on a background, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    image = np.empty((height, width, 3), np.int64)
    image[...] = (40, 90, 160)
    image[((yy - height / 2) / (height / 3)) ** 2 + ((xx - width / 3) / (width / 4)) ** 2 < 1] = (220, 50, 30)
    return np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)


def sam_postprocess(predictor, low_res):
    """``Sam.postprocess_masks`` of SamPredictor's low-res logits [1, h, w] for its image -> [H, W]."""
    return predictor.model.postprocess_masks(torch.as_tensor(low_res)[None], predictor.input_size, predictor.original_size)[0, 0]


def assert_masks_match(mask, ref_logits):
    """bool ``mask`` equals ``ref_logits > 0`` except where the reference logit is within NEAR of 0."""
    assert mask.shape == ref_logits.shape
    differ = mask != (ref_logits > 0)
    assert not (differ & (ref_logits.abs() > NEAR)).any(), f"{int(differ.sum())} pixels differ"


def test_resize_longest_side_is_sam_v1s():
    for size in [(90, 150), (150, 90), (77, 33), (1, 3), (5, 7), (64, 64), (480, 640), (1023, 31), (333, 45)]:
        for image_size in (256, 1024, 37):
            want = ResizeLongestSide.get_preprocess_shape(size[0], size[1], image_size)
            assert ops.resize_longest_side(size, image_size) == want, (size, image_size)
    assert ops.resize_longest_side(np.array([480, 640]), np.int64(1024)) == (768, 1024)
    assert ops.resize_longest_side((1, 3000), 1024) == (1, 1024)  # SAM itself would give 0 rows
    with pytest.raises(ValueError, match="image_size"):
        ops.resize_longest_side((4, 5), 0)
    with pytest.raises(TypeError, match="original_size"):
        ops.resize_longest_side((4.0, 5), 16)
    with pytest.raises(ValueError, match="original_size"):
        ops.resize_longest_side((0, 5), 16)


def test_sam_input_is_sam_predictors_preprocessing(sams):
    segmenter, predictor = sams
    images = [scene(*size, seed=i) for i, size in enumerate(SIZES)]
    x = sam_input(images, [segmenter.input_size(image.shape[:2]) for image in images], segmenter.image_size)
    for i, image in enumerate(images):
        resized = torch.as_tensor(predictor.transform.apply_image(image)).permute(2, 0, 1)[None]
        assert torch.equal(x[i : i + 1], predictor.model.preprocess(resized.float()))
        h, w = ops.resize_longest_side(image.shape[:2], segmenter.image_size)
        assert (x[i, :, h:] == 0).all() and (x[i, :, :, w:] == 0).all()  # padded, not stretched


@pytest.mark.parametrize("size", SIZES)
def test_box_prompt_gives_sam_predictors_masks(sams, size):
    """Same image, same box, same weights: SamPredictor's embedding, low-res logits, IoU and mask."""
    segmenter, predictor = sams
    height, width = size
    image = scene(height, width)
    box = np.array([0.1 * width, 0.2 * height, 0.7 * width, 0.8 * height])
    with torch.no_grad():
        predictor.set_image(image)
        _, ref_iou, ref_low = predictor.predict(box=box, multimask_output=False)
        ref_logits = sam_postprocess(predictor, ref_low)
        embedding = segmenter.embed_images([image])
        torch.testing.assert_close(embedding, predictor.features, rtol=0, atol=0)
        sizes = torch.tensor([[height, width]])
        frame_box = segmenter.to_input_frame(torch.tensor(box).view(1, 2, 2), sizes).view(1, 4)
        assert np.array_equal(frame_box.numpy(), predictor.transform.apply_boxes(box, (height, width)))
        low_res, iou = segmenter.decode(embedding, boxes=frame_box.float())
        mask = segmenter.masks(low_res[0], (height, width))
    torch.testing.assert_close(low_res, torch.as_tensor(ref_low), rtol=0, atol=1e-5)
    assert iou.item() == pytest.approx(float(ref_iou[0]), abs=1e-5)
    assert mask.dtype == torch.bool and mask.shape == (height, width)
    assert 0 < mask.float().mean() < 1  # a real mask, not all or nothing
    assert_masks_match(mask, ref_logits)


def test_answer_segmenter_gives_sam_predictors_masks(sams):
    """The prompts mode's path (parsed box + point -> decode_answers -> masks) on a non-square image."""
    segmenter, predictor = sams
    height, width = 90, 150
    image = scene(height, width, seed=3)
    answer = parse_answer('{"bbox": [20, 15, 100, 75], "points_1": [60, 45]}')
    mask = AnswerSegmenter(segmenter)(image, answer)  # the answer in the image's own pixels
    with torch.no_grad():
        predictor.set_image(image)
        _, _, ref_low = predictor.predict(point_coords=np.array([[60.0, 45.0]]), point_labels=np.array([1]),
                                          box=np.array([20.0, 15.0, 100.0, 75.0]), multimask_output=False)
        ref_logits = sam_postprocess(predictor, ref_low)
    assert 0 < mask.mean() < 1
    assert_masks_match(torch.from_numpy(mask), ref_logits)


def test_training_paths_use_the_padded_geometry(sams):
    """Mask loss, mask statistics and the reward's mask IoU equal their definitions on
    ``Sam.postprocess_masks`` with SAM v1's input size, for ground truths of non-square sizes."""
    segmenter, predictor = sams
    generator = torch.Generator().manual_seed(0)
    side = segmenter.low_res_size
    group = 3
    low_res = torch.randn(len(SIZES), group, side, side, generator=generator) * 4
    gts = [torch.rand(size, generator=generator) < 0.3 for size in SIZES]
    for b, size in enumerate(SIZES):
        gts[b][: size[0] // 2, : size[1] // 2] = True  # one solid block: a mask SAM could draw
    refs = []
    for b, (height, width) in enumerate(SIZES):
        input_size = ResizeLongestSide.get_preprocess_shape(height, width, segmenter.image_size)
        refs.append(predictor.model.postprocess_masks(low_res[b : b + 1], input_size, (height, width))[0])
    # mask statistics and the reward's IoU
    ious = mask_iou_from_low_res(segmenter, low_res.view(-1, side, side), gts)
    for b, (ref, gt) in enumerate(zip(refs, gts)):
        stats = segmenter.mask_stats(low_res[b], gt)
        want_inter = ((ref > 0) & gt).sum((-2, -1))
        want_union = ((ref > 0) | gt).sum((-2, -1))
        assert torch.equal(stats.intersection, want_inter) and torch.equal(stats.union, want_union)
        torch.testing.assert_close(ious[b * group : (b + 1) * group], want_inter / want_union)
    # BCE + Dice at each ground truth's size
    bce, dice = [], []
    for ref, gt in zip(refs, gts):
        g = gt.float().expand_as(ref)
        bce.append(F.binary_cross_entropy_with_logits(ref, g, reduction="none").mean((-2, -1)))
        p = torch.sigmoid(ref)
        dice.append(1 - (2 * (p * g).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + g.sum((-2, -1)) + 1))
    loss, got_bce, got_dice = segmenter.mask_loss(low_res, gts)
    torch.testing.assert_close(got_bce, torch.stack(bce).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_dice, torch.stack(dice).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, got_bce + got_dice)


def test_to_input_frame_rejects_bad_shapes(sams):
    segmenter, _ = sams
    with pytest.raises(ValueError, match="xy must be"):
        segmenter.to_input_frame(torch.zeros(2, 3), torch.tensor([[4, 5], [6, 7]]))
    with pytest.raises(ValueError, match="xy must be"):
        segmenter.to_input_frame(torch.zeros(3, 2), torch.tensor([[4, 5], [6, 7]]))


def test_sam_input_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="input_sizes must hold one"):
        sam_input([scene(9, 15)], [], 256)
    with pytest.raises(ValueError, match=r"input_sizes\[0\] = \(9, 300\) must fit"):
        sam_input([scene(9, 15)], [(9, 300)], 256)
