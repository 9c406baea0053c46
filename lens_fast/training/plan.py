"""The memory plan: ``python -m lens_fast.train --config configs/lens_qwen2.5vl_3b.yaml --plan``.

Estimated peak memory per GPU of one GRPO step (stage 2), itemised, for the config's options, then
every combination of the memory options with the ones that fit the budget (default 24 GB per GPU),
each with an estimated step time, and the combination the plan picks. Estimates, not measurements:
each item's formula is below and in the printed notes.

Parameter counts are exact: the model is built from the shipped architectures
(``configs/architectures``: Qwen2.5-VL-3B-Instruct's ``config.json``, segment_anything's SAM sizes)
on the meta device, so no weight is read or downloaded. The policy needs special-token ids only; the
model is built with the offline tiny tokenizer, whose ids :func:`lens_fast.model.real_config` writes
into the Qwen config (shapes, vocabulary size included, are the released ones).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", arXiv:2205.05198): count the tensors each layer saves for backward. Their GPT layer saves
``sbh(34 + 5as/h)`` bytes in 16-bit (34 sbh without the attention scores, as with flash attention);
the same count for a Qwen2.5 layer (SwiGLU MLP of width i = 5.4 h, grouped-query attention, and
``transformers``' RMSNorm, which keeps a float32 copy of its input) gives ``20.5 h + 8 i`` bytes per
token with flash-attn (``26 h + 8 i`` with masked SDPA, which repeats K and V to all heads), i.e.
about 64-69 sbh for the 3B model. Full checkpointing keeps each layer's input (2 sbh per layer) plus
one layer's full set during its recompute. Byte sizes print in GB = 1e9 bytes (the issue's arithmetic:
3.75 B parameters are 7.5 GB in bf16).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import torch

from lens_fast.training.config import PLAN_WEIGHTS, TrainConfig

GB = 1e9
TYPICAL_IMAGE = (480, 640)
"""(H, W) of a typical RefCOCO image (COCO train2014: most are 640 x 480 or 480 x 640); synthetic data
plans for its largest side (``SyntheticConfig.max_side``, square)."""
TYPICAL_EXPRESSION = "man on the left in a red shirt"
"""A RefCOCO-like expression (RefCOCO averages ~3.6 words, RefCOCOg ~8.4)."""
CHARS_PER_TOKEN = 4.0
"""Qwen's byte-level BPE on English text: about 4 characters per token (special tokens count 1)."""

# Hardware assumptions of the step-time estimate (a 24 GB RTX 4090-class card on PCIe 4.0).
GPU_TFLOPS = 60.0  # sustained bf16 matmul throughput in training (~40% of the 4090's 165 dense)
GPU_BANDWIDTH = 0.9e12  # bytes/s, device memory
PCIE_BANDWIDTH = 20e9  # bytes/s, host <-> device (the issue's ~20 GB/s)
BUS_BANDWIDTH = 16e9  # bytes/s per GPU for NCCL collectives over PCIe (no NVLink)
CPU_ADAM_RATE_PER_THREAD = 6.25e7  # parameters/s per thread of a vectorised CPU AdamW (DeepSpeed CPUAdam-class: 1e9 on 16)
ADAM_HOST_BYTES = 28  # bytes of host memory one fp32 AdamW update moves: reads weight, gradient, m, v; writes weight, m, v
HOST_BANDWIDTH = 50e9  # bytes/s, host memory (fp32 gradient accumulation on the CPU)
DECODE_STEP_FLOOR = 0.02  # s: one eager transformers decode step of a 36-layer model is launch-bound
PASS_OVERHEAD = 0.05  # s: launches and synchronisation of one more forward/backward pass
CUDA_CONTEXT = 0.6 * GB  # CUDA context + cuBLAS/NCCL workspaces (not in max_memory_allocated)
FRAGMENTATION = 0.05  # the caching allocator's slack, as a share of the allocated peak
LOGPROB_CHUNK_ELEMENTS = 2**25  # logits per chunk of ops.token_logprobs (lean-ops branch)

STATE_BYTES = {"fp32": 8.0, "bf16": 4.0, "8bit": 2.0 + 2 * 4 / 256}  # m and v; 8-bit: + fp32 absmax per 256-block
STATE_KINDS = tuple(STATE_BYTES)
"""AdamW state kinds the search weighs; bf16 is what the trainer's ``optimizer_states=fp32`` gives under
``precision=bf16`` (torch's AdamW keeps m and v in the parameters' dtype)."""
WEIGHT_EXTRA = {"master": 4.0, "kahan": 2.0, "sr": 0.0}  # fp32 master copy / bf16 Kahan compensation / none
NUMERICS_RANK = {("master", "fp32"): 0, ("kahan", "fp32"): 1, ("master", "bf16"): 2, ("kahan", "bf16"): 2,
                 ("sr", "fp32"): 2, ("master", "8bit"): 3, ("kahan", "8bit"): 3, ("sr", "bf16"): 4, ("sr", "8bit"): 4}
"""Lower is safer: fp32 master weights and states first; pure-bf16 updates by stochastic rounding
and 8-bit states are sound in expectation (Zamirai et al. 2020; Dettmers et al. 2022) but noisier."""


# ---- the model: exact counts from the meta device -----------------------------------------------------
@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs of the model: parameters per trainable part (``LensModel.parts()``),
    the largest trainable tensor, and the sizes of the policy, vision tower, connector and SAM."""

    name: str
    params: dict
    largest_tensor: int
    text_layer_params: int
    conv_params: int  # the connector's collapse Conv1d (applied once per row, not per query)
    text: dict
    vision: dict
    sam: dict
    num_queries: int
    connector_depth: int
    connector_hidden: int
    mode: str
    min_pixels: int
    max_pixels: int
    prompt_text: str

    @property
    def total(self) -> int:
        return sum(self.params.values())

    @property
    def policy(self) -> int:
        return self.params["vision"] + self.params["llm"]


def host_threads(config: TrainConfig) -> int:
    """The torch CPU threads a training process of ``config`` runs with: ``threads``, or with 0 torch's own
    choice (``torch.get_num_threads()`` here: OMP_NUM_THREADS when set, else the cores; torchrun sets
    OMP_NUM_THREADS=1 for several processes per node unless it is set)."""
    return config.threads or torch.get_num_threads()


def cpu_adam_rate(threads: int, processes: int) -> float:
    """Parameters per second of one process's host AdamW on ``threads`` threads while ``processes`` processes
    of one node step at once: linear in the threads up to their share of the host's memory bandwidth."""
    if threads < 1 or processes < 1:
        raise ValueError(f"threads and processes must be >= 1, got {threads} and {processes}")
    return min(threads * CPU_ADAM_RATE_PER_THREAD, HOST_BANDWIDTH / ADAM_HOST_BYTES / processes)


@lru_cache(maxsize=1)
def _tiny_tokenizer():
    from lens_fast.model import build_tiny_tokenizer

    return build_tiny_tokenizer()


def _lens_config(config: TrainConfig):
    """(LensConfig, tokenizer, name) of the model ``config`` trains, without reading any weight."""
    from lens_fast.model import real_config, tiny_config

    options = dict(mode=config.mode, prompt_style=config.prompt_style, num_queries=config.num_queries,
                   max_new_tokens=config.max_new_tokens)
    if config.model == "tiny":
        tokenizer = _tiny_tokenizer()
        return tiny_config(tokenizer, **options), tokenizer, "tiny (lens_fast.model.tiny_config)"
    if config.model == "components":
        tokenizer = _tiny_tokenizer()
        return (real_config(tokenizer, config.sam_type, **options), tokenizer,
                f"Qwen2.5-VL-3B-Instruct + SAM {config.sam_type} (configs/architectures)")
    from lens_fast.model.build import load_tokenizer, read_config

    return read_config(config.model), load_tokenizer(config.model), f"checkpoint {config.model} (lens_config.json)"


def model_facts(config: TrainConfig) -> ModelFacts:
    """Exact parameter counts of ``config``'s model, built on the meta device (no weights, no memory)."""
    from lens_fast.model import build_lens
    from lens_fast.model import prompts as prompt_text

    lens_config, tokenizer, name = _lens_config(config)
    model = build_lens(lens_config, tokenizer, device="meta")
    groups = model.parts()
    params, seen, largest = {}, set(), 0
    for part, modules in groups.items():
        count = 0
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen:  # tied embeddings count once
                    seen.add(id(p))
                    count += p.numel()
                    if part in config.stage2_train:
                        largest = max(largest, p.numel())
        params[part] = count
    if len(seen) != len({id(p) for p in model.parameters()}):
        raise AssertionError("the plan's parts do not cover every parameter of the model")
    text = lens_config.qwen["text_config"]
    vision = lens_config.qwen["vision_config"]
    layer = model.policy.language_model.layers[0]
    connector = getattr(model, "connector", None)
    text_prompt = tokenizer.apply_chat_template(prompt_text.messages(TYPICAL_EXPRESSION, lens_config.prompt_style),
                                                tokenize=False, add_generation_prompt=True)
    del model
    return ModelFacts(
        name=name, params=params, largest_tensor=largest, text_layer_params=sum(p.numel() for p in layer.parameters()),
        conv_params=0 if connector is None else sum(p.numel() for p in connector.collapse.parameters()),
        text=dict(text), vision=dict(vision), sam=dict(lens_config.sam), num_queries=lens_config.num_queries,
        connector_depth=lens_config.connector_depth, connector_hidden=lens_config.text_hidden_size,
        mode=lens_config.mode, min_pixels=lens_config.min_pixels, max_pixels=lens_config.max_pixels, prompt_text=text_prompt,
    )


# ---- the sequence ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    image: tuple  # (H, W) planned for
    resized: tuple
    patches: int  # vision-tower tokens of one image (before the 2 x 2 merge)
    image_tokens: int
    text_tokens: int
    completion: int
    queries: int

    @property
    def prompt(self) -> int:
        return self.image_tokens + self.text_tokens

    @property
    def row(self) -> int:
        """Tokens of one teacher-forced training row: prompt + completion + context queries."""
        return self.prompt + self.completion + self.queries


def shapes(facts: ModelFacts, config: TrainConfig) -> Shapes:
    from lens_fast.model.image_processing import smart_resize
    from lens_fast.model.tokenizer import SPECIAL_TOKENS

    p, m = facts.vision["patch_size"], facts.vision["spatial_merge_size"]
    if config.data == "synthetic":
        from lens_fast.data import SyntheticConfig

        image = (SyntheticConfig().max_side, SyntheticConfig().max_side)
    else:
        image = TYPICAL_IMAGE
    h, w = smart_resize(*image, p * m, facts.min_pixels, facts.max_pixels)
    patches = (h // p) * (w // p)
    text = facts.prompt_text
    specials = sum(text.count(t) for t in SPECIAL_TOKENS)
    for t in SPECIAL_TOKENS:
        text = text.replace(t, "")
    return Shapes(
        image=image, resized=(h, w), patches=patches, image_tokens=patches // m**2,
        text_tokens=specials - 1 + math.ceil(len(text) / CHARS_PER_TOKEN),  # the one <|image_pad|> becomes the image tokens
        completion=config.plan_completion_tokens or config.max_new_tokens,
        queries=facts.num_queries if facts.mode == "queries" else 0,
    )


# ---- options and the estimate ----------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """One combination of the memory options (``TrainConfig``'s optimizer_*, step_in_backward, micro_batch
    and plan_* options)."""

    gpus: int = 1
    weights: str = "master"  # master | kahan | sr
    states: str = "fp32"  # fp32 | bf16 | 8bit
    offload: bool = False  # fp32 master + AdamW states (``states``: fp32 | 8bit) in host memory, AdamW on the CPU
    step_in_backward: bool = False  # each parameter stepped (offload: its gradient sent to the host) in backward
    beta0: bool = False  # drop the reference model (beta = 0)
    micro_rows: int = 0  # sequences per forward/backward pass (0: all the GPU's rows)
    checkpointing: bool = True
    attention: str = "sdpa"
    lean_ops: bool = False  # chunked log-probs + memory-lean mask loss

    def trainer_flags(self, rows: int) -> list[str]:
        """The ``python -m lens_fast.train`` options that run this combination (``rows``: the GPU's rows per
        step), with a note where the trainer has no such option (Kahan / stochastic-rounding AdamW)."""
        flags = ["--gradient-checkpointing true"] if self.checkpointing else []
        if self.offload:  # bf16 weights on the GPU; fp32 masters and states on the host
            flags += ["--precision bf16", "--optimizer-offload true"]
        elif self.weights == "master":
            flags.append("--precision bf16-mixed")  # fp32 weights + autocast's bf16 copies: the 6 B/param counted
        else:
            flags.append(f"--precision bf16 (plan only: the trainer has no {'Kahan-summed' if self.weights == 'kahan' else 'stochastically rounded'} bf16 AdamW)")
        if self.states == "8bit":
            flags.append("--optimizer-states 8bit")
        if self.step_in_backward:
            flags.append("--step-in-backward true" + ("" if self.offload else " --grad-clip 0"))
        if self.micro_rows and self.micro_rows < rows:
            flags.append(f"--micro-batch {self.micro_rows}")
        if self.beta0:
            flags.append("--beta 0")
        if self.gpus > 1:
            flags.append("--sharding fsdp")
        return flags

    def describe(self) -> str:
        parts = [f"CPU-offloaded AdamW (fp32 master + {'' if self.states == 'fp32' else '8bit '}states)" if self.offload else
                 f"{ {'master': 'fp32 master', 'kahan': 'bf16+Kahan', 'sr': 'bf16+SR'}[self.weights]} weights, {self.states} states"]
        if self.step_in_backward:
            parts.append("grads streamed to host in backward" if self.offload else "step in backward")
        if self.beta0:
            parts.append("beta=0")
        if self.gpus > 1:
            parts.append(f"FSDP2 x{self.gpus}")
        return ", ".join(parts)


@dataclass
class Item:
    name: str
    bytes: float
    phases: str  # where it counts: persistent / rollout / reference / sam / train, or "-" (shown only)
    note: str = ""


@dataclass
class Estimate:
    options: Options
    items: list
    phases: dict  # phase -> allocated bytes
    peak_phase: str
    allocated: float
    total: float  # + CUDA context + fragmentation
    host_bytes: float
    time: dict  # component -> seconds
    passes: int

    @property
    def step_time(self) -> float:
        return sum(self.time.values())


def _text_layer_bytes(t: dict, attention: str, seq: int) -> float:
    """Bytes one Qwen2.5 decoder layer saves for backward per token (16-bit activations)."""
    h, i = t["hidden_size"], t["intermediate_size"]
    heads, kv = t["num_attention_heads"], t["num_key_value_heads"]
    d = h // heads
    norms = 2 * (4 * h + 2 * h)  # two RMSNorms: fp32 copy of the input + bf16 normalised
    mlp = 2 * h + 4 * 2 * i  # gate/up input; gate, silu(gate), up, product
    if attention == "flash":  # native GQA; output already [s, heads, d]
        attn = 2 * h + 2 * (heads * d + 2 * kv * d) + 2 * h
    else:  # masked SDPA / eager: K and V repeated to all heads; the output transposed into a copy
        attn = 2 * h + 2 * 3 * heads * d + 2 * h + 2 * h
        if attention == "eager":
            attn += 6 * heads * seq  # fp32 softmax + its bf16 copy, per query token
    return norms + attn + mlp


def _vision_block_bytes(v: dict) -> float:
    h, i = v["hidden_size"], v["intermediate_size"]
    return 2 * 6 * h + 2 * h + 2 * 3 * h + 2 * 2 * h + 2 * h + 4 * 2 * i


def korthikanti_bytes(h: int, heads: int, seq: int, flash: bool) -> float:
    """Korthikanti et al. 2022, eq. 1: a GPT layer's activations per token, sbh(34 + 5as/h) / sb."""
    return 34 * h + (0 if flash else 5 * heads * seq)


def estimate(facts: ModelFacts, shape: Shapes, config: TrainConfig, options: Options) -> Estimate:
    """The itemised per-GPU memory of one GRPO step under ``options`` and its estimated time."""
    o, t, v, s = options, facts.text, facts.vision, facts.sam
    h, layers, vocab = t["hidden_size"], t["num_hidden_layers"], t["vocab_size"]
    trainable = sum(n for part, n in facts.params.items() if part in config.stage2_train)
    frozen = facts.total - trainable
    n = o.gpus
    prompts = math.ceil(config.batch_size / n)
    group = config.num_generations
    rows = prompts * group
    m = o.micro_rows or rows
    passes = math.ceil(rows / m)
    images = min(prompts, math.ceil(m / group))  # images encoded per pass
    beta = config.beta > 0 and not o.beta0
    seq, comp = shape.row, shape.completion
    items: list[Item] = []

    def add(name, nbytes, phases, note=""):
        items.append(Item(name, float(nbytes), phases, note))

    # persistent state
    add("weights, bf16", 2 * (trainable / n + frozen), "all",
        f"2 B x {trainable / 1e9:.3f} B trainable" + (f" / {n}" if n > 1 else "") + f" + {frozen / 1e9:.3f} B frozen")
    if o.offload:  # each process holds its shard's masters, gradient buffer and states: / n per process
        share = f" / {n} per process" if n > 1 else ""
        add("fp32 master weights", 0, "all", f"in host memory: 4 B x {trainable / 1e9:.3f} B{share} "
            "(+ 4 B/param fp32 gradient buffer)")
        add("AdamW states", 0, "all", f"in host memory: {STATE_BYTES[o.states]:.2f} B x {trainable / 1e9:.3f} B{share}")
    else:
        add({"master": "fp32 master weights", "kahan": "Kahan compensation (bf16)", "sr": "master weights"}[o.weights],
            WEIGHT_EXTRA[o.weights] * trainable / n, "all",
            {"master": "4 B/param", "kahan": "2 B/param", "sr": "none: bf16 updates with stochastic rounding"}[o.weights])
        add(f"AdamW states, {o.states}", STATE_BYTES[o.states] * trainable / n, "all",
            f"{STATE_BYTES[o.states]:.2f} B/param (m, v)")
    grad_full = 2 * trainable / n
    if o.step_in_backward:
        add("gradients (step in backward)", 2 * (facts.largest_tensor + facts.text_layer_params), "sam train",
            "largest tensor (tied embedding: lives all backward) + one layer in flight"
            + ("; accumulated in fp32 in host memory" if o.offload else ""))
    else:
        add("gradients, bf16 buffer", grad_full, "sam train", "2 B/param; freed after the step (zero_grad(set_to_none))")
    add("reference model (bf16 policy)", 2 * facts.policy / n if beta else 0, "all",
        f"2 B x {facts.policy / 1e9:.3f} B" if beta else "beta = 0: none")
    if n > 1:
        layer = 2 * facts.text_layer_params
        add("FSDP2 all-gather / reduce-scatter buffers", 2 * (2 * facts.largest_tensor) + 3 * layer, "all",
            "largest unit (embeddings) + layers in flight")
        add("FSDP2: policy unsharded for the rollout", 2 * facts.policy * (1 - 1 / n), "rollout",
            "generation with sharded weights would all-gather every decode step")

    # rollout (no grad): the whole group at once
    kv_per_token = layers * 2 * t["num_key_value_heads"] * (h // t["num_attention_heads"]) * 2
    add("KV cache (rollout)", rows * (shape.prompt + comp) * kv_per_token, "rollout",
        f"{rows} rows x {shape.prompt + comp} tokens x {kv_per_token / 1e3:.1f} KB")
    add("sampling logits (rollout)", rows * vocab * 4 * 6, "rollout", "[rows, V] fp32, ~6 copies in top-k/top-p")

    # the training pass (m rows)
    per_layer = _text_layer_bytes(t, o.attention, seq)
    tokens = m * seq
    full = tokens * (per_layer * layers + 10 * h)
    ckpt = tokens * (2 * h * layers + per_layer + 10 * h)
    add("activations: policy LLM, no checkpointing", full, "" if o.checkpointing else "train",
        f"{per_layer / h:.1f} sbh per layer x {layers} ({o.attention}); Korthikanti GPT layer: "
        f"{korthikanti_bytes(h, t['num_attention_heads'], seq, o.attention != 'eager') / h:.1f} sbh")
    add("activations: policy LLM, checkpointing", ckpt, "train" if o.checkpointing else "", "2 sbh per layer + one layer's set")
    vb = _vision_block_bytes(v)
    vtokens = images * shape.patches
    if "vision" in config.stage2_train:
        vision = vtokens * (2 * v["hidden_size"] * v["depth"] + vb) if o.checkpointing else vtokens * vb * v["depth"]
        add("activations: vision tower", vision, "train", f"{images} image(s) x {shape.patches} patches")
    if facts.mode == "queries":
        add("activations: connector", m * shape.queries * 34 * facts.connector_hidden * facts.connector_depth, "train",
            "34 sbh per block (Korthikanti)")
    chunk_tokens = max(1, LOGPROB_CHUNK_ELEMENTS // vocab)
    naive_logits = m * comp * vocab * 12
    lean_logits = min(m * comp, chunk_tokens) * vocab * 12
    add("log-probs: naive [tokens, V] fp32", naive_logits, "" if o.lean_ops else "train",
        f"{m * comp} tokens x {vocab} x 12 B (saved log-softmax + backward's fp32 grads)")
    add("log-probs: chunked (ops.token_logprobs)", lean_logits, "train" if o.lean_ops else "", f"{chunk_tokens} tokens per chunk")
    e = s["image_size"] // s["patch_size"]
    sam_tokens = e * e
    attn_copies = 3 * s["encoder_num_heads"] * sam_tokens**2 * 2
    add("SAM encoder forward (frozen, no grad)", images * (attn_copies + sam_tokens * s["encoder_embed_dim"] * 2 * 12), "sam",
        f"{images} image(s); global attention: 3 x [heads, {sam_tokens}, {sam_tokens}] bf16 (segment_anything's explicit softmax)")
    add("SAM decoder + low-res masks", m * (14 * s["prompt_embed_dim"] * sam_tokens * 2 + (4 * e) ** 2 * 4), "train",
        "~14 [C, e, e] bf16 tensors per row")
    gt = shape.image[0] * shape.image[1]
    add("mask loss at GT resolution: plain", m * gt * 4 * 8, "" if o.lean_ops else "train", "8 fp32 [H, W] per row")
    add("mask loss at GT resolution: lean (ops.mask_loss)", m * shape.image[1] * 4 * 16, "train" if o.lean_ops else "",
        "banded: a few rows at a time")
    if beta:
        ref_logits = (min(m * comp, chunk_tokens) if o.lean_ops else m * comp) * vocab * 10
        add("reference pass (no grad)", ref_logits + tokens * per_layer, "reference", "logits + one layer's transient")

    phases = {}
    for phase in ("rollout", "reference", "sam", "train"):
        phases[phase] = sum(i.bytes for i in items if i.phases == "all" or phase in i.phases.split())
    if not beta:
        phases.pop("reference")
    peak_phase = max(phases, key=phases.get)
    allocated = phases[peak_phase]
    total = allocated * (1 + FRAGMENTATION) + CUDA_CONTEXT
    # masters + the fp32 gradient buffer + states, all processes together (each holds its 1/n)
    host = (4 + 4 + STATE_BYTES[o.states]) * trainable if o.offload else 0.0

    # step time (estimates)
    p_llm = facts.params["llm"] - vocab * h
    fwd_text = 2 * p_llm * rows * seq + 2 * h * vocab * rows * comp + 2 * layers * h * rows * seq**2
    fwd_vision = 2 * facts.params["vision"] * prompts * shape.patches
    conn = facts.params["connector"] - facts.conv_params
    fwd_conn = 2 * conn * rows * shape.queries + 2 * facts.conv_params * rows if facts.mode == "queries" else 0
    fwd_sam = 2 * facts.params["sam_encoder"] * prompts * sam_tokens + 4 * sam_tokens**2 * s["encoder_embed_dim"] * prompts * 4
    factor = 4 if o.checkpointing else 3
    flops = factor * (fwd_text + fwd_vision + fwd_conn) + fwd_sam
    time = {"train pass": flops / (GPU_TFLOPS * 1e12)}
    vision_repeat = max(0, passes - prompts) * fwd_vision / prompts * factor  # a prompt's group split over passes
    time["micro-batching"] = (passes - 1) * PASS_OVERHEAD + vision_repeat / (GPU_TFLOPS * 1e12)
    llm_bytes = 2 * facts.params["llm"]
    avg_kv = rows * (shape.prompt + comp / 2) * kv_per_token
    prefill = (2 * p_llm * prompts * shape.prompt + fwd_vision) / (GPU_TFLOPS * 1e12)
    time["rollout"] = prefill + comp * max(DECODE_STEP_FLOOR, (llm_bytes + avg_kv) / GPU_BANDWIDTH)
    if beta:
        time["reference pass"] = (fwd_text + fwd_vision) / (GPU_TFLOPS * 1e12)
    if o.offload:
        time["optimizer (CPU offload)"] = 2 * 2 * trainable / n / PCIE_BANDWIDTH \
            + trainable / n / cpu_adam_rate(host_threads(config), n)
        if o.step_in_backward and passes > 1:  # every pass sends its gradients; the host adds them up in fp32
            time["gradients to host per pass"] = (passes - 1) * 2 * trainable / n / PCIE_BANDWIDTH \
                + passes * 10 * trainable / n / HOST_BANDWIDTH
    else:
        touched = 2 + 2 + 2 * (WEIGHT_EXTRA[o.weights] + STATE_BYTES[o.states])
        time["optimizer (GPU)"] = touched * trainable / n / GPU_BANDWIDTH * (1.2 if o.states == "8bit" else 1.0)
    if n > 1:
        weights = 2 * trainable / n * (n - 1)  # bytes each GPU receives for one all-gather of the sharded weights
        comm = passes * 2 * weights + weights + 2 * facts.policy * (n - 1) / n * (2 if beta else 1)
        time["FSDP2 communication"] = comm / BUS_BANDWIDTH
    return Estimate(o, items, phases, peak_phase, allocated, total, host, time, passes)


# ---- the plan --------------------------------------------------------------------------------------
@dataclass
class MemoryPlan:
    config: TrainConfig
    facts: ModelFacts
    shape: Shapes
    chosen: Estimate
    budget: float
    candidates: list = field(default_factory=list)  # fitting Estimates for config.plan_gpus, best first
    tried: int = 0
    pick: Optional[Estimate] = None
    by_gpus: dict = field(default_factory=dict)  # gpus -> the pick (or None)
    trainable: int = 0


def planned_states(config: TrainConfig) -> str:
    """The AdamW states the trainer keeps for ``config``: ``optimizer_states``, with fp32 meaning the parameters'
    dtype (bf16 under ``precision=bf16``)."""
    if config.optimizer_states == "fp32" and config.precision == "bf16":
        return "bf16"
    return config.optimizer_states


def options_of(config: TrainConfig) -> Options:
    return Options(
        gpus=config.plan_gpus, weights=config.plan_weights, states=planned_states(config), offload=config.optimizer_offload,
        step_in_backward=config.step_in_backward, beta0=False, micro_rows=config.micro_batch,
        checkpointing=config.gradient_checkpointing, attention=config.plan_attention, lean_ops=config.plan_lean_ops,
    )


def _micro_sizes(rows: int) -> list:
    sizes = {rows}
    size = 1
    while size < rows:
        sizes.add(size)
        size *= 2
    return sorted(sizes, reverse=True)


def search(facts: ModelFacts, shape: Shapes, config: TrainConfig, gpus: int, budget: float) -> tuple[list, int]:
    """Every combination for ``gpus`` GPUs (checkpointing, flash attention and the lean ops on: they cost
    little), each with the fewest passes that fit; (fitting estimates, best first; combinations tried)."""
    rows = math.ceil(config.batch_size / gpus) * config.num_generations
    optimizers = [(w, st, False) for w in PLAN_WEIGHTS for st in STATE_KINDS] + [("master", st, True) for st in ("fp32", "8bit")]
    fitting, tried = [], 0
    for (weights, states, offload), step_bwd, beta0 in itertools.product(optimizers, (False, True),
                                                                         (False, True) if config.beta > 0 else (True,)):
        if not trainer_runs(weights, states, offload, step_bwd, gpus, config):
            continue
        tried += 1
        base = Options(gpus=gpus, weights=weights, states=states, offload=offload, step_in_backward=step_bwd,
                       beta0=beta0, checkpointing=True, attention="flash", lean_ops=True)
        # no gradient accumulation without a buffer, unless the gradients accumulate in host memory
        for micro in ([rows] if step_bwd and not offload else _micro_sizes(rows)):
            found = estimate(facts, shape, config, dataclasses.replace(base, micro_rows=micro))
            if found.total <= budget:
                fitting.append(found)
                break
    fitting.sort(key=lambda e: (_changes_objective(e, config), e.step_time))
    return fitting, tried


def trainer_runs(weights: str, states: str, offload: bool, step_in_backward: bool, gpus: int, config: TrainConfig) -> bool:
    """Whether ``python -m lens_fast.train`` runs this combination (the search considers no other): fp32
    master weights (``bf16-mixed``, or offloaded masters under ``bf16``) with fp32 or 8-bit states (no Kahan
    or stochastic-rounding AdamW); over several GPUs (FSDP2) torch's fp32 AdamW or the offloaded one (fp32 or
    8-bit host states), no step in backward; step in backward without offload only at ``grad_clip`` 0 (the
    step comes before the global gradient norm)."""
    if weights != "master" or states not in ("fp32", "8bit"):
        return False
    if gpus > 1 and (step_in_backward or (states != "fp32" and not offload)):
        return False
    return not (step_in_backward and not offload and config.grad_clip > 0)


def _changes_objective(e: Estimate, config: TrainConfig) -> bool:
    return e.options.beta0 and config.beta > 0


def _numerics(e: Estimate) -> int:
    return NUMERICS_RANK[(e.options.weights, e.options.states)]  # (offloaded: fp32 masters, as "master")


def choose(fitting: list, config: TrainConfig) -> Optional[Estimate]:
    """Keep the configured objective (beta) if any combination does; among those, the soundest numerics
    within 5% of the fastest estimated step; then the faster."""
    if not fitting:
        return None
    keep = [e for e in fitting if not _changes_objective(e, config)] or fitting
    fastest = min(e.step_time for e in keep)
    return min((e for e in keep if e.step_time <= 1.05 * fastest), key=lambda e: (_numerics(e), e.step_time))


def plan(config: TrainConfig) -> MemoryPlan:
    """The memory plan of ``config``'s GRPO stage (see the module's docstring)."""
    rows = math.ceil(config.batch_size / config.plan_gpus) * config.num_generations
    if config.step_in_backward and not config.optimizer_offload and 0 < config.micro_batch < rows:
        raise ValueError(f"step_in_backward without optimizer_offload cannot take micro_batch {config.micro_batch} < the GPU's rows "
                         f"({rows}): accumulating gradients over passes needs the gradient buffer (or the host's)")
    facts = model_facts(config)
    shape = shapes(facts, config)
    budget = config.plan_gpu_memory_gb * GB
    chosen = estimate(facts, shape, config, options_of(config))
    result = MemoryPlan(config, facts, shape, chosen, budget,
                        trainable=sum(n for part, n in facts.params.items() if part in config.stage2_train))
    result.candidates, result.tried = search(facts, shape, config, config.plan_gpus, budget)
    result.pick = choose(result.candidates, config)
    for gpus in sorted({1, 2, 4, 8, config.plan_gpus}):
        found, _ = search(facts, shape, config, gpus, budget) if gpus != config.plan_gpus else (result.candidates, 0)
        result.by_gpus[gpus] = choose(found, config)
    return result


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _gb(x: float) -> str:
    return f"{x / GB:7.2f}"


def format_plan(p: MemoryPlan, source: str = "") -> str:
    c, f, s, e = p.config, p.facts, p.shape, p.chosen
    o = e.options
    lines = [f"Memory plan{' of ' + source if source else ''} (estimates, not measurements): one GRPO step, per GPU",
             f"model: {f.name}; built on the meta device (no weights read)"]
    parts = " | ".join(f"{k} {_count(v)}{'' if k in c.stage2_train else ' (frozen)'}" for k, v in f.params.items())
    lines += [f"parameters: {_count(f.total)} = {parts}",
              f"  trainable (stage2_train): {_count(p.trainable)}; policy (vision + llm, the reference copy): {_count(f.policy)}"]
    lines.append(
        f"sequence: {s.image[1]}x{s.image[0]} image -> smart resize {s.resized[1]}x{s.resized[0]} -> {s.patches} patches -> "
        f"{s.image_tokens} image tokens; prompt {s.prompt} tokens ({s.text_tokens} text, estimated at {CHARS_PER_TOKEN:g} chars/token); "
        f"completion {s.completion} ({'plan_completion_tokens' if c.plan_completion_tokens else 'max_new_tokens: the worst case'}); "
        f"{s.queries} queries -> {s.row} tokens per training row")
    rows = math.ceil(c.batch_size / o.gpus) * c.num_generations
    lines.append(f"batch: {c.batch_size} prompts x {c.num_generations} generations over {o.gpus} GPU(s) = {rows} rows per GPU, "
                 f"{(o.micro_rows or rows)} per pass ({e.passes} pass{'es' if e.passes > 1 else ''})")
    lines.append(f"options: {o.describe()}; beta {c.beta}; {o.attention} attention; gradient checkpointing "
                 f"{'on' if o.checkpointing else 'off'}; {'chunked log-probs + lean mask loss' if o.lean_ops else 'naive log-probs + plain mask loss'}")
    lines += ["", f"  {'item':<52}{'GB':>8}  {'counts in':<14}note"]
    for item in e.items:
        where = item.phases if item.phases else "- (not used)"
        lines.append(f"  {item.name:<52}{_gb(item.bytes)}  {where:<14}{item.note}")
    lines.append("  phase totals (allocated): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in e.phases.items()))
    lines.append(f"  estimated peak: {e.allocated / GB:.2f} GB allocated ({e.peak_phase}) + {FRAGMENTATION:.0%} fragmentation + "
                 f"{CUDA_CONTEXT / GB:.1f} GB CUDA context = {e.total / GB:.2f} GB per GPU -> "
                 f"{'fits' if e.total <= p.budget else 'does NOT fit'} {p.budget / GB:g} GB"
                 + (f"; host memory {e.host_bytes / GB:.1f} GB" if e.host_bytes else ""))
    lines.append("  estimated step time: " + ", ".join(f"{k} {v:.1f} s" for k, v in e.time.items()) + f" = {e.step_time:.1f} s")

    lines += ["", f"Within {p.budget / GB:g} GB per GPU on {c.plan_gpus} GPU(s) (checkpointing, flash attention, chunked log-probs and "
              f"lean mask loss on): {len(p.candidates)} of {p.tried} combinations fit; best first:"]
    lines.append(f"    {'combination':<84}{'rows/pass':>10}{'peak GB':>9}{'step s':>8}  host RAM GB")
    ordered = ([p.pick] if p.pick is not None else []) + [e for e in p.candidates if e is not p.pick]
    shown = ordered[:12]
    for cand in shown:
        mark = "->" if cand is p.pick else "  "
        lines.append(f"  {mark}{cand.options.describe():<84}{cand.options.micro_rows:>10}{cand.total / GB:>9.2f}"
                     f"{cand.step_time:>8.1f}  {cand.host_bytes / GB:.0f}")
    if len(p.candidates) > len(shown):
        lines.append(f"    ... and {len(p.candidates) - len(shown)} more")
    lines += ["", "What each option costs (estimates):"]
    lines += [f"  - {line}" for line in option_costs(p)]
    lines.append("")
    if p.pick is None:
        lines.append(f"The plan picks: nothing fits {p.budget / GB:g} GB on {c.plan_gpus} GPU(s); see the other GPU counts below.")
    else:
        lines.append(f"The plan picks: {p.pick.options.describe()}, {p.pick.options.micro_rows} rows per pass "
                     f"({p.pick.passes} pass{'es' if p.pick.passes > 1 else ''}), peak {p.pick.total / GB:.1f} GB, ~{p.pick.step_time:.0f} s per step "
                     f"({', '.join(f'{k} {v:.1f} s' for k, v in p.pick.time.items())}).")
        lines.append(f"  Why: {why(p)}")
        launcher = f"torchrun --nproc_per_node {c.plan_gpus} -m lens_fast.train" if c.plan_gpus > 1 else "python -m lens_fast.train"
        rows = math.ceil(c.batch_size / c.plan_gpus) * c.num_generations
        flash = " (with flash-attn installed: pip install 'lens_fast[flash]')" if p.pick.options.attention == "flash" else ""
        command = [launcher, *(["--config", source] if source else []), *p.pick.options.trainer_flags(rows)]
        lines.append(f"  Run it: {' '.join(command)}{flash}")
    lines.append("Other GPU counts (the same ranking): " + "; ".join(
        f"{g}: " + (f"{best.options.describe()}, {best.options.micro_rows} rows/pass, {best.total / GB:.1f} GB, ~{best.step_time:.0f} s"
                    if best else "nothing fits") for g, best in p.by_gpus.items()))
    lines += ["", "Assumptions: " + assumptions(c)]
    return "\n".join(lines)


def assumptions(config: TrainConfig) -> str:
    """The plan's stated assumptions, the host AdamW's thread count (:func:`host_threads`) among them."""
    threads = host_threads(config)
    source = "threads" if config.threads else "threads 0: torch's choice here"
    return (
        f"a typical {TYPICAL_IMAGE[1]}x{TYPICAL_IMAGE[0]} RefCOCO image (synthetic data: its largest square); the completion at max_new_tokens (rows are padded to the "
        "longest completion; set --plan-completion-tokens for a typical length); the whole per-GPU group generated at once "
        "(KV cache) and gradients freed after each step; the reference is a bf16 copy of the policy (the trainer keeps its "
        "context queries, 0.1 M parameters, and drops SAM and the connector); the SAM encoder runs the images of one "
        "pass at a time; FSDP2 shards the trainable modules and the policy is unsharded for the rollout (the trainer's "
        "--sharding fsdp also shards the frozen SAM encoder, counted whole here: an upper bound); only combinations the "
        "trainer runs are searched. Step times assume a 24 GB RTX 4090-class card: "
        f"{GPU_TFLOPS:g} TFLOPS sustained bf16, {GPU_BANDWIDTH / 1e12:.1f} TB/s, PCIe {PCIE_BANDWIDTH / 1e9:g} GB/s, "
        f"NCCL {BUS_BANDWIDTH / 1e9:g} GB/s per GPU, CPU AdamW {CPU_ADAM_RATE_PER_THREAD / 1e6:g} M params/s per thread on "
        f"{threads} thread{'s' if threads > 1 else ''} per process ({source}; "
        f"at most host memory {HOST_BANDWIDTH / 1e9:g} GB/s / {ADAM_HOST_BYTES} B per update, shared by a node's processes: "
        f"{cpu_adam_rate(threads, 1) / 1e9:.2f} G params/s for one), a {DECODE_STEP_FLOOR * 1e3:g} ms "
        "floor per decode step (eager transformers), FSDP communication not overlapped (an upper bound)."
    )


def option_costs(p: MemoryPlan) -> list:
    c, f = p.config, p.facts
    tr = p.trainable
    rows = math.ceil(c.batch_size / c.plan_gpus) * c.num_generations
    offload = 2 * 2 * tr / PCIE_BANDWIDTH + tr / cpu_adam_rate(host_threads(c), 1)
    return [
        f"beta = 0: no reference model ({2 * f.policy / GB:.1f} GB) and no reference pass (saves time); changes the "
        f"objective (no KL to the stage-1 model; TRL's default, LENS uses {c.beta})",
        f"8-bit AdamW states (bitsandbytes / torchao, blockwise): 2 B/param instead of 8 ({6 * tr / GB:.1f} GB less); a small "
        "de/quantisation overhead on a memory-bound step (~+20% of a ~0.1 s optimizer step); noisier states",
        f"pure bf16 AdamW: no fp32 master ({4 * tr / GB:.1f} GB less); needs stochastic rounding (torchao "
        "_AdamW(bf16_stochastic_round=True)) or Kahan summation (+2 B/param): at lr ~3e-6 an update is below half a bf16 "
        "ulp of any weight above ~8e-4, so plain bf16 AdamW (the trainer's AdamW on bf16 parameters today) drops nearly "
        "every update",
        f"CPU offload of fp32 master + AdamW states: 0 GPU bytes for them, {16 * tr / GB:.0f} GB of host RAM with fp32 states "
        f"({10 * tr / GB:.0f} GB with 8-bit ones; master, gradient buffer, states; / N per process under FSDP2); per step "
        f"{4 * tr / GB:.1f} GB over PCIe (grads down, bf16 weights up) + a CPU AdamW pass: ~{offload:.1f} s at the assumed rates; "
        f"with the gradients streamed to the host in backward (ZeRO-Offload's way) no GPU gradient buffer either, at "
        f"{2 * tr / GB:.1f} GB over PCIe and an fp32 accumulation in host memory per extra pass (~"
        f"{2 * tr / PCIE_BANDWIDTH + 10 * tr / HOST_BANDWIDTH:.1f} s each, not overlapped: an upper bound)",
        f"optimizer step in backward (post-accumulate-grad hooks, offload: grads streamed to the CPU): no gradient buffer "
        f"({2 * tr / GB:.1f} GB less); no time cost; without offload no global-norm clipping (the trainer needs grad_clip 0; "
        f"now {c.grad_clip}, so the search skips it) and no gradient accumulation: the whole group in one pass; with "
        "offload the host accumulates and clips",
        f"micro-batching the GPU's {rows} rows: activations / k; the same FLOPs in k passes (~{PASS_OVERHEAD * 1e3:.0f} ms "
        "each in launches), plus one vision re-encoding per extra pass that splits a prompt's group; needs a gradient buffer "
        "(on the GPU, or the host's with streamed gradients)",
        f"FSDP2 over N GPUs (with or without the offloaded AdamW): weights, grads and states / N (the frozen SAM encoder replicated); per step each GPU receives "
        "~(N-1)/N of the trainable bf16 weights twice per pass + once for the rollout's unsharding and sends its gradients "
        f"once (~{2 * tr / GB:.1f} GB each way per pass at N = 2); each GPU generates and trains B/N prompts",
        "gradient checkpointing: one more forward in backward (~+33% of the training pass FLOPs); chunked log-probs and "
        "the lean mask loss: the same values for a small recompute",
    ]


def why(p: MemoryPlan) -> str:
    pick, c = p.pick, p.config
    text = []
    same = [e for e in p.candidates if not (e.options.beta0 and c.beta > 0)]
    if c.beta > 0 and pick.options.beta0:
        text.append(f"no combination keeps beta = {c.beta} within the budget on {c.plan_gpus} GPU(s) (the reference alone is "
                    f"{2 * p.facts.policy / c.plan_gpus / GB:.1f} GB), so beta = 0")
    elif c.beta > 0 and same:
        text.append(f"it keeps beta = {c.beta} (the objective as configured)")
    text.append(f"among those it has the soundest numerics within 5% of the fastest estimate ({pick.step_time:.0f} s)")
    other = [e for e in p.candidates if e.options.beta0 != pick.options.beta0]
    if c.beta > 0 and not pick.options.beta0 and other:
        best = min(other, key=lambda e: e.step_time)
        text.append(f"with beta = 0 instead, {best.options.describe()} would take ~{best.step_time:.0f} s")
    if pick.options.offload:
        cost = pick.time.get("optimizer (CPU offload)", 0) + pick.time.get("gradients to host per pass", 0)
        text.append("the offloaded optimizer keeps fp32 master weights and states (no numerical compromise) at the cost of "
                    f"~{cost:.1f} s of PCIe + CPU work per step")
    if pick.passes > 1:
        text.append(f"{pick.passes} passes of {pick.options.micro_rows} rows keep the activations within budget")
    if pick.total > 0.9 * p.budget:
        text.append(f"the margin is thin ({(p.budget - pick.total) / GB:.1f} GB, within this estimate's error): halve the rows "
                    f"per pass for headroom (~{PASS_OVERHEAD * pick.passes:.1f} s more)")
    return "; ".join(text) + "."


def print_plan(config: TrainConfig, source: str = "") -> int:
    """Print the plan of ``config``; 0, or 2 with one line on stderr for a config the plan cannot take."""
    import sys

    try:
        result = plan(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_plan(result, source))
    return 0
