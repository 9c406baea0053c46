"""LENS-style training: ``python -m lens_fast.train`` (``--help`` lists every option).

Read top to bottom: config -> data -> model -> for each step: ``rollout()`` -> ``score()`` -> ``update()``
-> log / checkpoint, plain functions passing one :class:`Rollout`; :class:`TrainerState` is exactly what
a checkpoint saves; a stage is data (:class:`Stage`). Stage 1 aligns (teacher-forced ground-truth answers: BCE + Dice on the masks, plus the
answer's cross-entropy for a policy that cannot yet write boxes); stage 2 is GRPO on sampled answers
with the policy's own masks, plus BCE + Dice. Everything else lives in ``lens_fast.training``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from lens_fast.data import SyntheticConfig, SyntheticRefDataset
from lens_fast.model import (
    Completions, ImageBatch, ImageCache, LensModel, PromptBatch, build_tiny_lens, from_components, from_pretrained,
)
from lens_fast.training import grpo
from lens_fast.training.batches import Batches, MicroBatch, micro_batches, sampling_generators
from lens_fast.training.checkpoint import (
    is_sharded, latest_checkpoint, load_sharded_checkpoint, load_trainer_state, periodic_name, save_checkpoint,
    save_sharded_checkpoint, set_rng_state,
)
from lens_fast.training.config import TrainConfig, parse_args
from lens_fast.training.distributed import World, close_world, data_parallel, gathered, gradient_sync, init_world, shard_model
from lens_fast.training.log import MetricsLog, plot_curves, reward_rise
from lens_fast.training.losses import answer_nll
from lens_fast.training.optim import LeanAdamW, build_adamw, clip_grad_norm
from lens_fast.training.rollout_rewards import mask_iou_from_low_res, rollout_rewards
from lens_fast.training.validate import validate


class Stop(Exception):
    """The run cannot go on (repeated non-finite losses); the last good checkpoint is kept."""


def build_datasets(config: TrainConfig):
    """(train, val, val_full or None): val_full is the full-difficulty synthetic val split, reported
    when training uses an easier scene configuration."""
    if config.data in ("refcoco", "hf"):
        from lens_fast.data import build_ref_datasets

        train, val = build_ref_datasets(config.data, config.data_root, config.dataset, config.val_split,
                                        split_by=config.split_by or None, image_root=config.image_root or None,
                                        skip_bad_rows=config.skip_bad_rows)
        return train, val, None
    easy = SyntheticConfig(kinds=config.synthetic_kinds, min_radius=config.synthetic_min_radius,
                           max_radius=config.synthetic_max_radius, max_objects=config.synthetic_max_objects,
                           coordinate_ramp=config.synthetic_coordinate_ramp)
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
    """(AdamW with the config's memory options, its LR schedule: transformers' linear warm-up from 0, then
    cosine to 0.1 x ``lr`` over ``steps``, or constant)."""
    optimizer = build_adamw(params, lr, config.weight_decay, states=config.optimizer_states,
                            offload=config.optimizer_offload, step_in_backward=config.step_in_backward)
    if config.lr_schedule == "constant":
        return optimizer, get_constant_schedule_with_warmup(optimizer, config.warmup_steps)
    return optimizer, get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, steps, min_lr_rate=0.1)


@dataclass(frozen=True)
class Stage:
    """One stage of the run, as data. ``group``: completions per prompt (1: the teacher-forced answer).
    Its loss: ``answer_weight`` x the answer's cross-entropy + ``mask_weight`` x (BCE + Dice) of the masks
    (+ the GRPO policy loss in stage ``grpo``)."""

    name: str  # align (teacher-forced ground-truth answers) | grpo (sampled answers, rewarded)
    steps: int
    parts: tuple[str, ...]  # the trained parts of LensModel.parts()
    lr: float
    batch_size: int  # prompts per step, over every process
    group: int
    updates: int  # optimizer steps per rollout
    answer_weight: float
    mask_weight: float

    @property
    def grpo(self) -> bool:
        return self.name == "grpo"


def stages_of(config: TrainConfig) -> dict[str, Stage]:
    return {"align": Stage("align", config.stage1_steps, config.stage1_train, config.stage1_lr, config.stage1_batch_size,
                           group=1, updates=1, answer_weight=config.sft_weight, mask_weight=1.0),
            "grpo": Stage("grpo", config.stage2_steps, config.stage2_train, config.lr, config.batch_size,
                          group=config.num_generations, updates=config.num_iterations, answer_weight=0.0,
                          mask_weight=config.mask_loss_weight)}


@dataclass
class TrainerState:
    """Where the run is: exactly what a checkpoint saves (with the RNG states). ``position``: where the
    next global batch starts in the training data; ``val``: every validation so far."""

    step: int = 0
    stage: str = "align"
    position: int = 0
    val: list = field(default_factory=list)
    wall_time: float = 0.0  # seconds before this process started (a resumed run's earlier time)
    optimizer: Optional[torch.optim.Optimizer] = None  # the stage's
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None

    def saved(self, wall_time: float) -> dict:
        """The picklable state (the optimizer's is added by the caller: whole, or sharded by FSDP2)."""
        return {"step": self.step, "stage": self.stage, "position": self.position, "val": self.val,
                "scheduler": self.scheduler.state_dict(), "wall_time": wall_time}


@dataclass
class Run:
    """What every step uses: the config, this process's world, the model and, for the current stage, the
    module its update runs through (DDP-wrapped unless FSDP2), the KL reference and whether the stage
    trains an image encoder (the policy's vision tower or SAM's)."""

    config: TrainConfig
    world: World
    model: LensModel
    checkpoints: Path
    forward: Optional[torch.nn.Module] = None
    reference: Optional[LensModel] = None
    trains_encoders: bool = False

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def sharded(self) -> bool:
        return self.config.sharding == "fsdp"

    def autocast(self):
        mixed = resolve_precision(self.config, self.device) == "bf16-mixed"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mixed)


@dataclass
class Rollout:
    """One step's batch and the policy's answers: N = B * G rows, row b * G + g answering prompt b."""

    images: ImageBatch
    prompts: PromptBatch
    gt_masks: list[torch.Tensor]  # uint8 [H, W] per prompt, on the device
    gt_boxes: torch.Tensor  # float [B, 4], xyxy pixels of the original images
    completions: Completions
    loss_mask: torch.Tensor  # bool [N, L]: the tokens the loss counts
    temperature: float
    passes: list[MicroBatch]  # the update's forward/backward passes over the rows
    cache: Optional[ImageCache] = None  # image encodings shared by the update (None: each pass encodes)
    texts: list[str] = field(default_factory=list)
    ref_logp: Optional[torch.Tensor] = None  # float [N, L]: the KL reference's log-probs
    old_logp: Optional[torch.Tensor] = None  # float [N, L]: the first update's (the sampling policy's)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # float [N] on the CPU: rewards, mask_iou, advantage
    scored_pass: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # score()'s (logp, low_res) with its graph (one pass)
    times: dict[str, float] = field(default_factory=dict)


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
    world = init_world(config.device, config.sharding, config.dist_timeout_minutes)
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
    config_dict = dataclasses.asdict(config)
    stages = stages_of(config)

    # ---- resume? ---------------------------------------------------------------------------------------
    resume_from = latest_checkpoint(checkpoints) if config.resume else None
    if config.resume and resume_from is None:
        say(f"error: --resume: no checkpoint under {checkpoints}", file=sys.stderr)
        return 2
    saved = None
    if resume_from is not None:
        try:
            saved = load_trainer_state(resume_from, config_dict)
        except ValueError as error:
            say(f"error: {error}", file=sys.stderr)
            return 2
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")

    # ---- data, model, trainer state --------------------------------------------------------------------
    if config.threads:  # 0: torch's own choice (OMP_NUM_THREADS when set, else the cores), left alone
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    train_set, val_set, val_full = build_datasets(config)
    model = build_model(config, world.device, resume_from if resume_from is not None and not is_sharded(resume_from) else None)
    if config.sharding == "fsdp":
        shard_model(model, world)  # before any optimiser: FSDP2 puts sharded parameters in place
    run = Run(config, world, model, checkpoints)
    state = TrainerState(stage="align" if config.stage1_steps else "grpo")
    if saved is not None:
        state = TrainerState(saved["step"], saved["stage"], saved["position"], saved["val"], saved["wall_time"])
        set_rng_state(saved["rng"])
        say(f"resuming from {resume_from} at step {state.step} ({world.size} process(es))")
    log = MetricsLog(output_dir, resume_step=state.step if saved is not None else None) if world.is_main else None
    if saved is not None and world.is_main:  # the checkpoint's validation at its own step (the log restarts there)
        for entry in state.val:
            if entry["step"] == state.step:
                log_validation(log, entry)
    batches = Batches(train_set, model, state.position, world)
    enter_stage(run, state, stages[state.stage])
    if saved is not None:
        if run.sharded:
            load_sharded_checkpoint(resume_from, model, state.optimizer)
        else:
            state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
    if state.stage == "grpo":
        run.reference = reference_model(run)

    stop_signal: list[int] = []
    previous_handlers = {sig: signal.signal(sig, lambda number, frame: stop_signal.append(number))
                         for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.time()
    wall_time = lambda: state.wall_time + time.time() - started  # noqa: E731
    total_steps = config.stage1_steps + config.stage2_steps
    bar = tqdm(total=total_steps, initial=state.step, disable=not (config.progress and world.is_main), unit="step",
               dynamic_ncols=True)
    last_print, bad_steps = time.time(), 0
    if not state.val:
        evaluate(run, state, "start", val_set, val_full, log)
    model.train()
    try:
        while state.step < total_steps:
            if state.stage == "align" and state.step >= config.stage1_steps:  # the stage boundary
                evaluate(run, state, "stage1", val_set, val_full, log)
                enter_stage(run, state, stages["grpo"])  # its optimizer and schedule are what "stage1" saves
                save(run, state, "stage1", wall_time())
                run.reference = reference_model(run)
                model.train()
            stage = stages[state.stage]
            tick = time.time()
            rollout_ = rollout(run, stage, batches, state.step)
            state.position = batches.position
            if stage.grpo:
                score(run, stage, rollout_)
            record = update(run, stage, rollout_, state.optimizer)
            if record is None:  # a non-finite loss: no update this step
                bad_steps += 1
                if world.is_main:
                    log.write({"step": state.step, "stage": stage.name, "skipped": "non-finite loss", "loss": None})
                if bad_steps >= config.max_bad_steps:
                    raise Stop(f"{bad_steps} consecutive non-finite losses at step {state.step}")
                record = {}
            else:
                bad_steps = 0
            state.scheduler.step()
            state.step += 1
            bar.update(1)

            # ---- log / checkpoint --------------------------------------------------------------------------
            if record:
                record = world.mean(step_record(run, stage, state.step - 1, state.scheduler, rollout_, record, time.time() - tick))
                if world.is_main and (state.step % config.log_every == 0 or state.step == total_steps):
                    log.write(record)
                    shown = {k: record[k] for k in ("loss", "reward/total/mean", "reward/box/mean", "reward/mask/mean") if k in record}
                    bar.set_postfix({k.split("/")[-2] if "/" in k else k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
            if world.any(bool(stop_signal)):
                save(run, state, periodic_name(state.step), wall_time())
                say(f"\nstopped by a signal at step {state.step}; checkpoint written. Resume with --resume true "
                    f"--output-dir {output_dir}", flush=True)
                return 0
            if state.step % config.checkpoint_every == 0:
                save(run, state, periodic_name(state.step), wall_time())
            if time.time() - last_print > 60 and not config.progress and record:
                say(f"step {state.step}/{total_steps} " + json.dumps({k: round(v, 4) for k, v in record.items() if isinstance(v, float)}),
                    flush=True)
                last_print = time.time()
    except Stop as error:
        say(f"error: {error}; the last good checkpoint is kept under {checkpoints}", file=sys.stderr)
        return 1
    finally:
        bar.close()
        batches.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)

    last = "stage1" if config.stage2_steps == 0 else "stage2"
    if not any(e["after"] == last for e in state.val):  # (a resumed finished run has it)
        evaluate(run, state, last, val_set, val_full, log)
    if latest_checkpoint(checkpoints) != checkpoints / "final":  # (a resumed finished run has it)
        save(run, state, "final", wall_time())
    if world.is_main:
        write_summary(output_dir, state, val_full is not None, wall_time(), world.size, log)
    return 0


# ---- the stage's optimizer and models ----------------------------------------------------------------------------
def enter_stage(run: Run, state: TrainerState, stage: Stage) -> None:
    """Make ``stage`` the current one: its trainable parts, a fresh optimizer and LR schedule, the module
    the update runs through."""
    if isinstance(state.optimizer, LeanAdamW):
        state.optimizer.close()  # its step-in-backward hooks leave the parameters
    state.stage = stage.name
    state.optimizer, state.scheduler = build_optimizer(parameters_of(run.model, stage.parts), stage.lr, stage.steps, run.config)
    encoders = [m for part in ("vision", "sam_encoder") for m in run.model.parts()[part]]
    run.trains_encoders = any(p.requires_grad for m in encoders for p in m.parameters())
    run.forward = run.model if run.sharded else data_parallel(run.model, run.world)  # after the trainable parameters are chosen


def reference_model(run: Run) -> Optional[LensModel]:
    """LENS's KL reference, frozen, the same on every process (None when ``beta`` is 0): the stage-1
    model (``checkpoints/stage1``), or without stage 1 the starting model, rebuilt: the same model
    whether or not the run was resumed. Only the policy and the context queries are kept: the KL needs the
    completions' log-probs, not masks (SAM and the connector hold 1.6 GB in bf16 at the real sizes)."""
    if run.config.beta == 0:
        return None
    if run.config.stage1_steps:
        reference = from_pretrained(run.checkpoints / "stage1", device=run.device)
    else:
        reference = build_model(run.config, run.device)
    for unused in ("segmenter", "connector"):
        if hasattr(reference, unused):
            delattr(reference, unused)
    return reference.requires_grad_(False).eval()


# ---- one step: rollout -> score -> update ------------------------------------------------------------------------
def rollout(run: Run, stage: Stage, batches: Batches, step: int) -> Rollout:
    """The next batch and the policy's answers: the ground-truth answers (align), or G sampled completions
    per prompt with the reference's log-probs (grpo)."""
    config, model, device = run.config, run.model, run.device
    tick = time.time()
    first_prompt = batches.position + run.world.share(stage.batch_size)[0]
    samples, images = batches.next(stage.batch_size)
    expressions = [s.expression for s in samples]
    prompts = model.tokenize_prompts(images, expressions)
    gt_masks = [torch.from_numpy(s.mask).to(device) for s in samples]
    gt_boxes = torch.from_numpy(np.stack([s.box for s in samples]))
    passes = micro_batches(len(samples), stage.group, config.micro_batch)
    if not stage.grpo:
        ids, mask = model.answer_ids(expressions, gt_boxes, images.policy_sizes, images.original_sizes)
        completions = Completions(ids, mask, torch.zeros(len(samples), dtype=torch.bool, device=device))
        return Rollout(images, prompts, gt_masks, gt_boxes, completions, completions.mask, 1.0, passes,
                       times={"time/rollout": time.time() - tick})

    # One encoding serves sampling and the update: without gradient when the encoders are frozen, with it
    # when they train and one pass takes every row (the graph waits for that backward; not under FSDP2,
    # whose root parameters are gathered with grad only inside the model's forward).
    keep_graph = run.trains_encoders and len(passes) == 1 and not run.sharded
    generators = sampling_generators(config.seed, step, first_prompt, len(samples), device)
    with gathered(model):  # FSDP2: every parameter for the rollout (generation lengths differ by process)
        with torch.set_grad_enabled(keep_graph), run.autocast():
            encoding = model.encode(images, sam=not run.trains_encoders)
        model.eval()
        with torch.no_grad(), run.autocast():
            completions = model.generate(
                prompts, encoding.detach(), num_generations=stage.group, max_new_tokens=config.max_new_tokens,
                temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, generator=generators,
                kv_cache=config.kv_cache,
            )
        model.train()
    loss_mask = completions.mask & ~completions.truncated[:, None] if config.mask_truncated_completions else completions.mask
    made = Rollout(images, prompts, gt_masks, gt_boxes, completions, loss_mask, config.temperature, passes,
                   cache=encoding if not run.trains_encoders or keep_graph else None, texts=model.decode_text(completions))
    if run.reference is not None:  # its vision tower is the model's while stage 2 does not train it
        with torch.no_grad(), run.autocast():
            reference_cache = encoding.detach() if "vision" not in stage.parts else run.reference.encode(images, sam=False)
            made.ref_logp = torch.cat([reference_logprobs(run.reference, prompts, reference_cache, completions, p, made.temperature)
                                       for p in passes])
    made.times["time/rollout"] = time.time() - tick
    return made


def pass_forward(run: Run, r: Rollout, p: MicroBatch, cache: Optional[ImageCache]) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's (log-probs float [n, L], low-res mask logits [n, 4e, 4e]) of pass ``p``'s rows."""
    return run.forward(r.images.select(p.prompts), r.prompts.select(p.prompts), r.completions.select(p.rows), r.temperature,
                       cache=cache.select(p.prompts) if cache is not None else None)


def score(run: Run, stage: Stage, r: Rollout) -> None:
    """Every row's rewards and advantage (``r.scores``). The masks come from a forward pass of the policy:
    kept with its graph for the first update when one pass takes every row, else run without gradient
    (the advantages need every pass's rewards; the update repeats the passes)."""
    one_pass = len(r.passes) == 1
    with torch.set_grad_enabled(one_pass), run.autocast():
        outputs = [pass_forward(run, r, p, r.cache) for p in r.passes]
    if one_pass:
        r.scored_pass = outputs[0]
    tick = time.time()
    low_res = torch.cat([low for _, low in outputs]).detach()
    r.scores = score_rollout(run.config, run.model, r.texts, low_res, r.gt_masks, r.gt_boxes, r.images.policy_sizes,
                             r.images.original_sizes, stage.group, world=run.world)
    r.times["time/reward"] = time.time() - tick


def update(run: Run, stage: Stage, r: Rollout, optimizer: torch.optim.Optimizer) -> Optional[dict]:
    """``stage.updates`` optimizer steps on the rollout, each over its passes (whose losses add up to the
    step's); the step's statistics, or None when a loss was not finite (no step taken)."""
    world = run.world
    tokens = world.mean({"tokens": float(r.loss_mask.sum())})["tokens"] if stage.grpo else None  # (DDP averages)
    if stage.grpo:
        r.old_logp = torch.zeros(r.loss_mask.shape, device=run.device)
    record: dict = {}
    for iteration in range(stage.updates):
        optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for p in r.passes:
            with gradient_sync(run.forward, p.last):
                if iteration == 0 and r.scored_pass is not None:
                    logp, low_res = r.scored_pass
                else:
                    with run.autocast():  # a frozen encoding serves every update; one with gradient, the first
                        logp, low_res = pass_forward(run, r, p, r.cache if iteration == 0 or not run.trains_encoders else None)
                if stage.grpo and iteration == 0:
                    r.old_logp[p.rows] = logp.detach()  # the sampling policy's: the first update's ratio is 1
                loss, parts = pass_loss(run, stage, r, p, logp, low_res, tokens)
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + value
                if world.any(not torch.isfinite(loss)):
                    if run.sharded:
                        run.model.reset_iter_state()  # FSDP2: a forward without its backward
                    return None
                loss.backward()  # DDP (all-reduce) or FSDP2 (reduce-scatter) averages gradients at the last pass
        grad_norm = clip_grad_norm(optimizer, run.config.grad_clip or float("inf"))
        optimizer.step()
        if stage.grpo:
            local_tokens = max(1.0, float(r.loss_mask.sum()))
            sums.update(kl=sums.pop("kl_tokens") / local_tokens, clip_fraction=sums.pop("clipped_tokens") / local_tokens)
            if iteration == 0:
                record.update(rollout_record(r.scores, stage.group, r.completions))
        record.update(sums, grad_norm=float(grad_norm))
    return record


def pass_loss(run: Run, stage: Stage, r: Rollout, p: MicroBatch, logp: torch.Tensor, low_res: torch.Tensor,
              tokens: Optional[float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Pass ``p``'s share of the step's loss (log-probs ``logp`` [n, L], mask logits ``low_res`` [n, 4e, 4e]),
    and its parts as numbers (the KL and clipped fraction summed over the pass's tokens). ``tokens``: the
    loss tokens per process (dapo's mean)."""
    config = run.config
    share = (p.rows.stop - p.rows.start) / len(r.completions.ids)
    bce = dice = torch.zeros((), device=run.device)
    if low_res.requires_grad:  # (a frozen SAM prompted by the answer has nothing to learn)
        _, bce, dice = run.model.segmenter.mask_loss(low_res.view(len(p.prompts), -1, *low_res.shape[1:]),
                                                     [r.gt_masks[i] for i in p.prompts])
        bce, dice = share * bce, share * dice
    loss = stage.mask_weight * (bce + dice)
    parts = {"bce": bce.item(), "dice": dice.item()}
    if stage.answer_weight:
        nll = share * answer_nll(logp, r.completions.mask[p.rows])
        loss = loss + stage.answer_weight * nll
        parts["answer_nll"] = nll.item()
    if stage.grpo:
        policy_loss, stats = grpo.policy_loss(
            logp, r.old_logp[p.rows], r.scores["advantage"][p.rows].to(run.device), r.loss_mask[p.rows],
            ref_logp=None if r.ref_logp is None else r.ref_logp[p.rows], beta=config.beta, epsilon=config.epsilon,
            epsilon_high=config.epsilon_high, importance_sampling_level=config.importance_sampling_level,
            loss_type=config.loss_type, max_completion_length=config.max_new_tokens, total_rows=len(r.completions.ids),
            total_tokens=tokens,
        )
        loss = loss + policy_loss
        pass_tokens = float(r.loss_mask[p.rows].sum())
        parts.update(policy_loss=policy_loss.item(), kl_tokens=stats.kl * pass_tokens,
                     clipped_tokens=stats.clip_fraction * pass_tokens)
    parts["loss"] = loss.item()
    return loss, parts


def step_record(run: Run, stage: Stage, step: int, scheduler: torch.optim.lr_scheduler.LRScheduler, r: Rollout,
                record: dict, elapsed: float) -> dict:
    """The logged line of step ``step`` (before averaging over processes); ``lr``: the next step's."""
    tokens = int(r.completions.mask.sum()) + r.prompts.attention_mask.sum().item() * stage.group
    rows = len(r.completions.ids)
    device = run.device
    return {"step": step, "stage": stage.name, **r.times, **record, "lr": scheduler.get_last_lr()[0],
            "step_time": elapsed, "samples_per_s": run.world.size * rows / elapsed,
            "tokens_per_s": run.world.size * tokens / elapsed,
            "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None}


# ---- validation, checkpoints, the summary ------------------------------------------------------------------------
def evaluate(run: Run, state: TrainerState, after: str, val_set, val_full, log: Optional[MetricsLog]) -> None:
    """Held-out validation of the model as it is ``after`` a point of the run, recorded in ``state.val``."""
    config, world = run.config, run.world
    with gathered(run.model), run.autocast():  # FSDP2: every process all-gathers the parameters; each validates its share
        entry = {"after": after, "step": state.step,
                 **validate(run.model, val_set, size=config.val_size, batch_size=config.val_batch_size, world=world)}
        if val_full is not None:
            entry["full"] = validate(run.model, val_full, size=config.val_size, batch_size=config.val_batch_size, world=world)
    state.val.append(entry)  # every process: the same figures
    if world.is_main:
        print(f"val after {after}: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.items() if isinstance(v, float)), flush=True)
        log_validation(log, entry)


def log_validation(log: MetricsLog, entry: dict) -> None:
    log.write({"step": entry["step"], "stage": "val", **{f"val/{k}": v for k, v in entry.items() if isinstance(v, float)}})


def save(run: Run, state: TrainerState, name: str, wall_time: float) -> None:
    """Checkpoint ``name`` of the trainer state (collective). FSDP2: every process writes its shards;
    ``stage1`` and ``final`` also as full ``save_pretrained`` files."""
    saved = {"config": dataclasses.asdict(run.config), **state.saved(wall_time)}
    keep = run.config.keep_checkpoints
    if run.sharded:
        save_sharded_checkpoint(run.checkpoints, name, run.model, state.optimizer, saved, run.world,
                                full_model=name in ("stage1", "final"), keep=keep)
        return
    if run.world.is_main:
        save_checkpoint(run.checkpoints, name, run.model, {**saved, "optimizer": state.optimizer.state_dict()}, keep=keep)
    run.world.barrier()


def write_summary(output_dir: Path, state: TrainerState, has_full: bool, wall_time: float, processes: int,
                  log: MetricsLog) -> None:
    """summary.json, curves.png and the printed table of the held-out figures."""
    summary = {"val": [{k: v for k, v in e.items() if k != "full"} for e in state.val], "wall_time_s": wall_time,
               "steps": state.step, "processes": processes}
    if has_full:
        summary["val_full"] = [{"after": e["after"], **e["full"]} for e in state.val]
    records = log.records()
    summary["stage2_rewards"] = reward_rise(records)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(records, summary["val"], output_dir / "curves.png")
    log.close()
    print(summary_table(summary))
    print(f"wrote {output_dir}/summary.json, metrics.jsonl, curves.png, checkpoints/final")


def reference_logprobs(reference: LensModel, prompts: PromptBatch, cache: ImageCache, completions: Completions,
                       rows: MicroBatch, temperature: float) -> torch.Tensor:
    """The reference policy's log-probs [n, L] of the completions in ``rows``."""
    hidden, _ = reference.forward_completions(prompts.select(rows.prompts), cache.select(rows.prompts), completions.select(rows.rows))
    return reference.policy.token_logprobs(hidden, completions.ids[rows.rows], temperature)


def score_rollout(config: TrainConfig, model: LensModel, texts: Sequence[str], low_res: torch.Tensor,
                  gt_masks: Sequence[torch.Tensor], gt_boxes: torch.Tensor, policy_sizes: torch.Tensor,
                  original_sizes: torch.Tensor, group: int, world: Optional[World] = None) -> dict[str, torch.Tensor]:
    """Rewards and advantages of n = B * G rows (whole groups; ``low_res`` [n, 4e, 4e] their masks):
    ``total``, each reward component, ``mask_iou`` and ``advantage``, float [n] on the CPU."""
    mask_iou = mask_iou_from_low_res(model.segmenter, low_res, gt_masks)
    rewards = rollout_rewards(config.reward, texts, mask_iou, gt_masks, gt_boxes, policy_sizes, original_sizes,
                              cot=config.prompt_style == "cot")
    advantages = grpo.advantages(rewards.components, group, scale=config.scale_rewards, aggregation=config.reward_aggregation,
                                 world=world)
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


VAL_COLUMNS = (("gIoU", "mask_iou"), ("cIoU", "cIoU"), ("box IoU", "box_iou"), ("box Acc@0.5", "box_acc"))


def summary_table(summary: dict) -> str:
    """The printed end of a run: every held-out validation, then what stage 2 (GRPO) changed: the
    stage-1 and stage-2 figures side by side with the difference, and each reward component's rise."""
    lines = ["validation (held out)   " + "  ".join(f"{name:>11}" for name, _ in VAL_COLUMNS)]
    for name in ("val", "val_full"):
        for entry in summary.get(name, []):
            label = f"{'' if name == 'val' else 'full '}{entry['after']}"
            lines.append(f"  {label:<21} " + "  ".join(f"{entry[key]:>11.3f}" for _, key in VAL_COLUMNS))
    after = {e["after"]: e for e in summary.get("val", [])}
    if "stage1" in after and "stage2" in after:
        lines.append("what stage 2 (GRPO) changed, held out:   after stage 1   after stage 2   difference")
        for name, key in VAL_COLUMNS:
            before, now = after["stage1"][key], after["stage2"][key]
            lines.append(f"  {name:<38} {before:>13.3f}   {now:>13.3f}   {now - before:>+10.3f}")
    rises = summary.get("stage2_rewards") or {}
    if rises:
        lines.append("stage-2 rewards of the sampled answers:   first tenth     last tenth       rise")
        for name, rise in rises.items():
            lines.append(f"  {name:<38} {rise['first_tenth']:>13.3f}   {rise['last_tenth']:>13.3f}   {rise['rise']:>+10.3f}")
    lines.append(f"wall time {summary['wall_time_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
