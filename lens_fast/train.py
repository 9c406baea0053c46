"""LENS-style training: ``python -m lens_fast.train`` (``--help`` lists every option).

config -> data -> model -> for each step: rollout -> reward -> advantage -> loss -> step -> log /
checkpoint. Stage 1 aligns (teacher-forced ground-truth answers: BCE + Dice on the masks, plus the
answer's cross-entropy for a policy that cannot yet write boxes); stage 2 is GRPO on sampled answers
with the policy's own masks, plus BCE + Dice. Everything else lives in ``lens_fast.training``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lens_fast.data import SyntheticConfig, SyntheticRefDataset
from lens_fast.model import Completions, ImageCache, LensModel, PromptBatch, build_tiny_lens, from_components, from_pretrained
from lens_fast.training import grpo
from lens_fast.training.batches import Batches, MicroBatch, micro_batches, sampling_generators
from lens_fast.training.checkpoint import (
    is_sharded, latest_checkpoint, load_sharded_checkpoint, load_trainer_state, save_checkpoint, save_sharded_checkpoint,
    set_rng_state, unsharded_copy,
)
from lens_fast.training.config import TrainConfig, parse_args
from lens_fast.training.distributed import World, close_world, data_parallel, gathered, gradient_sync, init_world, shard_model
from lens_fast.training.log import MetricsLog, plot_curves
from lens_fast.training.losses import answer_nll
from lens_fast.training.optim import LeanAdamW, build_adamw, clip_grad_norm
from lens_fast.training.rollout_rewards import mask_iou_from_low_res, rollout_rewards
from lens_fast.training.validate import validate


class Stop(Exception):
    """The run cannot go on (repeated non-finite losses); the last good checkpoint is kept."""


def build_datasets(config: TrainConfig):
    """(train, val, val_full or None): val_full is the full-difficulty synthetic val split, reported
    when training uses an easier scene configuration."""
    if config.data == "refcoco":
        from lens_fast.data import RefCocoDataset

        kwargs = dict(split_by=config.split_by or None, image_root=config.image_root or None)
        return (RefCocoDataset(config.data_root, config.dataset, "train", mode="train", **kwargs),
                RefCocoDataset(config.data_root, config.dataset, config.val_split, mode="eval", **kwargs), None)
    easy = SyntheticConfig(kinds=config.synthetic_kinds, min_radius=config.synthetic_min_radius,
                           max_radius=config.synthetic_max_radius, max_objects=config.synthetic_max_objects)
    train = SyntheticRefDataset("train", size=10**9, seed=config.seed, config=easy)
    val = SyntheticRefDataset(config.val_split, seed=config.seed, config=easy)
    full = SyntheticRefDataset(config.val_split, seed=config.seed) if easy != SyntheticConfig() else None
    return train, val, full


def resolve_precision(config: TrainConfig, device: torch.device) -> str:
    """``auto`` -> bf16-mixed on CUDA (fp32 master weights and AdamW states, bf16 compute), fp32 on CPU."""
    if config.precision != "auto":
        return config.precision
    return "bf16-mixed" if device.type == "cuda" else "fp32"


def build_model(config: TrainConfig, device: torch.device, checkpoint: Optional[Path] = None) -> LensModel:
    """The config's model (weights in bf16 for ``precision=bf16``, else fp32), or the weights of a
    training ``checkpoint`` being resumed."""
    model_options = dict(mode=config.mode, prompt_style=config.prompt_style, num_queries=config.num_queries,
                         max_new_tokens=config.max_new_tokens)
    dtype = torch.bfloat16 if resolve_precision(config, device) == "bf16" else torch.float32
    if checkpoint is not None:
        model = from_pretrained(checkpoint, device=device, dtype=dtype)
    elif config.model == "tiny":
        model = build_tiny_lens(seed=config.seed, **model_options).to(device=device, dtype=dtype)
    elif config.model == "components":
        model = from_components(config.qwen_dir, config.sam_checkpoint, config.sam_type, device=device, dtype=dtype,
                                **model_options)
    else:
        model = from_pretrained(config.model, device=device, dtype=dtype)
    if config.gradient_checkpointing:
        model.policy.model.gradient_checkpointing_enable()
    return model


def parameters_of(model: LensModel, parts: Sequence[str]) -> list[torch.nn.Parameter]:
    """Mark ``parts`` (names of ``LensModel.parts()``) trainable, everything else frozen; return them."""
    groups = model.parts()
    model.requires_grad_(False)
    for part in parts:
        for module in groups[part]:
            module.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(params, lr: float, steps: int, config: TrainConfig):
    """(AdamW with the config's memory options, its LR schedule: linear warm-up, then cosine to 0.1 x or constant)."""
    optimizer = build_adamw(params, lr, config.weight_decay, states=config.optimizer_states,
                            offload=config.optimizer_offload, step_in_backward=config.step_in_backward)

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv: Optional[Sequence[str]] = None) -> int:
    config, args = parse_args(argv)
    if args.plan:
        from lens_fast.training.plan import print_plan

        return print_plan(config, str(args.config) if args.config else "")
    try:
        config.check_paths()
        config.check_world(int(os.environ.get("WORLD_SIZE", "1")))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    world = init_world(config.device, config.sharding)
    if world.is_main:  # the model layer logs its choices (attention implementation, ...)
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("lens_fast").setLevel(logging.INFO)
    try:
        return train(config, world)
    finally:
        close_world(world)


def train(config: TrainConfig, world: World) -> int:
    """The run of ``config`` in this process of ``world``; returns the exit status."""
    say = print if world.is_main else (lambda *a, **k: None)
    output_dir = Path(config.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    checkpoints = output_dir / "checkpoints"
    device = world.device
    config_dict = dataclasses.asdict(config)

    # ---- resume? ---------------------------------------------------------------------------------------
    resume_from = latest_checkpoint(checkpoints) if config.resume else None
    if config.resume and resume_from is None:
        say(f"error: --resume: no checkpoint under {checkpoints}", file=sys.stderr)
        return 2
    state = None
    if resume_from is not None:
        try:
            state = load_trainer_state(resume_from, config_dict)
        except ValueError as error:
            say(f"error: {error}", file=sys.stderr)
            return 2
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")

    # ---- data, model -------------------------------------------------------------------------------------
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    mixed = resolve_precision(config, device) == "bf16-mixed"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed)  # noqa: E731
    train_set, val_set, val_full = build_datasets(config)
    sharded = config.sharding == "fsdp"
    model = build_model(config, device, resume_from if resume_from is not None and not is_sharded(resume_from) else None)
    if sharded:
        shard_model(model, world)  # before any optimiser: FSDP2 puts sharded parameters in place
    total_steps = config.stage1_steps + config.stage2_steps
    step, position, bad_steps = 0, 0, 0
    val_history: list[dict] = []
    wall_before = 0.0
    if state is not None:
        step, position, val_history, wall_before = state["step"], state["position"], state["val"], state["wall_time"]
        set_rng_state(state["rng"])
        say(f"resuming from {resume_from} at step {step} ({world.size} process(es))")
    log = MetricsLog(output_dir, resume_step=step if state is not None else None) if world.is_main else None

    def log_val(entry: dict) -> None:
        log.write({"step": entry["step"], "stage": "val", **{f"val/{k}": v for k, v in entry.items() if isinstance(v, float)}})

    if state is not None and world.is_main:  # the checkpoint's validation at its own step (the log restarts there)
        for entry in val_history:
            if entry["step"] == step:
                log_val(entry)

    stop_signal: list[int] = []
    previous_handlers = {sig: signal.signal(sig, lambda number, frame: stop_signal.append(number))
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def evaluate(after: str) -> None:
        with gathered(model):  # FSDP2: every process all-gathers the parameters, process 0 validates
            if world.is_main:
                with autocast():
                    entry = {"after": after, "step": step, **validate(model, val_set, size=config.val_size, batch_size=config.val_batch_size)}
                    if val_full is not None:
                        entry["full"] = validate(model, val_full, size=config.val_size, batch_size=config.val_batch_size)
                val_history.append(entry)
                say(f"val after {after}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if isinstance(v, float)), flush=True)
                log_val(entry)
            world.barrier()

    def checkpoint(name: str = "latest_step") -> None:
        trainer_state = {"config": config_dict, "step": step, "position": batches.position, "val": val_history,
                         "scheduler": scheduler.state_dict(), "wall_time": wall_before + time.time() - started}
        if sharded:  # every process writes its shards; stage1 and final also as full save_pretrained files
            save_sharded_checkpoint(checkpoints, name, model, optimizer, trainer_state, world,
                                    full_model=name in ("stage1", "final"))
            return
        if world.is_main:
            save_checkpoint(checkpoints, name, model, {**trainer_state, "optimizer": optimizer.state_dict()})
        world.barrier()

    started = time.time()
    if not val_history:
        evaluate("start")
    # a checkpoint written at the last stage-1 step, before stage 1's validation and checkpoint, is still in stage 1
    stage1_done = step > config.stage1_steps or any(e["after"] == "stage1" for e in val_history)
    stage = "align" if config.stage1_steps and not stage1_done else "grpo"
    optimizer = scheduler = reference = forward = None
    trains_encoders = False  # the stage trains the policy's vision tower or SAM's image encoder

    def enter_stage(name: str) -> None:
        nonlocal optimizer, scheduler, reference, forward, trains_encoders
        parts, lr, steps = (
            (config.stage1_train, config.stage1_lr, config.stage1_steps) if name == "align"
            else (config.stage2_train, config.lr, config.stage2_steps)
        )
        if isinstance(optimizer, LeanAdamW):
            optimizer.close()  # its step-in-backward hooks leave the parameters
        optimizer, scheduler = build_optimizer(parameters_of(model, parts), lr, steps, config)
        trains_encoders = any(p.requires_grad for part in ("vision", "sam_encoder") for m in model.parts()[part] for p in m.parameters())
        forward = model if sharded else data_parallel(model, world)  # after the trainable parameters are chosen
        if name == "grpo" and config.beta > 0:  # LENS: the reference is the stage-1 model (whole on every process)
            stage1 = checkpoints / "stage1"
            if stage1.exists():
                reference = from_pretrained(stage1, device=device)
            else:
                reference = unsharded_copy(model) if sharded else copy.deepcopy(model)
            reference.requires_grad_(False).eval()

    batches = Batches(train_set, model, position, world)
    enter_stage(stage)
    if state is not None:
        if sharded:
            load_sharded_checkpoint(resume_from, model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    model.train()
    bar = tqdm(total=total_steps, initial=step, disable=not (config.progress and world.is_main), unit="step", dynamic_ncols=True)
    last_log = time.time()
    try:
        while step < total_steps:
            if stage == "align" and step >= config.stage1_steps:
                evaluate("stage1")
                checkpoint("stage1")
                stage = "grpo"
                enter_stage(stage)
                model.train()
            tick = time.time()
            record: dict = {"step": step, "stage": stage}

            # ---- rollout -------------------------------------------------------------------------------
            global_size = config.stage1_batch_size if stage == "align" else config.batch_size
            first_prompt = batches.position + world.share(global_size)[0]
            samples, images = batches.next(global_size)
            expressions = [s.expression for s in samples]
            prompts = model.tokenize_prompts(images, expressions)
            gt_masks = [torch.from_numpy(s.mask).to(device) for s in samples]
            gt_boxes = torch.from_numpy(np.stack([s.box for s in samples]))
            group = 1 if stage == "align" else config.num_generations
            passes = micro_batches(len(samples), group, config.micro_batch)
            cache = None  # image encodings the update passes share (None: each pass encodes its images)
            if stage == "align":
                ids, mask = model.answer_ids(expressions, gt_boxes, images.policy_sizes, images.original_sizes)
                completions = Completions(ids, mask, torch.zeros(len(samples), dtype=torch.bool, device=device))
                temperature, loss_mask = 1.0, completions.mask
            else:
                temperature = config.temperature
                # One encoding serves sampling and the update: without gradient when the encoders are frozen,
                # with it when they train and one pass takes every row (the graph waits for that backward; not
                # under FSDP2, whose root parameters are gathered with grad only inside the model's forward).
                keep_graph = trains_encoders and len(passes) == 1 and not sharded
                generators = sampling_generators(config.seed, step, first_prompt, len(samples), device)
                with gathered(model):  # FSDP2: every parameter for the rollout (generation lengths differ by process)
                    with torch.set_grad_enabled(keep_graph), autocast():
                        encoding = model.encode(images, sam=not trains_encoders)
                    model.eval()
                    with torch.no_grad(), autocast():
                        completions = model.generate(
                            prompts, encoding.detach(), num_generations=group, max_new_tokens=config.max_new_tokens,
                            temperature=temperature, top_p=config.top_p, top_k=config.top_k, generator=generators,
                            kv_cache=config.kv_cache,
                        )
                    model.train()
                cache = encoding if not trains_encoders or keep_graph else None
                texts = model.decode_text(completions)
                loss_mask = completions.mask & ~completions.truncated[:, None] if config.mask_truncated_completions else completions.mask
                ref_logp = None
                if reference is not None:  # its vision tower is the model's while stage 2 does not train it
                    with torch.no_grad(), autocast():
                        ref_cache = encoding.detach() if "vision" not in config.stage2_train else reference.encode(images, sam=False)
                        ref_logp = torch.cat([reference_logprobs(reference, prompts, ref_cache, completions, p, temperature) for p in passes])
            record["time/rollout"] = time.time() - tick

            # ---- forward, reward, advantage, loss, step (num_iterations updates per rollout) ---------------
            # Each update runs over ``passes`` (micro-batches of rows) whose losses add up to the step's.
            rows = len(completions.ids)
            tokens = world.mean({"tokens": float(loss_mask.sum())})["tokens"] if stage == "grpo" else None  # (DDP averages)

            def pass_forward(p: MicroBatch, cache: Optional[ImageCache]):
                return forward(images.select(p.prompts), prompts.select(p.prompts), completions.select(p.rows), temperature,
                               cache=cache.select(p.prompts) if cache is not None else None)

            def score(prompt_ids: list[int], row_slice: slice, low_res: torch.Tensor) -> dict[str, torch.Tensor]:
                tock = time.time()
                scored = score_rollout(config, model, texts[row_slice], low_res, [gt_masks[i] for i in prompt_ids], gt_boxes[prompt_ids],
                                       images.policy_sizes[prompt_ids], images.original_sizes[prompt_ids], group)
                record["time/reward"] = record.get("time/reward", 0.0) + time.time() - tock
                return scored

            scores: dict[str, torch.Tensor] = {}  # per row: rewards, mask IoU, advantage
            if stage == "grpo":
                old_logp = torch.zeros(loss_mask.shape, device=device)
                group_local = config.scale_rewards != "batch" and config.reward_aggregation == "sum"
                if len(passes) > 1 and not (group_local and all(p.whole_groups for p in passes)):
                    with torch.no_grad(), autocast():  # the advantages need rewards from more than one pass first
                        low_res = torch.cat([pass_forward(p, cache)[1] for p in passes])
                    scores = score(list(range(len(samples))), slice(0, rows), low_res)
            scored_ahead = bool(scores)
            finite = True
            for iteration in range(1 if stage == "align" else config.num_iterations):
                optimizer.zero_grad(set_to_none=True)
                sums = dict.fromkeys(("loss", "bce", "dice", "answer_nll" if stage == "align" else "policy_loss"), 0.0)
                kl = clipped = 0.0
                for p in passes:
                    share = (p.rows.stop - p.rows.start) / rows
                    with gradient_sync(forward, p.last):
                        with autocast():  # a frozen encoding serves every update; one with gradient, the first
                            logp, low_res = pass_forward(p, cache if iteration == 0 or not trains_encoders else None)
                        bce = dice = torch.zeros((), device=device)
                        if low_res.requires_grad:  # (a frozen SAM prompted by the answer has nothing to learn)
                            _, bce, dice = model.segmenter.mask_loss(low_res.view(len(p.prompts), -1, *low_res.shape[1:]),
                                                                     [gt_masks[i] for i in p.prompts])
                            bce, dice = share * bce, share * dice
                        if stage == "align":
                            nll = share * answer_nll(logp, completions.mask[p.rows])
                            loss = config.sft_weight * nll + bce + dice
                            sums["answer_nll"] += nll.item()
                        else:
                            if iteration == 0:
                                old_logp[p.rows] = logp.detach()
                                if not scored_ahead:
                                    for name, value in score(p.prompts, p.rows, low_res).items():
                                        scores.setdefault(name, torch.zeros(rows, dtype=value.dtype))[p.rows] = value
                            policy_loss, stats = grpo.policy_loss(
                                logp, old_logp[p.rows], scores["advantage"][p.rows].to(device), loss_mask[p.rows],
                                ref_logp=None if ref_logp is None else ref_logp[p.rows], beta=config.beta, epsilon=config.epsilon,
                                epsilon_high=config.epsilon_high, importance_sampling_level=config.importance_sampling_level,
                                loss_type=config.loss_type, max_completion_length=config.max_new_tokens, total_rows=rows,
                                total_tokens=tokens,
                            )
                            loss = policy_loss + config.mask_loss_weight * (bce + dice)
                            pass_tokens = float(loss_mask[p.rows].sum())
                            sums["policy_loss"] += policy_loss.item()
                            kl, clipped = kl + stats.kl * pass_tokens, clipped + stats.clip_fraction * pass_tokens
                        sums.update(loss=sums["loss"] + loss.item(), bce=sums["bce"] + bce.item(), dice=sums["dice"] + dice.item())
                        finite = not world.any(not torch.isfinite(loss))
                        if not finite:
                            break
                        loss.backward()  # DDP (all-reduce) or FSDP2 (reduce-scatter) averages gradients at the last pass
                if not finite:
                    bad_steps += 1
                    if world.is_main:
                        log.write({"step": step, "stage": stage, "skipped": "non-finite loss", "loss": None})
                    if bad_steps >= config.max_bad_steps:
                        raise Stop(f"{bad_steps} consecutive non-finite losses at step {step}")
                    if sharded:
                        model.reset_iter_state()  # FSDP2: a forward without its backward
                    break
                bad_steps = 0
                grad_norm = clip_grad_norm(optimizer, config.grad_clip or float("inf"))
                optimizer.step()
                record.update(sums, grad_norm=float(grad_norm))
                if stage == "grpo":
                    local_tokens = max(1.0, float(loss_mask.sum()))
                    record.update(kl=kl / local_tokens, clip_fraction=clipped / local_tokens)
                    if iteration == 0:
                        record.update(rollout_record(scores, group, completions))
            scheduler.step()
            step += 1
            bar.update(1)

            # ---- log / checkpoint --------------------------------------------------------------------------
            elapsed = time.time() - tick
            tokens = int(completions.mask.sum()) + prompts.attention_mask.sum().item() * group
            record.update(lr=scheduler.get_last_lr()[0], step_time=elapsed,
                          samples_per_s=world.size * len(completions.ids) / elapsed, tokens_per_s=world.size * tokens / elapsed,
                          peak_memory_gb=(torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None)
            record = world.mean(record)
            if world.is_main and (step % config.log_every == 0 or step == total_steps):
                log.write(record)
                shown = {k: record[k] for k in ("loss", "reward/total/mean", "reward/box/mean", "reward/mask/mean") if k in record}
                bar.set_postfix({k.split("/")[-2] if "/" in k else k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
            if world.any(bool(stop_signal)):
                checkpoint()
                say(f"\nstopped by a signal at step {step}; checkpoint written. Resume with --resume true "
                    f"--output-dir {output_dir}", flush=True)
                return 0
            if step % config.checkpoint_every == 0:
                checkpoint()
            if time.time() - last_log > 60 and not config.progress:
                say(f"step {step}/{total_steps} " + json.dumps({k: round(v, 4) for k, v in record.items() if isinstance(v, float)}), flush=True)
                last_log = time.time()
    except Stop as error:
        say(f"error: {error}; the last good checkpoint is kept under {checkpoints}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        batches.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    last = "stage1" if config.stage2_steps == 0 else "stage2"
    if not any(e["after"] == last for e in val_history):  # (a resumed finished run has it)
        evaluate(last)
    checkpoint("final")
    if world.is_main:
        wall = wall_before + time.time() - started
        summary = {"val": [{k: v for k, v in e.items() if k != "full"} for e in val_history], "wall_time_s": wall,
                   "steps": step, "processes": world.size}
        if val_full is not None:
            summary["val_full"] = [{"after": e["after"], **e["full"]} for e in val_history]
        records = log.records()
        summary["stage2_box_reward"] = box_reward_rise(records)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_curves(records, summary["val"], output_dir / "curves.png")
        log.close()
        say(summary_table(summary))
        say(f"wrote {output_dir}/summary.json, metrics.jsonl, curves.png, checkpoints/final")
    return 0


def reference_logprobs(reference: LensModel, prompts: PromptBatch, cache: ImageCache, completions: Completions,
                       rows: MicroBatch, temperature: float) -> torch.Tensor:
    """The reference policy's log-probs [n, L] of the completions in ``rows``."""
    hidden, _ = reference.forward_completions(prompts.select(rows.prompts), cache.select(rows.prompts), completions.select(rows.rows))
    return reference.policy.token_logprobs(hidden, completions.ids[rows.rows], temperature)


def score_rollout(config: TrainConfig, model: LensModel, texts: Sequence[str], low_res: torch.Tensor,
                  gt_masks: Sequence[torch.Tensor], gt_boxes: torch.Tensor, policy_sizes: torch.Tensor,
                  original_sizes: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    """Rewards and advantages of n = B * G rows (whole groups; ``low_res`` [n, 4e, 4e] their masks):
    ``total``, each reward component, ``mask_iou`` and ``advantage``, float [n] on the CPU."""
    mask_iou = mask_iou_from_low_res(model.segmenter, low_res, gt_masks)
    rewards = rollout_rewards(config.reward, texts, mask_iou, gt_masks, gt_boxes, policy_sizes, original_sizes,
                              cot=config.prompt_style == "cot")
    advantages = grpo.advantages(rewards.components, group, scale=config.scale_rewards, aggregation=config.reward_aggregation)
    return {"total": rewards.reward, **rewards.components, "mask_iou": mask_iou.cpu(), "advantage": advantages}


def rollout_record(scores: dict[str, torch.Tensor], group: int, completions: Completions) -> dict[str, float]:
    """The logged statistics of a rollout's rewards and completions."""
    record = {}
    for name, value in scores.items():
        if name not in ("mask_iou", "advantage"):
            record[f"reward/{name}/mean"], record[f"reward/{name}/std"] = float(value.float().mean()), float(value.float().std())
    return {**record, "zero_variance_groups": grpo.zero_variance_fraction(scores["total"], group),
            "mask_iou": float(scores["mask_iou"].mean()), "completion_length": float(completions.lengths.float().mean()),
            "truncated": float(completions.truncated.float().mean())}


def box_reward_rise(records: list[dict]) -> Optional[dict]:
    """Mean stage-2 box reward over the first and the last tenth of the logged stage-2 steps."""
    values = [r["reward/box/mean"] for r in records if r.get("stage") == "grpo" and "reward/box/mean" in r]
    if not values:
        return None
    tenth = max(1, len(values) // 10)
    first, last = sum(values[:tenth]) / tenth, sum(values[-tenth:]) / tenth
    return {"first_tenth": first, "last_tenth": last, "rise": last - first}


def summary_table(summary: dict) -> str:
    lines = ["validation (held out)   gIoU    cIoU   box IoU"]
    for name in ("val", "val_full"):
        for entry in summary.get(name, []):
            label = f"{'' if name == 'val' else 'full '}{entry['after']}"
            lines.append(f"  {label:<20} {entry['mask_iou']:.3f}   {entry['cIoU']:.3f}   {entry['box_iou']:.3f}")
    rise = summary.get("stage2_box_reward")
    if rise:
        lines.append(f"stage-2 box reward: {rise['first_tenth']:.3f} -> {rise['last_tenth']:.3f} (rise {rise['rise']:+.3f})")
    lines.append(f"wall time {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
