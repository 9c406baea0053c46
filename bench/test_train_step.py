"""One stage-2 GRPO step of the tiny LENS model (``python -m lens_fast.train``'s defaults), one thread on CPU.

B = 4 prompts (``SyntheticConfig(kinds=("attribute",), min_radius=0.12, max_radius=0.25, max_objects=4)``),
G = 8 completions each (40 new tokens at most, temperature 0.9, top_p 0.9, top_k 50), beta = 0.04 with a
frozen reference copy, every part trained (``stage2_train`` default), AdamW + clipping at 1.0.

- ``step[...]``: the step broken into its parts, each its own benchmark on the same inputs so that a
  regression in any part shows: ``generate`` (prompts, vision encoding, KV-cached sampling of 32
  completions, decoding), ``reference`` (the frozen copy's log-probs), ``forward-backward`` (SAM + vision
  encoding, teacher-forced pass with the context queries, log-probs, masks, BCE + Dice, rewards,
  advantages, GRPO loss, backward; the ``whole`` entry splits the reward out), ``reward`` (mask IoU
  from SAM's low-res logits + LENS reward + advantages), ``optimizer`` (clipping + AdamW + scheduler);
  ``whole`` is all of it end to end as train.py runs it (the policy's vision encoding made once, with its
  graph, before sampling and reused by the update; the ``forward-backward`` part alone encodes its own
  images), with each part's min time in ``extra_info`` (printed with ``-s``); ``whole, encoding twice``
  is the step with a no-grad encoding for sampling and another in the update (before the shared one).
  Ratios printed for this group are whole / part (how many times the part fits in the step).
- ``reward[...]``: the reward part (train.py's ``score_rollout``: ``mask_iou_from_low_res`` +
  ``rollout_rewards`` + advantages) beside the per-completion Python loop reward functions are usually
  written as (open-r1 / LENS style: parse the
  answer, box IoU in Python, ``F.interpolate`` each mask to the image's size, IoU in torch), asserted equal.
- ``vs_trl[...]``: the whole step beside TRL's ``GRPOTrainer`` driving the same tiny Qwen2.5-VL policy
  (same images, prompts, G, sampling, completion cap, beta, loss type, lr, clipping) with a box reward,
  stepped one optimizer step at a time inside its own ``train()`` loop. TRL trains only the policy:
  our step does strictly more (SAM image encoder + decoder, queries, connector, mask loss, mask reward),
  so ``lens_fast policy only`` is our step doing TRL's work (no SAM, no queries, box reward, the same
  GRPO loss and reference). Each entry also measures its peak memory in a fresh process (``extra_info``:
  ``step_peak_mib``, the peak RSS of a step above the live RSS before it, after a warm-up step and
  ``malloc_trim``; ``peak_mib``, the process's peak RSS; ``live_mib``) and prints it with ``-s`` (not
  in the quick pass, ``--benchmark-disable``).

``test_bench_step_is_train_py_step`` runs ``lens_fast.train.main`` for one stage-2 step and checks that
the step timed here computes the same loss, rewards and gradient norm: the benchmark cannot drift away
from the trainer unnoticed. Run: ``python -m pytest bench/test_train_step.py --benchmark-only -s``.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import json
import multiprocessing
import re
import threading
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench_utils import vm_kib

from lens_fast import ops
from lens_fast.data import SyntheticConfig, SyntheticRefDataset
from lens_fast.model import ImageCache, build_tiny_lens
from lens_fast.model import prompts as prompt_text
from lens_fast.training import grpo
from lens_fast.training.batches import sampling_generators
from lens_fast.training.config import TrainConfig

B, G = 4, 8
CONFIG = TrainConfig(
    batch_size=B, num_generations=G, max_new_tokens=40, temperature=0.9, top_p=0.9, top_k=50, beta=0.04,
    synthetic_kinds=("attribute",), synthetic_min_radius=0.12, synthetic_max_radius=0.25, synthetic_max_objects=4,
    stage1_steps=0, stage2_steps=1, progress=False,
)
ROUNDS = 5  # timed rounds per benchmark (--benchmark-disable runs each body once)


def scene_config(config: TrainConfig = CONFIG) -> SyntheticConfig:
    return SyntheticConfig(kinds=config.synthetic_kinds, min_radius=config.synthetic_min_radius,
                           max_radius=config.synthetic_max_radius, max_objects=config.synthetic_max_objects)


def train_samples(count: int, config: TrainConfig = CONFIG) -> list:
    """The first ``count`` training samples of ``lens_fast.train`` (same dataset, seed and order)."""
    dataset = SyntheticRefDataset("train", size=10**9, seed=config.seed, config=scene_config(config))
    return [dataset[i] for i in range(count)]


# ---- the stage-2 step of lens_fast/train.py, part by part ---------------------------------------------
@dataclass
class Trainer:
    model: object
    reference: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    config: TrainConfig


def build_trainer(config: TrainConfig = CONFIG) -> Trainer:
    """What ``lens_fast.train.main`` builds for stage 2 without a stage-1 checkpoint."""
    from lens_fast.train import build_optimizer, parameters_of

    torch.manual_seed(config.seed)
    model = build_tiny_lens(seed=config.seed, mode=config.mode, prompt_style=config.prompt_style,
                            num_queries=config.num_queries, max_new_tokens=config.max_new_tokens)
    params = parameters_of(model, config.stage2_train)
    optimizer, scheduler = build_optimizer(params, config.lr, config.stage2_steps, config)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    model.train()
    return Trainer(model, reference, optimizer, scheduler, config)


@dataclass
class Rollout:
    images: object
    prompts: object
    completions: object
    texts: list
    loss_mask: torch.Tensor
    gt_masks: list
    gt_boxes: torch.Tensor
    ref_logp: Optional[torch.Tensor] = None
    cache: Optional[ImageCache] = None  # the vision encoding with its graph, for the update (shared encoding)


def generate(t: Trainer, samples, step: int = 0, share_encoding: bool = False) -> Rollout:
    """train.py's rollout up to the decoded texts (images prepared, prompts tokenized, G samples each).
    ``share_encoding`` (train.py's way): the vision encoding is computed with its graph and kept for the
    update; otherwise sampling encodes without grad and the update encodes again."""
    model, config = t.model, t.config
    images = model.prepare_images([s.image for s in samples])
    prompts = model.tokenize_prompts(images, [s.expression for s in samples])
    gt_masks = [torch.from_numpy(s.mask) for s in samples]
    gt_boxes = torch.from_numpy(np.stack([s.box for s in samples]))
    generators = sampling_generators(config.seed, step, step * config.batch_size, len(samples), torch.device("cpu"))
    with torch.set_grad_enabled(share_encoding):
        encoding = model.encode(images, sam=False)
    model.eval()
    with torch.no_grad():
        completions = model.generate(
            prompts, encoding.detach(), num_generations=config.num_generations,
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
            top_k=config.top_k, generator=generators,
        )
    model.train()
    texts = model.decode_text(completions)
    loss_mask = completions.mask & ~completions.truncated[:, None] if config.mask_truncated_completions else completions.mask
    return Rollout(images, prompts, completions, texts, loss_mask, gt_masks, gt_boxes,
                   cache=encoding if share_encoding else None)


def reference_logprobs(t: Trainer, r: Rollout) -> Rollout:
    ref = t.reference
    with torch.no_grad():
        hidden, _ = ref.forward_completions(r.prompts, ref.encode(r.images, sam=False), r.completions)
        r.ref_logp = ref.policy.token_logprobs(hidden, r.completions.ids, t.config.temperature)
    return r


def rewards_of(t: Trainer, r: Rollout, low_res: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reward part, train.py's own ``score_rollout``: total, components, mask IoU and advantages [N]."""
    from lens_fast.train import score_rollout

    return score_rollout(t.config, t.model, r.texts, low_res, r.gt_masks, r.gt_boxes, r.images.policy_sizes,
                         r.images.original_sizes, t.config.num_generations)


def forward_backward(t: Trainer, r: Rollout, times: Optional[dict] = None) -> dict:
    """train.py's first (and, at num_iterations = 1, only) update of a rollout, up to ``loss.backward()``
    (with the rollout's vision encoding when it kept one: used once, its graph goes with the backward)."""
    model, config, group = t.model, t.config, t.config.num_generations
    start = time.perf_counter()
    logp, low_res = model(r.images, r.prompts, r.completions, config.temperature, cache=r.cache)
    r.cache = None
    _, bce, dice = model.segmenter.mask_loss(low_res.view(len(r.gt_masks), group, *low_res.shape[1:]), r.gt_masks)
    tock = time.perf_counter()
    scores = rewards_of(t, r, low_res)
    tick = time.perf_counter()
    policy_loss, stats = grpo.policy_loss(
        logp, logp.detach(), scores["advantage"], r.loss_mask, ref_logp=r.ref_logp, beta=config.beta, epsilon=config.epsilon,
        epsilon_high=config.epsilon_high, importance_sampling_level=config.importance_sampling_level,
        loss_type=config.loss_type, max_completion_length=config.max_new_tokens,
    )
    loss = policy_loss + config.mask_loss_weight * (bce + dice)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if times is not None:
        times["reward"] = tick - tock
        times["forward-backward"] = time.perf_counter() - start - times["reward"]
    return {"loss": loss.item(), "policy_loss": policy_loss.item(), "bce": bce.item(), "dice": dice.item(),
            "kl": stats.kl, "reward/total/mean": float(scores["total"].float().mean()),
            "mask_iou": float(scores["mask_iou"].mean())}


def optimizer_step(t: Trainer) -> float:
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in t.optimizer.param_groups for p in g["params"]], t.config.grad_clip or float("inf"))
    t.optimizer.step()
    t.scheduler.step()
    return float(grad_norm)


def forward_backward_policy_only(t: Trainer, r: Rollout, times: Optional[dict] = None) -> dict:
    """The same update without SAM, queries or masks: the policy's teacher-forced pass over prompt +
    completion, box reward (LENS's box IoU^2), the same GRPO loss: the work TRL's trainer does."""
    from lens_fast.rewards import lens_reward

    model, config, group = t.model, t.config, t.config.num_generations
    start = time.perf_counter()
    vision = (r.cache or model.encode(r.images, sam=False)).vision
    r.cache = None
    hidden, _ = model.policy.forward_completions(r.prompts, vision, r.completions.ids, r.completions.mask)
    logp = model.policy.token_logprobs(hidden, r.completions.ids, config.temperature)
    tock = time.perf_counter()
    rewards = lens_reward(r.texts, r.gt_boxes, policy_size=r.images.policy_sizes, gt_size=r.images.original_sizes)
    adv = grpo.advantages(rewards.components, group, scale=config.scale_rewards, aggregation=config.reward_aggregation)
    tick = time.perf_counter()
    loss, stats = grpo.policy_loss(
        logp, logp.detach(), adv, r.loss_mask, ref_logp=r.ref_logp, beta=config.beta, epsilon=config.epsilon,
        epsilon_high=config.epsilon_high, importance_sampling_level=config.importance_sampling_level,
        loss_type=config.loss_type, max_completion_length=config.max_new_tokens,
    )
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if times is not None:
        times["reward"] = tick - tock
        times["forward-backward"] = time.perf_counter() - start - times["reward"]
    return {"loss": loss.item(), "kl": stats.kl, "reward/total/mean": float(rewards.reward.float().mean())}


def whole_step(t: Trainer, samples, step: int = 0, times: Optional[dict] = None, policy_only: bool = False,
               share_encoding: bool = True) -> dict:
    """One stage-2 step; ``times`` gets each part's seconds."""
    times = {} if times is None else times
    clock = time.perf_counter()
    r = generate(t, samples, step, share_encoding)
    times["generate"] = time.perf_counter() - clock
    clock = time.perf_counter()
    reference_logprobs(t, r)
    times["reference"] = time.perf_counter() - clock
    record = (forward_backward_policy_only if policy_only else forward_backward)(t, r, times)
    clock = time.perf_counter()
    record["grad_norm"] = optimizer_step(t)
    times["optimizer"] = time.perf_counter() - clock
    record["completion_length"] = float(r.completions.lengths.float().mean())
    return record


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_trainer()
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samples():
    return train_samples(B)


@pytest.fixture(scope="module")
def rollout(trainer, samples):
    torch.set_num_threads(1)
    return reference_logprobs(trainer, generate(trainer, samples))


def low_res_of(t: Trainer, r: Rollout) -> torch.Tensor:
    """The rollout's masks (SAM low-res logits [N, 4e, 4e]) from the context queries, without grad."""
    model = t.model
    with torch.no_grad():
        cache = model.encode(r.images)
        _, states = model.forward_completions(r.prompts, cache, r.completions)
        return model.masks_from_queries(states, cache.sam.repeat_interleave(t.config.num_generations, 0))[0]


def _show(name: str, values: dict) -> None:
    print(f"\n{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in values.items()))


# ---- the step, part by part ---------------------------------------------------------------------------
PARTS = ("generate", "reference", "forward-backward", "reward", "optimizer", "whole", "whole, encoding twice")


@pytest.mark.parametrize("part", PARTS)
def test_step(benchmark, trainer, samples, rollout, part, one_torch_thread):
    benchmark.group = f"train step: tiny LENS stage 2, B={B} x G={G}, 40 new tokens (parts of one step)"
    benchmark.extra_info["reference"] = part == "whole"  # ratios: the whole step / the part
    if part == "generate":
        result = benchmark.pedantic(generate, (trainer, samples), rounds=ROUNDS, warmup_rounds=0)
        benchmark.extra_info["completion_length"] = float(result.completions.lengths.float().mean())
    elif part == "reference":
        benchmark.pedantic(reference_logprobs, (trainer, rollout), rounds=ROUNDS)
    elif part == "forward-backward":
        benchmark.pedantic(forward_backward, (trainer, rollout), rounds=ROUNDS)
    elif part == "reward":
        benchmark.pedantic(rewards_of, (trainer, rollout, low_res_of(trainer, rollout)), rounds=ROUNDS * 4)
    elif part == "optimizer":
        forward_backward(trainer, rollout)  # gradients to step with
        benchmark.pedantic(optimizer_step, (trainer,), rounds=ROUNDS * 4)
    else:
        best: dict = {}

        def run():
            times: dict = {}
            record = whole_step(trainer, samples, times=times, share_encoding=part == "whole")
            for k, v in times.items():
                best[k] = min(best.get(k, float("inf")), v)
            return record

        record = benchmark.pedantic(run, rounds=ROUNDS)
        benchmark.extra_info.update({f"min_s/{k}": v for k, v in best.items()})
        benchmark.extra_info["completion_length"] = record["completion_length"]
        assert np.isfinite(record["loss"])
        _show(f"{part} step, min time of each part", best)


# ---- the reward part beside the per-completion Python loop ----------------------------------------------
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(rf"<\|box_start\|>\(\s*{_NUM}\s*,\s*{_NUM}\s*\)\s*,\s*\(\s*{_NUM}\s*,\s*{_NUM}\s*\)<\|box_end\|>")


def per_completion_reward(texts, low_res, gt_masks, gt_boxes, policy_sizes, original_sizes, image_size):
    """LENS reward one completion at a time, as open-r1 / LENS-style reward functions are written: regex
    the answer's box, scale it to the image, box IoU in Python; upsample the mask (SAM's postprocess:
    to the square input, crop its padding, then to the image's size) with ``F.interpolate`` and take its IoU."""
    group = len(texts) // len(gt_masks)
    out = []
    for i, text in enumerate(texts):
        b = i // group
        box_iou = 0.0
        match = _BOX.search(text)
        if match:
            (h, w), (H, W) = policy_sizes[b].tolist(), original_sizes[b].tolist()
            x1, y1, x2, y2 = (float(v) for v in match.groups())
            p = (x1 * W / w, y1 * H / h, x2 * W / w, y2 * H / h)
            t = gt_boxes[b].tolist()
            iw = max(0.0, min(p[2], t[2]) - max(p[0], t[0]))
            ih = max(0.0, min(p[3], t[3]) - max(p[1], t[1]))
            inter = iw * ih
            union = max(0.0, p[2] - p[0]) * max(0.0, p[3] - p[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
            box_iou = inter / union if union > 0 else 0.0
        x = low_res[i][None, None].float()
        x = F.interpolate(x, (image_size, image_size), mode="bilinear", align_corners=False)
        input_h, input_w = ops.resize_longest_side(tuple(gt_masks[b].shape), image_size)  # SAM v1: crop the padding
        x = F.interpolate(x[..., :input_h, :input_w], tuple(gt_masks[b].shape), mode="bilinear", align_corners=False)[0, 0]
        pred, gt = x > 0, gt_masks[b]
        union = (pred | gt).sum().item()
        mask_iou = (pred & gt).sum().item() / union if union else 1.0
        out.append(box_iou**2 + mask_iou**2)
    return torch.tensor(out, dtype=torch.float32)


@pytest.fixture(scope="module")
def reward_inputs(trainer, rollout):
    """The step's own low-res masks; 3 of every 4 texts replaced by answers near the true box (a random
    policy seldom writes one), the rest the policy's own samples."""
    low_res = low_res_of(trainer, rollout)
    rng = np.random.default_rng(0)
    texts = list(rollout.texts)
    images = rollout.images
    for i in range(len(texts)):
        if i % 4:
            b = i // G
            scale = (images.policy_sizes[b] / images.original_sizes[b]).flip(-1).repeat(2).numpy()
            box = rollout.gt_boxes[b].numpy() * scale + rng.integers(-6, 7, size=4)
            texts[i] = prompt_text.answer("the object", box.tolist(), "grounding")
    return texts, low_res


@pytest.mark.parametrize("way", ["per-completion loop", "lens_fast"])
def test_reward(benchmark, trainer, rollout, reward_inputs, way, one_torch_thread):
    texts, low_res = reward_inputs
    r = Rollout(rollout.images, rollout.prompts, rollout.completions, texts, rollout.loss_mask, rollout.gt_masks,
                rollout.gt_boxes)
    benchmark.group = f"train step: reward of B={B} x G={G} completions (box IoU^2 + mask IoU^2 from low-res logits)"
    benchmark.extra_info["reference"] = way == "per-completion loop"
    args = (texts, low_res, r.gt_masks, r.gt_boxes, r.images.policy_sizes, r.images.original_sizes,
            trainer.model.segmenter.image_size)
    if way == "per-completion loop":
        result = benchmark.pedantic(per_completion_reward, args, rounds=ROUNDS * 4)
    else:
        result = benchmark.pedantic(lambda: rewards_of(trainer, r, low_res)["total"], rounds=ROUNDS * 4)
    want = per_completion_reward(*args)
    answered = torch.arange(len(texts)) % 4 != 0
    assert (want[answered] > 0.05).all() and (want != want[0]).any()  # boxes scored, masks differ
    torch.testing.assert_close(result, want, atol=2e-3, rtol=0)  # a boundary pixel's rounding at most


# ---- the whole step beside TRL's GRPOTrainer -----------------------------------------------------------
def trl_trainer(samples, output_dir, steps: int, config: TrainConfig = CONFIG):
    """TRL's GRPOTrainer on the tiny LENS policy (its Qwen2.5-VL, saved and reloaded, as TRL builds the
    reference from the policy's path) with a Qwen2.5-VL processor around our tokenizer, the same prompts
    and images, and a box reward (``TRLReward("lens")`` without masks: box IoU^2)."""
    from datasets import Dataset
    from PIL import Image
    from transformers import PrinterCallback, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from lens_fast.rewards import TRLReward

    lens = build_trainer(config).model
    tokenizer = lens.tokenizer
    tokenizer.padding_side = "left"  # TRL left-pads prompts; the processor's mm_token_type_ids must agree
    lens.policy.model.save_pretrained(f"{output_dir}/policy")
    tokenizer.save_pretrained(f"{output_dir}/policy")
    patching = lens.patching
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=lens.config.min_pixels, max_pixels=lens.config.max_pixels,
                                              patch_size=patching.patch_size, merge_size=patching.merge_size,
                                              temporal_patch_size=patching.temporal_patch_size),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template,
    )
    rows = [samples[i % len(samples)] for i in range(B * steps)]
    dataset = Dataset.from_dict({
        "prompt": [prompt_text.messages(s.expression, config.prompt_style) for s in rows],
        "image": [Image.fromarray(s.image) for s in rows],
        "solution": [json.dumps([float(v) for v in s.box]) for s in rows],
    })
    reward = TRLReward("lens")

    def box_reward(**kwargs):
        return reward(**kwargs)

    # a random policy samples vision tokens too; Qwen2.5-VL's M-RoPE then miscounts the image: suppress them
    vision = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
    args = GRPOConfig(
        output_dir=f"{output_dir}/out", per_device_train_batch_size=B * config.num_generations,
        num_generations=config.num_generations, max_completion_length=config.max_new_tokens, max_steps=steps,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, beta=config.beta,
        epsilon=config.epsilon, loss_type=config.loss_type, scale_rewards=config.scale_rewards,
        mask_truncated_completions=config.mask_truncated_completions, learning_rate=config.lr,
        weight_decay=config.weight_decay, max_grad_norm=config.grad_clip, use_cpu=True, bf16=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, shuffle_dataset=False,
        generation_kwargs={"suppress_tokens": [tokenizer.convert_tokens_to_ids(t) for t in vision]},
    )
    trainer = GRPOTrainer(model=f"{output_dir}/policy", reward_funcs=[box_reward], args=args, train_dataset=dataset,
                          processing_class=processor)
    trainer.remove_callback(PrinterCallback)  # metrics are still gathered and logged every step, not printed
    return trainer


class TrlStepper:
    """Runs ``trainer.train()`` on a thread, holding it at each step's start: ``step()`` lets exactly one
    optimizer step of TRL's own loop run (from one step's start to the next's), ``close()`` ends it."""

    def __init__(self, trainer) -> None:
        from transformers import TrainerCallback

        self._arrived, self._go, self._stop = threading.Semaphore(0), threading.Semaphore(0), False
        self.error: Optional[BaseException] = None
        stepper = self

        class Hold(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                stepper._arrived.release()
                stepper._go.acquire()
                if stepper._stop:
                    control.should_training_stop = True

            def on_train_end(self, args, state, control, **kwargs):
                stepper._arrived.release()

        trainer.add_callback(Hold())
        self.trainer = trainer

        def run():
            torch.set_num_threads(1)
            try:
                trainer.train()
            except BaseException as error:  # surfaced by step()
                self.error = error
                self._arrived.release()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        self._wait()

    def _wait(self) -> None:
        self._arrived.acquire()
        if self.error is not None:
            raise self.error

    def step(self) -> None:
        self._go.release()
        self._wait()

    def close(self) -> None:
        self._stop = True
        self._go.release()
        self._thread.join(timeout=60)

    @property
    def steps_done(self) -> int:
        return int(self.trainer.state.global_step)


@pytest.mark.parametrize("way", ["trl GRPOTrainer", "lens_fast", "lens_fast policy only"])
def test_vs_trl(benchmark, trainer, samples, way, tmp_path, one_torch_thread):
    benchmark.group = (f"train step: whole stage-2 step vs TRL GRPOTrainer (same tiny Qwen2.5-VL policy, "
                       f"B={B} x G={G}, 40 new tokens, beta 0.04)")
    benchmark.extra_info["reference"] = way.startswith("trl")
    if way.startswith("lens_fast"):
        record = benchmark.pedantic(whole_step, (trainer, samples), {"policy_only": way.endswith("policy only")},
                                    rounds=ROUNDS, warmup_rounds=1)
        benchmark.extra_info["completion_length"] = record["completion_length"]
    else:
        pytest.importorskip("trl")
        rounds = ROUNDS if benchmark.enabled else 1
        stepper = TrlStepper(trl_trainer(samples, str(tmp_path / "timed"), steps=rounds + 2))
        try:
            stepper.step()  # warm-up
            benchmark.pedantic(stepper.step, rounds=rounds)
            assert stepper.steps_done == rounds + 1
        finally:
            stepper.close()
        history = stepper.trainer.state.log_history
        benchmark.extra_info["completion_length"] = float(np.mean([r["completions/mean_length"] for r in history
                                                                   if "completions/mean_length" in r]))
    if not benchmark.enabled:
        return  # the quick pass (--benchmark-disable) skips the memory processes (~25 s)
    memory = peak_memory(way, str(tmp_path / "memory"), steps=3)
    benchmark.extra_info.update({k: v for k, v in memory.items() if k.endswith("_mib")})
    print(f"\n{way}: step peak RSS +{memory['step_peak_mib']:.1f} MiB above a live {memory['live_mib']:.1f} MiB "
          f"(process peak {memory['peak_mib']:.1f} MiB); in that process "
          f"{', '.join(f'{s * 1e3:.0f}' for s in memory['times'])} ms per step")


# ---- peak memory, each side in its own process ---------------------------------------------------------
def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _measure_child(way: str, output_dir: str, steps: int, queue) -> None:
    """In a fresh process: build, one warm-up step (optimizer states and caches exist from then on), free
    memory handed back to the OS (``malloc_trim``), reset the high-water mark; then ``steps`` steps.
    Reports the live RSS before them, the peak RSS during them (Linux VmHWM), each step's seconds."""
    torch.set_num_threads(1)
    try:
        samples = train_samples(B)
        if way.startswith("lens_fast"):
            t = build_trainer()
            policy_only = way.endswith("policy only")
            whole_step(t, samples, policy_only=policy_only)
            step = lambda: whole_step(t, samples, policy_only=policy_only)  # noqa: E731
            close = lambda: None  # noqa: E731
        else:
            stepper = TrlStepper(trl_trainer(samples, output_dir, steps=steps + 2))
            stepper.step()
            step, close = stepper.step, stepper.close
        _release_free_memory()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = vm_kib("VmRSS")
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peak = vm_kib("VmHWM")
        close()
        queue.put({"live_mib": before / 1024, "peak_mib": peak / 1024, "step_peak_mib": (peak - before) / 1024,
                   "times": times})
    except BaseException as error:  # noqa: BLE001 (reported to the parent)
        queue.put({"error": repr(error)})


def peak_memory(way: str, output_dir: str, steps: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure_child, args=(way, output_dir, steps, queue))
    process.start()
    result = queue.get(timeout=600)
    process.join(timeout=60)
    if "error" in result:
        raise RuntimeError(f"{way}: {result['error']}")
    return result


# ---- the benchmark's step is train.py's step -----------------------------------------------------------
def test_bench_step_is_train_py_step(tmp_path, one_torch_thread):
    """``lens_fast.train.main`` for one stage-2 step (no stage 1) writes the same loss, rewards, KL and
    gradient norm as :func:`whole_step` on the same samples, seed and model."""
    from lens_fast.train import main

    assert main(["--output-dir", str(tmp_path), "--stage1-steps", "0", "--stage2-steps", "1", "--val-size", "2",
                 "--val-batch-size", "2", "--progress", "false", "--batch-size", str(B),
                 "--num-generations", str(G), "--max-new-tokens", "40", "--temperature", "0.9", "--top-p", "0.9",
                 "--top-k", "50", "--beta", "0.04", "--synthetic-kinds", "attribute", "--synthetic-min-radius", "0.12",
                 "--synthetic-max-radius", "0.25", "--synthetic-max-objects", "4"]) == 0
    logged = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("stage") == "grpo")
    torch.set_num_threads(1)
    record = whole_step(build_trainer(), train_samples(B))
    for key in ("loss", "policy_loss", "bce", "dice", "kl", "reward/total/mean", "mask_iou", "grad_norm",
                "completion_length"):
        assert record[key] == pytest.approx(logged[key], rel=1e-4, abs=1e-6), key
