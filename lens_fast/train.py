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
from lens_fast.model import Completions, LensModel, build_tiny_lens, from_components, from_pretrained
from lens_fast.training import grpo
from lens_fast.training.batches import Batches, sampling_generators
from lens_fast.training.checkpoint import (
    is_sharded, latest_checkpoint, load_sharded_checkpoint, load_trainer_state, save_checkpoint, save_sharded_checkpoint,
    set_rng_state, unsharded_copy,
)
from lens_fast.training.config import TrainConfig, parse_args
from lens_fast.training.distributed import World, close_world, data_parallel, gathered, init_world, shard_model
from lens_fast.training.log import MetricsLog, plot_curves
from lens_fast.training.losses import answer_nll
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


def build_optimizer(params, lr: float, steps: int, config: TrainConfig, device: torch.device):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay, fused=device.type == "cuda")

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

        return print_plan(config)
    try:
        config.check_paths()
    except FileNotFoundError as error:
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

    def enter_stage(name: str) -> None:
        nonlocal optimizer, scheduler, reference, forward
        parts, lr, steps = (
            (config.stage1_train, config.stage1_lr, config.stage1_steps) if name == "align"
            else (config.stage2_train, config.lr, config.stage2_steps)
        )
        optimizer, scheduler = build_optimizer(parameters_of(model, parts), lr, steps, config, device)
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
            if stage == "align":
                ids, mask = model.answer_ids(expressions, gt_boxes, images.policy_sizes, images.original_sizes)
                completions = Completions(ids, mask, torch.zeros(len(samples), dtype=torch.bool, device=device))
                group, temperature = 1, 1.0
            else:
                group, temperature = config.num_generations, config.temperature
                generators = sampling_generators(config.seed, step, first_prompt, len(samples), device)
                model.eval()
                with torch.no_grad(), autocast(), gathered(model):  # FSDP2: generation lengths differ by process
                    completions = model.generate(
                        prompts, model.encode(images, sam=False), num_generations=group, max_new_tokens=config.max_new_tokens,
                        temperature=temperature, top_p=config.top_p, top_k=config.top_k, generator=generators,
                    )
                model.train()
                texts = model.decode_text(completions)
                loss_mask = completions.mask & ~completions.truncated[:, None] if config.mask_truncated_completions else completions.mask
                ref_logp = None
                if reference is not None:
                    with torch.no_grad(), autocast():
                        ref_hidden, _ = reference.forward_completions(prompts, reference.encode(images, sam=False), completions)
                        ref_logp = reference.policy.token_logprobs(ref_hidden, completions.ids, temperature)
            record["time/rollout"] = time.time() - tick

            # ---- forward, reward, advantage, loss, step (num_iterations updates per rollout) ---------------
            old_logp = adv = None
            for iteration in range(1 if stage == "align" else config.num_iterations):
                with autocast():
                    logp, low_res = forward(images, prompts, completions, temperature)
                bce = dice = torch.zeros((), device=device)
                if low_res.requires_grad:  # (a frozen SAM prompted by the answer has nothing to learn)
                    _, bce, dice = model.segmenter.mask_loss(low_res.view(len(samples), group, *low_res.shape[1:]), gt_masks)
                if stage == "align":
                    nll = answer_nll(logp, completions.mask)
                    loss = config.sft_weight * nll + bce + dice
                    record.update(answer_nll=nll.item())
                else:
                    if iteration == 0:
                        tock = time.time()
                        mask_iou = mask_iou_from_low_res(model.segmenter, low_res, gt_masks)
                        rewards = rollout_rewards(config.reward, texts, mask_iou, gt_masks, gt_boxes, images.policy_sizes,
                                                  images.original_sizes, cot=config.prompt_style == "cot")
                        adv = grpo.advantages(rewards.components, group, scale=config.scale_rewards,
                                              aggregation=config.reward_aggregation).to(device)
                        old_logp = logp.detach()
                        record["time/reward"] = time.time() - tock
                        for name, value in {"total": rewards.reward, **rewards.components}.items():
                            record[f"reward/{name}/mean"] = float(value.float().mean())
                            record[f"reward/{name}/std"] = float(value.float().std())
                        record.update(zero_variance_groups=grpo.zero_variance_fraction(rewards.reward, group),
                                      mask_iou=float(mask_iou.mean()),
                                      completion_length=float(completions.lengths.float().mean()),
                                      truncated=float(completions.truncated.float().mean()))
                    policy_loss, stats = grpo.policy_loss(
                        logp, old_logp, adv, loss_mask, ref_logp=ref_logp, beta=config.beta, epsilon=config.epsilon,
                        epsilon_high=config.epsilon_high, importance_sampling_level=config.importance_sampling_level,
                        loss_type=config.loss_type, max_completion_length=config.max_new_tokens,
                    )
                    loss = policy_loss + config.mask_loss_weight * (bce + dice)
                    record.update(policy_loss=policy_loss.item(), kl=stats.kl, clip_fraction=stats.clip_fraction)
                record.update(loss=loss.item(), bce=bce.item(), dice=dice.item())
                optimizer.zero_grad(set_to_none=True)
                if world.any(not torch.isfinite(loss)):
                    bad_steps += 1
                    if world.is_main:
                        log.write({"step": step, "stage": stage, "skipped": "non-finite loss", "loss": None})
                    if bad_steps >= config.max_bad_steps:
                        raise Stop(f"{bad_steps} consecutive non-finite losses at step {step}")
                    if sharded:
                        model.reset_iter_state()  # FSDP2: a forward without its backward
                    break
                bad_steps = 0
                loss.backward()  # DDP (all-reduce) or FSDP2 (reduce-scatter) averages the gradients over processes here
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip or float("inf"))
                optimizer.step()
                record["grad_norm"] = float(grad_norm)
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
