"""The training config: a dataclass of defaults (the embedded tiny run), a YAML file (``--config``) and
``--key value`` overrides; every value is checked before any model is built.

Each field's metadata holds its ``--help`` text, its allowed values (``choices``: the tuples the code
itself checks against, such as ``MODES`` or ``SHARDINGS``; ``range``: a :class:`Range`) and nothing
else: ``--help``, argparse's choices and :meth:`TrainConfig.__post_init__`'s checks all read them.
The parser is our own, not ``transformers.HfArgumentParser``: that one reads ``--resume true`` and
``Literal`` choices, but splits a tuple option into characters, rejects ``null`` for an optional
float, and reads a YAML file or the command line, not a file overridden by options (measured, 5.25).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from lens_fast.data.synthetic import KINDS
from lens_fast.model.build import CONFIG_FILE, SAM_TYPES, read_config
from lens_fast.model.config import MODES
from lens_fast.model.lens import PARTS
from lens_fast.model.policy import KV_CACHES
from lens_fast.model.prompts import PROMPT_STYLES
from lens_fast.training.distributed import SHARDINGS
from lens_fast.training.grpo import AGGREGATIONS, IMPORTANCE_LEVELS, LOSS_TYPES, SCALE_REWARDS
from lens_fast.training.optim import OPTIMIZER_STATES
from lens_fast.training.rollout_rewards import REWARDS

PLAN_WEIGHTS = ("master", "kahan", "sr")
PLAN_ATTENTION = ("sdpa", "flash", "eager")
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
DATA = ("synthetic", "refcoco")
DATASETS = ("refcoco", "refcoco+", "refcocog")
LR_SCHEDULES = ("cosine", "constant")
log = logging.getLogger("lens_fast.training")


@dataclass(frozen=True)
class Range:
    """Allowed numbers: ``low`` <= value (``low`` < value when ``open_low``) <= ``high`` (None: unbounded)."""

    low: float
    high: Optional[float] = None
    open_low: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return bool(above and (self.high is None or value <= self.high))  # NaN is outside every range

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"


AT_LEAST_0, AT_LEAST_1, ABOVE_0 = Range(0), Range(1), Range(0, open_low=True)


def _option(default: Any, text: str, *, choices: Optional[tuple] = None, bounds: Optional[Range] = None) -> Any:
    """A field whose ``--help`` line says ``text``; ``choices``: its allowed values (for a tuple field, of each
    element); ``range``: its allowed numbers. Both are checked in ``__post_init__`` and listed by ``--help``."""
    metadata = {"help": text, **({"choices": choices} if choices else {}), **({"range": bounds} if bounds else {})}
    return field(default=default, metadata=metadata)


def _plan(default: Any, text: str, **allowed: Any) -> Any:
    return _option(default, f"--plan only: {text}", **allowed)


@dataclass
class TrainConfig:
    """Defaults: the embedded tiny run (tiny model, synthetic data, CPU, ~10 minutes on 2 cores).
    ``configs/lens_qwen2.5vl_3b.yaml`` holds LENS's real recipe."""

    # run
    output_dir: str = _option("", "run directory: metrics.jsonl, summary.json, checkpoints/ (empty: runs/<timestamp>)")
    resume: bool = _option(False, "continue from <output_dir>/checkpoints/latest")
    seed: int = _option(0, "seed of the initial weights, the data order and the sampling", bounds=AT_LEAST_0)
    device: str = _option("auto", "auto (cuda when available, else cpu) | cpu | cuda | cuda:N")
    threads: int = 1  # torch CPU threads (the tiny model's small ops run fastest on one)
    sharding: str = _option("ddp", "ddp: every process holds the model; fsdp: FSDP2 shards parameters, gradients and AdamW "
                                   "states (or, offloaded, host masters + states) across processes, checkpoints sharded",
                            choices=SHARDINGS)
    precision: str = _option("auto", "auto: bf16-mixed on CUDA, fp32 on CPU; bf16-mixed: fp32 weights and optimiser, bf16 "
                                     "autocast; bf16: bf16 weights (updates below half a bf16 ulp are lost)",
                             choices=PRECISIONS)
    log_every: int = _option(1, "steps between metrics.jsonl lines", bounds=AT_LEAST_1)
    checkpoint_every: int = _option(200, "steps between checkpoints; also at each stage's end and on SIGINT/SIGTERM",
                                    bounds=AT_LEAST_1)
    keep_checkpoints: int = _option(2, "periodic checkpoints (checkpoints/step_*) kept, the newest; 0: all. "
                                       "checkpoints/stage1 (the KL reference) and checkpoints/final are always kept")
    max_bad_steps: int = _option(5, "consecutive non-finite losses that stop the run", bounds=AT_LEAST_1)
    progress: bool = _option(True, "a progress bar on stderr")
    # model
    model: str = _option("tiny", "tiny (built offline, random) | components (qwen_dir + sam_checkpoint) | the path of a "
                                 "lens_fast checkpoint, whose mode, prompt_style, num_queries and max_new_tokens are used")
    qwen_dir: str = _option("", "model components: a Qwen2.5-VL Hugging Face directory")
    sam_checkpoint: str = _option("", "model components: a segment_anything SAM .pth")
    sam_type: str = _option("vit_l", "model components: the SAM checkpoint's size", choices=SAM_TYPES)
    mode: str = _option("queries", "queries: LENS (context queries prompt SAM); prompts: Seg-Zero (a frozen SAM prompted "
                                   "by the answer's box and points)", choices=MODES)
    prompt_style: str = _option("grounding", "the prompt: grounding (answer the box) | cot (think, then answer; the "
                                             "reward adds a format term)", choices=PROMPT_STYLES)
    num_queries: int = _option(16, "context queries (mode queries)", bounds=AT_LEAST_1)
    max_new_tokens: int = _option(40, "longest sampled completion, in tokens", bounds=AT_LEAST_1)
    kv_cache: str = _option("dynamic", "sampling's KV cache: dynamic | static (preallocated; its decode step compiled with "
                                       "CUDA graphs on GPU)", choices=KV_CACHES)
    gradient_checkpointing: bool = _option(False, "recompute the policy's decoder activations in backward")
    micro_batch: int = _option(0, "sequences (rows, completions) per forward/backward pass, 0: all of the process's rows "
                                  "at once", bounds=AT_LEAST_0)
    # data
    data: str = "synthetic"  # synthetic | refcoco
    synthetic_kinds: tuple = ("attribute",)
    synthetic_min_radius: float = 0.12
    synthetic_max_radius: float = 0.25
    synthetic_max_objects: int = 4
    data_root: str = ""  # refcoco: holds <dataset>/refs(<split_by>).p and instances.json
    dataset: str = "refcoco"
    split_by: str = ""
    image_root: str = ""
    val_split: str = "val"
    val_size: int = 200
    val_batch_size: int = 50
    # stage 1: alignment (teacher-forced ground-truth answers)
    stage1_steps: int = 1600
    stage1_batch_size: int = 16
    stage1_lr: float = 7e-4
    stage1_train: tuple = PARTS  # LENS: (queries, connector)
    sft_weight: float = 0.3  # answer cross-entropy (a random tiny policy cannot write boxes)
    # stage 2: GRPO
    stage2_steps: int = 150
    stage2_train: tuple = PARTS  # LENS: everything but SAM's image encoder
    batch_size: int = 4  # prompts per step
    num_generations: int = 8
    lr: float = 3e-4
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50
    reward: str = "lens"  # lens | seg_zero | vision_reasoner
    reward_aggregation: str = "sum"  # sum | normalize_then_sum
    scale_rewards: str = "group"  # group | batch | none
    loss_type: str = "grpo"  # grpo | dapo | dr_grpo
    beta: float = 0.04  # k3 KL to the stage-1 model; 0 builds no reference model
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: = epsilon (DAPO recommends 0.28)
    num_iterations: int = 1  # updates per rollout
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    mask_truncated_completions: bool = True
    mask_loss_weight: float = 1.0  # BCE + Dice on every completion's mask (LENS)
    # optimiser
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine | constant
    # memory options (the trainer does them; --plan estimates them)
    optimizer_states: str = _option("fp32", "AdamW states: fp32 (in the parameters' dtype: bf16 under precision=bf16) | "
                                            "8bit (bitsandbytes' blockwise AdamW8bit, ~2 B/param; pip install 'lens_fast[lean]')")
    optimizer_offload: bool = _option(False, "fp32 master weights + AdamW states in host memory, AdamW steps on the CPU, "
                                             "updated weights copied back to the device")
    step_in_backward: bool = _option(False, "no full gradient buffer: without optimizer_offload each parameter is stepped "
                                            "in backward (needs grad_clip 0, one process, micro_batch not splitting a step's "
                                            "rows); with it each gradient is streamed to the host in backward")
    # memory plan (--plan only)
    plan_gpus: int = _plan(1, "GPUs to plan for (FSDP2 shards weights, grads and states across them)")
    plan_gpu_memory_gb: float = _plan(24.0, "memory budget per GPU in GB (1e9 bytes)")
    plan_completion_tokens: int = _plan(0, "completion length to plan for (0: max_new_tokens, the worst case)")
    plan_weights: str = _plan("master", "master (bf16 + fp32 master weights) | kahan | sr (pure bf16 AdamW)")
    plan_attention: str = _plan("sdpa", "sdpa | flash (flash-attn 2) | eager")
    plan_lean_ops: bool = _plan(False, "chunked log-probs + memory-lean mask loss instead of the naive paths")

    def __post_init__(self) -> None:
        self.synthetic_kinds, self.stage1_train, self.stage2_train = (
            tuple(self.synthetic_kinds), tuple(self.stage1_train), tuple(self.stage2_train)
        )
        choices = dict(
            mode=MODES, prompt_style=PROMPT_STYLES, data=("synthetic", "refcoco"), reward=REWARDS,
            reward_aggregation=AGGREGATIONS, scale_rewards=SCALE_REWARDS, loss_type=LOSS_TYPES,
            importance_sampling_level=IMPORTANCE_LEVELS, lr_schedule=("cosine", "constant"),
            sam_type=("vit_b", "vit_l", "vit_h"), precision=("auto", "fp32", "bf16-mixed", "bf16"), dataset=("refcoco", "refcoco+", "refcocog"),
            kv_cache=KV_CACHES, optimizer_states=OPTIMIZER_STATES, sharding=SHARDINGS, plan_weights=PLAN_WEIGHTS, plan_attention=PLAN_ATTENTION,
        )
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name, allowed, values in (("synthetic_kinds", KINDS, self.synthetic_kinds),
                                      ("stage1_train", PARTS, self.stage1_train), ("stage2_train", PARTS, self.stage2_train)):
            unknown = [v for v in values if v not in allowed]
            if unknown or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct names from {allowed}, got {values!r}")
        if not self.synthetic_kinds:
            raise ValueError("synthetic_kinds must name at least one kind")
        positive = ("threads", "log_every", "checkpoint_every", "max_bad_steps", "num_queries", "max_new_tokens",
                    "val_batch_size", "stage1_batch_size", "batch_size", "num_generations", "num_iterations", "plan_gpus")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("stage1_steps", "stage2_steps", "val_size", "warmup_steps", "seed", "top_k", "keep_checkpoints",
                     "plan_completion_tokens", "micro_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stage1_lr", "lr", "weight_decay", "grad_clip", "beta", "epsilon", "sft_weight", "mask_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.step_in_backward and not self.optimizer_offload and self.grad_clip > 0:
            raise ValueError(f"grad_clip must be 0 with step_in_backward and no optimizer_offload (each parameter is "
                             f"stepped before the global gradient norm exists), got {self.grad_clip}")
        if self.sharding == "fsdp" and (self.step_in_backward or (self.optimizer_states != "fp32" and not self.optimizer_offload)):
            raise ValueError("sharding 'fsdp' runs torch's AdamW (fp32 states) or the offloaded one (optimizer_offload true, "
                             "fp32 or 8bit host states): step_in_backward (FSDP2 assigns the sharded gradients after its "
                             "reduce-scatter, past the per-parameter hooks) and 8bit states on the device are not built for "
                             f"its sharded (DTensor) parameters; got step_in_backward={self.step_in_backward}, "
                             f"optimizer_states={self.optimizer_states!r}, optimizer_offload={self.optimizer_offload}")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            raise ValueError(f"epsilon_high must be >= 0 or null, got {self.epsilon_high}")
        if not self.plan_gpu_memory_gb > 0:
            raise ValueError(f"plan_gpu_memory_gb must be > 0, got {self.plan_gpu_memory_gb}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (sampling), got {self.temperature}")
        if self.micro_batch and self.stage2_steps and self.micro_batch % self.num_generations and self.num_generations % self.micro_batch:
            raise ValueError(f"micro_batch must be a multiple or a divisor of num_generations {self.num_generations} "
                             f"(a pass holds whole groups, or a group spans whole passes), got {self.micro_batch}")
        if self.num_generations < 2 and self.stage2_steps:
            raise ValueError(f"num_generations must be >= 2 for GRPO (a group of 1 has no advantage), got {self.num_generations}")

    def check_world(self, world_size: int) -> None:
        """ValueError for options the trainer cannot run in a world of ``world_size`` processes: step_in_backward
        steps before DDP's gradient all-reduce (one process only) and, without optimizer_offload, cannot
        accumulate gradients over passes (micro_batch must not split a step's rows)."""
        if not self.step_in_backward:
            return
        if world_size > 1:
            raise ValueError(f"step_in_backward needs one process (it steps before the gradient all-reduce), got "
                             f"WORLD_SIZE {world_size}")
        rows = {"stage1": self.stage1_batch_size if self.stage1_steps else 0,  # one optimizer step's rows per stage
                "stage2": self.batch_size * self.num_generations if self.stage2_steps else 0}
        split = {stage: n for stage, n in rows.items() if 0 < self.micro_batch < n}
        if split and not self.optimizer_offload:
            raise ValueError(f"micro_batch {self.micro_batch} splits the rows of a step ({split}): step_in_backward "
                             "without optimizer_offload has no gradient buffer to accumulate passes in; set "
                             "optimizer_offload true, micro_batch 0, or step_in_backward false")

    def check_paths(self) -> None:
        """FileNotFoundError naming the first missing path this config needs."""
        needed = []
        if self.model == "components":
            needed += [("qwen_dir", self.qwen_dir), ("sam_checkpoint", self.sam_checkpoint)]
        elif self.model != "tiny":
            needed.append(("model", self.model))
        if self.data == "refcoco":
            needed.append(("data_root", self.data_root))
        for name, value in needed:
            if not value or not Path(value).exists():
                raise FileNotFoundError(f"{name}: path {value!r} does not exist")


def _field_type(f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return hint, False


def _convert(name: str, text: Any, kind: Any, optional: bool) -> Any:
    if optional and (text is None or (isinstance(text, str) and text.lower() in ("none", "null"))):
        return None
    try:
        if kind is bool:
            if isinstance(text, bool):
                return text
            if str(text).lower() in ("true", "1", "yes"):
                return True
            if str(text).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is tuple:
            if isinstance(text, (list, tuple)):
                return tuple(text)
            return tuple(v for v in str(text).split(",") if v)
        if kind is int and isinstance(text, float) and not text.is_integer():
            raise ValueError
        if isinstance(text, bool) and kind in (int, float):
            raise ValueError
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None


def from_mapping(values: dict, base: Optional[TrainConfig] = None, source: str = "config") -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` applied; ValueError naming an unknown key or bad value."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}")
    current = dataclasses.asdict(base or TrainConfig())
    for name, value in values.items():
        current[name] = _convert(name, value, *_field_type(fields[name]))
    return TrainConfig(**current)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lens_fast.train",
        description="LENS-style two-stage training (alignment, then GRPO) of a Qwen2.5-VL + SAM referring "
        "segmenter. With no arguments: the embedded tiny run on synthetic data (CPU, ~10 min).",
    )
    parser.add_argument("--config", type=Path, help="YAML file of options (command-line options override it)")
    parser.add_argument("--plan", action="store_true", help="print the estimated peak memory per GPU and exit")
    for f in dataclasses.fields(TrainConfig):
        kind, _ = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        text = f"{f.metadata['help']}; " if "help" in f.metadata else ""
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar=kind.__name__.upper(),
                            help=f"{text}default: {shown}")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, parsed args). ``--config`` YAML first, then ``--key value`` overrides."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base = TrainConfig()
    if args.config is not None:
        try:
            values = yaml.safe_load(args.config.read_text()) or {}
        except FileNotFoundError:
            parser.error(f"--config: no such file {args.config}")
        except yaml.YAMLError as error:
            parser.error(f"--config: {args.config} is not valid YAML: {error}")
        if not isinstance(values, dict):
            parser.error(f"--config: {args.config} must hold a mapping of options")
        try:
            base = from_mapping(values, base, source=str(args.config))
        except ValueError as error:
            parser.error(str(error))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}
    try:
        config = from_mapping(overrides, base, source="command line")
    except ValueError as error:
        parser.error(str(error))
    return config, args
