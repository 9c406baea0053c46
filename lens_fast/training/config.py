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
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

from lens_fast.data.synthetic import KINDS
from lens_fast.model.build import SAM_TYPES, read_config
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
DATA = ("synthetic", "refcoco", "hf")
DATASETS = ("refcoco", "refcoco+", "refcocog")
LR_SCHEDULES = ("cosine", "constant")
SEQUENCE_EPSILON_LIMIT = 0.01
"""A clip range above this is token-level scale, too wide for sequence-level (GSPO) ratios."""
CHECKPOINT_OPTIONS = ("mode", "prompt_style", "num_queries", "max_new_tokens")
"""What a lens_fast checkpoint records of these options (``lens_config.json``) is the model's own."""
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
    threads: int = _option(1, "torch CPU threads; 0: torch's own choice, left alone (OMP_NUM_THREADS when set, else the "
                              "cores: the 3B recipe, whose offloaded AdamW steps on the host). The tiny default keeps 1, "
                              "its measured best: its small ops ran fastest on one of 2 cores (bench/RESULTS.md)",
                           bounds=AT_LEAST_0)
    sharding: str = _option("ddp", "ddp: every process holds the model; fsdp: FSDP2 shards parameters, gradients and AdamW "
                                   "states (or, offloaded, host masters + states) across processes, checkpoints sharded",
                            choices=SHARDINGS)
    dist_timeout_minutes: float = _option(30.0, "minutes a process waits for the others in a collective before the run "
                                                "fails (torchrun; torch's default is 10 under NCCL): cover the longest "
                                                "work one process does alone (writing a checkpoint)", bounds=ABOVE_0)
    precision: str = _option("auto", "auto: bf16-mixed on CUDA, fp32 on CPU; bf16-mixed: fp32 weights and optimiser, bf16 "
                                     "autocast; bf16: bf16 weights (updates below half a bf16 ulp are lost)",
                             choices=PRECISIONS)
    log_every: int = _option(1, "steps between metrics.jsonl lines", bounds=AT_LEAST_1)
    checkpoint_every: int = _option(200, "steps between checkpoints; also at each stage's end and on SIGINT/SIGTERM",
                                    bounds=AT_LEAST_1)
    keep_checkpoints: int = _option(2, "periodic checkpoints (checkpoints/step_*) kept, the newest; 0: all. "
                                       "checkpoints/stage1 (the KL reference) and checkpoints/final are always kept",
                                    bounds=AT_LEAST_0)
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
    data: str = _option("synthetic", "synthetic (generated scenes, no download) | refcoco (data_root's refer files) | "
                                     "hf (a Hugging Face form of RefCOCO/+/g: jxu124, lmms-lab, Seg-Zero; README)",
                        choices=DATA)
    synthetic_kinds: tuple = _option(("attribute",), "synthetic: the expression kinds trained on", choices=KINDS)
    synthetic_min_radius: float = _option(0.12, "synthetic: smallest object radius, a fraction of the image's shorter "
                                                "side (<= synthetic_max_radius)", bounds=Range(0.02, 0.3))
    synthetic_max_radius: float = _option(0.25, "synthetic: largest object radius, a fraction of the image's shorter side",
                                          bounds=Range(0.02, 0.3))
    synthetic_max_objects: int = _option(4, "synthetic: most objects in a scene", bounds=Range(2, 8))
    synthetic_coordinate_ramp: float = _option(0.0, "synthetic: a training aid, grey levels of a position ramp added to "
                                                    "every pixel (red left to right, blue top to bottom) so that a policy "
                                                    "without grounding pretraining can see where a patch is; 0: off (the "
                                                    "full-difficulty split never has it)", bounds=Range(0.0, 127.0))
    data_root: str = _option("", "refcoco: the directory holding <dataset>/refs(<split_by>).p and instances.json; "
                                 "hf: a save_to_disk or parquet directory, or a hub name in the datasets cache")
    dataset: str = _option("refcoco", "refcoco / hf: which of the three", choices=DATASETS)
    split_by: str = _option("", "refcoco: the refs file's split (empty: unc for refcoco and refcoco+, umd for refcocog)")
    image_root: str = _option("", "refcoco: COCO train2014 images (empty: <data_root>/images/mscoco/images/train2014); "
                                  "hf: the same folder, needed by the jxu124 form (it holds no pixels)")
    skip_bad_rows: bool = _option(False, "hf: leave out and count rows whose annotation or image is unusable, instead of "
                                         "stopping with an error naming the row")
    val_split: str = _option("val", "the validation split (synthetic: val | test; refcoco: val, testA, testB, test)")
    val_size: int = _option(200, "validation samples (0: none)", bounds=AT_LEAST_0)
    val_batch_size: int = _option(50, "validation batch size", bounds=AT_LEAST_1)
    # stage 1: alignment (teacher-forced ground-truth answers)
    stage1_steps: int = _option(1600, "alignment steps (0: skip stage 1)", bounds=AT_LEAST_0)
    stage1_batch_size: int = _option(16, "samples per alignment step", bounds=AT_LEAST_1)
    stage1_lr: float = _option(7e-4, "alignment AdamW learning rate", bounds=AT_LEAST_0)
    stage1_train: tuple = _option(PARTS, "the parts trained in stage 1 (LENS: queries,connector)", choices=PARTS)
    sft_weight: float = _option(0.3, "weight of the answer's cross-entropy in stage 1 (a random tiny policy cannot "
                                     "write boxes otherwise; LENS: 0)", bounds=AT_LEAST_0)
    # stage 2: GRPO
    stage2_steps: int = _option(150, "GRPO steps (0: skip stage 2)", bounds=AT_LEAST_0)
    stage2_train: tuple = _option(PARTS, "the parts trained in stage 2 (LENS: all but sam_encoder)", choices=PARTS)
    batch_size: int = _option(4, "prompts per GRPO step (over all processes)", bounds=AT_LEAST_1)
    num_generations: int = _option(8, "completions sampled per prompt, G (>= 2: a group of 1 has no advantage)",
                                   bounds=AT_LEAST_1)
    lr: float = _option(3e-4, "GRPO AdamW learning rate", bounds=AT_LEAST_0)
    temperature: float = _option(0.9, "sampling temperature; the log-probs are taken at the same temperature",
                                 bounds=ABOVE_0)
    top_p: float = _option(0.9, "nucleus sampling; the log-probs are not truncated to the nucleus (LENS's choice)",
                           bounds=Range(0, 1, open_low=True))
    top_k: int = _option(50, "sample from the k most likely tokens (0: all); the log-probs are not truncated to them "
                             "(LENS's choice)", bounds=AT_LEAST_0)
    reward: str = _option("lens", "lens: box IoU^2 + mask IoU^2 (+ format with prompt_style cot); seg_zero and "
                                  "vision_reasoner: those papers' rewards", choices=REWARDS)
    reward_aggregation: str = _option("sum", "sum: normalise the summed reward; normalize_then_sum: centre and scale "
                                             "each component by scale_rewards, sum, then normalise the sum over the "
                                             "batch (TRL's multi_objective_aggregation with scale_rewards group; TRL "
                                             "ignores scale_rewards there: batch and none are this project's)",
                                      choices=AGGREGATIONS)
    scale_rewards: str = _option("group", "divide advantages by the group's std, the batch's, or nothing (none: Dr. GRPO)",
                                 choices=SCALE_REWARDS)
    loss_type: str = _option("grpo", "grpo: token mean per sequence, then mean (LENS); dapo: token sum / token count; "
                                     "dr_grpo: token sum / (rows x max_new_tokens)", choices=LOSS_TYPES)
    beta: float = _option(0.04, "weight of the k3 KL to the stage-1 model (0: no reference model is built)",
                          bounds=AT_LEAST_0)
    epsilon: float = _option(0.2, "PPO clip range below 1 of the importance ratio (acts only at num_iterations > 1)",
                             bounds=AT_LEAST_0)
    epsilon_high: Optional[float] = _option(None, "clip range above 1 (null: = epsilon; DAPO recommends 0.28)",
                                            bounds=AT_LEAST_0)
    num_iterations: int = _option(1, "policy updates per rollout (1: the ratio is 1, as LENS)", bounds=AT_LEAST_1)
    importance_sampling_level: str = _option("token", "one importance ratio per token, or per sequence (GSPO: clip it "
                                                      "with epsilon ~3e-4 / epsilon_high ~4e-4)", choices=IMPORTANCE_LEVELS)
    mask_truncated_completions: bool = _option(True, "completions cut at max_new_tokens add no policy loss")
    mask_loss_weight: float = _option(1.0, "weight of BCE + Dice on every completion's mask (LENS: 1)", bounds=AT_LEAST_0)
    # optimiser
    weight_decay: float = _option(0.0, "AdamW weight decay", bounds=AT_LEAST_0)
    grad_clip: float = _option(1.0, "clip the gradient's global norm to this (0: no clipping)", bounds=AT_LEAST_0)
    warmup_steps: int = _option(20, "linear learning-rate warm-up steps at the start of each stage", bounds=AT_LEAST_0)
    lr_schedule: str = _option("cosine", "after warm-up: cosine (down to 0.1 x lr) | constant", choices=LR_SCHEDULES)
    # memory options (the trainer does them; --plan estimates them)
    optimizer_states: str = _option("fp32", "AdamW states: fp32 (in the parameters' dtype: bf16 under precision=bf16) | "
                                            "8bit (bitsandbytes' blockwise AdamW8bit, ~2 B/param; pip install 'lens_fast[lean]')",
                                    choices=OPTIMIZER_STATES)
    optimizer_offload: bool = _option(False, "fp32 master weights + AdamW states in host memory, AdamW steps on the CPU, "
                                             "updated weights copied back to the device")
    step_in_backward: bool = _option(False, "no full gradient buffer: without optimizer_offload each parameter is stepped "
                                            "in backward (needs grad_clip 0, one process, micro_batch not splitting a step's "
                                            "rows); with it each gradient is streamed to the host in backward")
    # memory plan (--plan only)
    plan_gpus: int = _plan(1, "GPUs to plan for (FSDP2 shards weights, grads and states across them)", bounds=AT_LEAST_1)
    plan_gpu_memory_gb: float = _plan(24.0, "memory budget per GPU in GB (1e9 bytes)", bounds=ABOVE_0)
    plan_completion_tokens: int = _plan(0, "completion length to plan for (0: max_new_tokens, the worst case)",
                                        bounds=AT_LEAST_0)
    plan_weights: str = _plan("master", "master (bf16 + fp32 master weights) | kahan | sr (pure bf16 AdamW)",
                              choices=PLAN_WEIGHTS)
    plan_attention: str = _plan("sdpa", "sdpa | flash (flash-attn 2) | eager", choices=PLAN_ATTENTION)
    plan_lean_ops: bool = _plan(False, "chunked log-probs + memory-lean mask loss instead of the naive paths")

    def __post_init__(self) -> None:
        self.synthetic_kinds, self.stage1_train, self.stage2_train = (
            tuple(self.synthetic_kinds), tuple(self.stage1_train), tuple(self.stage2_train)
        )
        for f in dataclasses.fields(self):  # the allowed values in each field's metadata (see _option)
            value, allowed, bounds = getattr(self, f.name), f.metadata.get("choices"), f.metadata.get("range")
            if allowed and isinstance(value, tuple) and (not value or not set(value) <= set(allowed)
                                                         or len(set(value)) != len(value)):
                raise ValueError(f"{f.name} must be one or more distinct names from {allowed}, got {value!r}")
            if allowed and not isinstance(value, tuple) and value not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}")
            if bounds and value is not None and value not in bounds:
                raise ValueError(f"{f.name} must be {bounds}, got {value}")
        if self.synthetic_min_radius > self.synthetic_max_radius:
            raise ValueError(f"synthetic_min_radius {self.synthetic_min_radius} must be <= synthetic_max_radius "
                             f"{self.synthetic_max_radius}")
        if self.step_in_backward and not self.optimizer_offload and self.grad_clip > 0:
            raise ValueError(f"grad_clip must be 0 with step_in_backward and no optimizer_offload (each parameter is "
                             f"stepped before the global gradient norm exists), got {self.grad_clip}")
        if self.sharding == "fsdp" and (self.step_in_backward or (self.optimizer_states != "fp32" and not self.optimizer_offload)):
            raise ValueError("sharding 'fsdp' runs torch's AdamW (fp32 states) or the offloaded one (optimizer_offload true, "
                             "fp32 or 8bit host states): step_in_backward (FSDP2 assigns the sharded gradients after its "
                             "reduce-scatter, past the per-parameter hooks) and 8bit states on the device are not built for "
                             f"its sharded (DTensor) parameters; got step_in_backward={self.step_in_backward}, "
                             f"optimizer_states={self.optimizer_states!r}, optimizer_offload={self.optimizer_offload}")
        if self.micro_batch and self.stage2_steps and self.micro_batch % self.num_generations and self.num_generations % self.micro_batch:
            raise ValueError(f"micro_batch must be a multiple or a divisor of num_generations {self.num_generations} "
                             f"(a pass holds whole groups, or a group spans whole passes), got {self.micro_batch}")
        if self.num_generations < 2 and self.stage2_steps:
            raise ValueError(f"num_generations must be >= 2 for GRPO (a group of 1 has no advantage), got {self.num_generations}")

    def inert_options(self) -> list[str]:
        """One line per option set away from its default that does nothing in this configuration (or, for
        GSPO, nearly nothing); :func:`parse_args` logs them as warnings."""
        notes = []
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        changed = [f"{name} {getattr(self, name)!r}" for name in ("epsilon", "epsilon_high", "importance_sampling_level")
                   if getattr(self, name) != defaults[name]]
        if self.num_iterations == 1 and changed:
            notes.append(f"{', '.join(changed)}: inert at num_iterations 1, where the policy that sampled is the one "
                         "updated, so every importance ratio is 1 (nothing is clipped, and a sequence's ratio gives the "
                         "token-level gradient); set num_iterations > 1 for them to act")
        widest = max(self.epsilon, self.epsilon if self.epsilon_high is None else self.epsilon_high)
        if self.importance_sampling_level == "sequence" and self.num_iterations > 1 and widest > SEQUENCE_EPSILON_LIMIT:
            notes.append(f"importance_sampling_level 'sequence' with epsilon {self.epsilon} / epsilon_high {widest}: a "
                         "token-level clip range; a sequence's ratio (the geometric mean of its tokens') rarely leaves "
                         "it, so little is clipped. GSPO clips sequence ratios at epsilon 3e-4, epsilon_high 4e-4 (TRL)")
        return notes

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
        if self.data == "hf" and not self.data_root:
            raise FileNotFoundError("data_root: data 'hf' needs a directory or a hub name, got ''")
        for name, value in needed:
            if not value or not Path(value).exists():
                raise FileNotFoundError(f"{name}: path {value!r} does not exist")


def checkpoint_options(config: TrainConfig, explicit: Optional[Mapping[str, str]] = None) -> TrainConfig:
    """``config`` with the mode, prompt_style, num_queries and max_new_tokens recorded by the lens_fast checkpoint
    that ``config.model`` names, so that generation and the reward follow the checkpoint's model.

    ``explicit``: the options the user set, each with where (``{"prompt_style": "command line"}``); one of
    them that differs from the checkpoint's value raises ValueError naming both, and the others take the
    checkpoint's values. Default: all four count as set (a config built in code must agree).
    ``config`` itself for ``tiny``, ``components`` or a path that does not exist (``check_paths`` names it);
    FileNotFoundError for an existing path that holds no ``lens_config.json``."""
    if config.model in ("tiny", "components") or not Path(config.model).exists():
        return config
    recorded = read_config(config.model)
    explicit = dict.fromkeys(CHECKPOINT_OPTIONS, "the config") if explicit is None else explicit
    conflicts = [name for name in CHECKPOINT_OPTIONS
                 if name in explicit and getattr(config, name) != getattr(recorded, name)]
    if conflicts:
        raise ValueError(
            f"model {config.model} is a checkpoint with " + ", ".join(f"{n} {getattr(recorded, n)!r}" for n in conflicts)
            + ", but " + ", ".join(f"{n} {getattr(config, n)!r} is set ({explicit[n]})" for n in conflicts)
            + f": a checkpoint's {', '.join(CHECKPOINT_OPTIONS)} are its own; leave them out, or set them to its values"
        )
    return dataclasses.replace(config, **{name: getattr(recorded, name) for name in CHECKPOINT_OPTIONS})


def _field_type(f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0], True
    return hint, False


def _convert(text: Any, kind: Any, optional: bool) -> Any:
    """``text`` (a command-line string or a YAML value) as ``kind``; ValueError saying what could not be read."""
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
        raise ValueError(f"cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None


def from_mapping(values: dict, base: Optional[TrainConfig] = None, source: str = "config") -> TrainConfig:
    """``base`` (default: the defaults) with ``values`` applied; ValueError naming an unknown key or bad value."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}")
    current = dataclasses.asdict(base or TrainConfig())
    for name, value in values.items():
        try:
            current[name] = _convert(value, *_field_type(fields[name]))
        except ValueError as error:
            raise ValueError(f"{source}: {name}: {error}") from None
    return TrainConfig(**current)


def _reader(f: dataclasses.Field) -> Callable[[str], Any]:
    """The argparse ``type`` of field ``f``: reads the text as the field's type and checks a tuple's names and
    a number's range, so that argparse names the option in its error."""
    kind, optional = _field_type(f)
    allowed, bounds = f.metadata.get("choices"), f.metadata.get("range")

    def read(text: str) -> Any:
        try:
            value = _convert(text, kind, optional)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if kind is tuple and allowed:
            unknown = [name for name in value if name not in allowed]
            if unknown or not value or len(set(value)) != len(value):
                raise argparse.ArgumentTypeError(f"{text!r}: want one or more distinct names, comma-separated, "
                                                 f"from {', '.join(allowed)}")
        if bounds and value is not None and value not in bounds:
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return read


def _help(f: dataclasses.Field) -> str:
    """``--help``'s line for field ``f``: its text, its allowed values, its default."""
    kind, optional = _field_type(f)
    allowed, bounds = f.metadata.get("choices"), f.metadata.get("range")
    if allowed:
        values = f"comma-separated, from: {', '.join(allowed)}" if kind is tuple else f"one of: {', '.join(allowed)}"
    elif kind is bool:
        values = "true or false"
    else:
        values = kind.__name__ + (f" {bounds}" if bounds else "") + (" or null" if optional else "")
    default = f.default
    if isinstance(default, tuple):
        shown = ",".join(default)
    else:  # YAML's spelling
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else '""' if default == "" else default
    return f"{f.metadata['help']} ({values}; default: {shown})".replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """``--config``, ``--plan`` and one ``--key-name`` per TrainConfig field (absent from the parsed namespace unless
    given), each with its help line, its allowed values (argparse's choices for a named value) and its type."""
    parser = argparse.ArgumentParser(
        prog="python -m lens_fast.train", usage="%(prog)s [--config FILE.yaml] [--plan] [--key-name value ...]",
        description="LENS-style two-stage training (alignment, then GRPO) of a Qwen2.5-VL + SAM referring "
        "segmenter. With no arguments: the embedded tiny run on synthetic data (CPU, ~10 min).",
    )
    parser.add_argument("--config", type=Path, help="YAML file of options (command-line options override it)")
    parser.add_argument("--plan", action="store_true", help="print the estimated peak memory per GPU and exit")
    for f in dataclasses.fields(TrainConfig):
        kind, _ = _field_type(f)
        allowed = f.metadata.get("choices")
        choices = allowed if allowed and kind is not tuple else None
        metavar = None if choices else "NAME,..." if kind is tuple else "{true,false}" if kind is bool else kind.__name__.upper()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, type=_reader(f),
                            choices=choices, metavar=metavar, help=_help(f))
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, parsed args). ``--config`` YAML first, then ``--key value`` overrides; with ``--model`` a lens_fast
    checkpoint, the options it records that neither sets are the checkpoint's (:func:`checkpoint_options`).
    Options that do nothing in the result are logged as warnings (:meth:`TrainConfig.inert_options`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base, explicit = TrainConfig(), {}
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
        explicit.update(dict.fromkeys(values, str(args.config)))
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    explicit.update(dict.fromkeys(overrides, "command line"))
    try:
        config = checkpoint_options(from_mapping(overrides, base, source="command line"), explicit)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    for note in config.inert_options():
        log.warning("warning: %s", note)
    return config, args
