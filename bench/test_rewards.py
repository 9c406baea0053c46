"""LENS reward of a GRPO batch, 8 prompts x 8 completions with 480 x 640 masks: ``lens_reward`` (parse
every completion, one box_iou_aligned call, one fused mask_iou call) against the usual per-completion
Python loop (regex, Python box IoU, torch mask IoU per completion). One thread on CPU."""
import re

import numpy as np
import pytest
import torch

from lens_fast.rewards import lens_reward

from bench_utils import synced

PROMPTS, GROUPS, H, W = 8, 8, 480, 640
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(rf"\[\s*{_NUM},\s*{_NUM},\s*{_NUM},\s*{_NUM}\s*\]")
_THINK = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


def naive_lens_reward(texts, gt_boxes, pred_masks, gt_masks):
    """One completion at a time, as reward functions are commonly written."""
    rewards = []
    for i, text in enumerate(texts):
        b, g = divmod(i, GROUPS)
        match = _BOX.search(text)
        box_iou = 0.0
        if match:
            p = [float(v) for v in match.groups()]
            t = gt_boxes[b]
            iw = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
            ih = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
            inter = iw * ih
            union = (p[2] - p[0]) * (p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
            box_iou = inter / union if union > 0 else 0.0
        fg = pred_masks[b, g] > 0
        gt = gt_masks[b]
        union = (fg | gt).sum().item()
        mask_iou = (fg & gt).sum().item() / union if union else 1.0
        rewards.append(box_iou**2 + mask_iou**2 + float(bool(_THINK.match(text))))
    return torch.tensor(rewards, dtype=torch.float32)


def make_batch(device):
    rng = np.random.default_rng(0)
    gt_boxes = [[int(v) for v in (rng.integers(0, 300), rng.integers(0, 200), rng.integers(320, 640), rng.integers(240, 480))]
                for _ in range(PROMPTS)]
    texts = []
    for b in range(PROMPTS):
        for _ in range(GROUPS):
            box = np.asarray(gt_boxes[b]) + rng.integers(-20, 21, size=4)
            texts.append("<think>The referred object is on the left, next to the table.</think>\n"
                         f"<answer>{{\"bbox\": [{box[0]}, {box[1]}, {box[2]}, {box[3]}]}}</answer>")
    yy, xx = np.mgrid[:H, :W]
    gt = np.stack([(xx >= x1) & (xx <= x2) & (yy >= y1) & (yy <= y2) for x1, y1, x2, y2 in gt_boxes])
    logits = (rng.standard_normal((PROMPTS, GROUPS, H, W)) + 2.0 * gt[:, None] - 1.0).astype(np.float32)
    return texts, gt_boxes, torch.from_numpy(logits).to(device), torch.from_numpy(gt).to(device)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masks", ["fp32_logits", "bool"])
@pytest.mark.parametrize("path", ["naive_loop", "fused"])
def test_lens_reward_batch(benchmark, record_traffic, one_torch_thread, device, masks, path):
    texts, gt_boxes, logits, gt = make_batch(device)
    pred = logits if masks == "fp32_logits" else logits > 0
    benchmark.group = f"lens_reward {PROMPTS}x{GROUPS} {H}x{W} {masks} {device}"
    record_traffic(benchmark, pred, gt, device=device)
    if path == "naive_loop":
        benchmark.extra_info["reference"] = True
        run = synced(lambda: naive_lens_reward(texts, gt_boxes, pred, gt), device)
    else:
        run = synced(lambda: lens_reward(texts, gt_boxes, pred_masks=pred, gt_masks=gt, cot=True).reward, device)
    result = benchmark(run)
    want = naive_lens_reward(texts, gt_boxes, pred, gt)
    torch.testing.assert_close(result.cpu(), want, atol=1e-5, rtol=0)
