"""Building LENS models: from a config, tiny and offline, from our checkpoints, from released weights.

- :func:`build_lens`: random weights for a :class:`LensConfig` (on the meta device for a memory plan).
- :func:`build_tiny_lens`: a ~0.5 M-parameter model built offline in about a second (tests, the
  default training run).
- :func:`real_config`: the shipped real architecture (Qwen2.5-VL-3B + SAM) with a given tokenizer's
  special-token ids (the memory plan builds it on the meta device with the tiny tokenizer).
- :func:`save_pretrained` / :func:`from_pretrained`: our checkpoints (``lens_config.json``,
  ``model.safetensors``, tokenizer files).
- :func:`from_components`: a Qwen2.5-VL Hugging Face directory + a segment_anything SAM ``.pth``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from lens_fast.model.config import LensConfig, SamConfig
from lens_fast.model.lens import LensModel
from lens_fast.model.policy import Policy
from lens_fast.model.segmenter import Segmenter, build_sam
from lens_fast.model.tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer, special_token_ids

log = logging.getLogger("lens_fast.model")

CONFIG_FILE = "lens_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # 2: SAM v1's padded input geometry; LENS's connector (position embedding, no final norm)
SAM_TYPES = ("vit_b", "vit_l", "vit_h")


def architecture(name: str) -> dict:
    """A shipped architecture (``configs/architectures/<name>.json``): ``qwen2.5-vl-3b-instruct``,
    ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``. Each file names its source."""
    try:
        # one name per joinpath: lens_fast.configs is a namespace package, whose MultiplexedPath takes one (Python 3.11)
        text = resources.files("lens_fast.configs").joinpath("architectures").joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        raise ValueError(f"no shipped architecture {name!r}") from None
    values = json.loads(text)
    values.pop("_source", None)
    return values


def sam_architecture(sam_type: Union[str, SamConfig, dict]) -> dict:
    """SAM sizes as a dict: a released type (``vit_b``, ``vit_l``, ``vit_h``), a :class:`SamConfig`,
    or a dict of SamConfig fields (e.g. a tiny SAM)."""
    if isinstance(sam_type, SamConfig):
        return dataclasses.asdict(sam_type)
    if isinstance(sam_type, dict):
        return dataclasses.asdict(SamConfig(**_check_sam_keys(sam_type)))
    if not isinstance(sam_type, str) or sam_type not in SAM_TYPES:
        raise ValueError(f"sam_type must be one of {SAM_TYPES}, a SamConfig or a dict of its fields, got {sam_type!r}")
    return architecture(f"sam_{sam_type}")


def _check_sam_keys(values: dict) -> dict:
    known = {f.name for f in dataclasses.fields(SamConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown sam config keys {unknown}; known: {sorted(known)}")
    return values


def attention_implementation(device: Union[str, torch.device]) -> str:
    """``flash_attention_2`` when flash-attn imports and ``device`` is CUDA, else ``sdpa``; logged."""
    choice = "sdpa"
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401

            choice = "flash_attention_2"
        except ImportError:
            pass
    log.info("attention: %s on %s", choice, device)
    return choice


def default_dtype(device: Union[str, torch.device]) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _qwen_config(values: dict, attention: str) -> Qwen2_5_VLConfig:
    config = Qwen2_5_VLConfig.from_dict(values)
    config._attn_implementation = attention
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = attention
    return config


def build_lens(config: LensConfig, tokenizer, *, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None, attention: Optional[str] = None) -> LensModel:
    """A LensModel with random weights (``device="meta"``: shapes only, no memory). ``attention``: the
    policy's attention implementation (default: :func:`attention_implementation` of ``device``)."""
    attention = attention or attention_implementation(device if str(device) != "meta" else "cpu")
    with torch.device(device):
        qwen = Qwen2_5_VLForConditionalGeneration(_qwen_config(config.qwen, attention))
        model = LensModel(config, Policy(qwen, tokenizer), Segmenter(build_sam(config.sam_config)))
    return model.to(dtype or default_dtype(device)) if str(device) != "meta" else model


def tiny_config(tokenizer, **overrides: Any) -> LensConfig:
    """The tiny LENS: Qwen2.5-VL text 64 x 2 layers, vision 32 x depth 2 at <= 168^2 pixels; SAM at 256 px
    with a 32-d prompt space; 16 queries, one connector block. ``overrides``: LensConfig fields."""
    ids = special_token_ids(tokenizer)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.2,  # 0.02 leaves the mask independent of the expression (TRAINING_NOTES)
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        initializer_range=0.02,
    )
    qwen = dict(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True,
    )
    sam = SamConfig(
        image_size=256, patch_size=16, encoder_embed_dim=48, encoder_depth=2, encoder_num_heads=2,
        encoder_global_attn_indexes=(1,), window_size=4, use_rel_pos=True, prompt_embed_dim=32, mask_in_chans=4,
        decoder_depth=2, decoder_mlp_dim=64, decoder_num_heads=2, iou_head_hidden_dim=32,
    )
    values = dict(
        qwen=qwen, sam=dataclasses.asdict(sam), num_queries=16, connector_depth=1, connector_heads=4,
        min_pixels=56 * 56, max_pixels=168 * 168, max_new_tokens=40,
    )
    values.update(overrides)
    return LensConfig.from_dict(values)


QWEN_SPECIAL_IDS = {
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
    "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
}
"""Qwen2.5-VL config fields that hold a special token's id (the released config's values are Qwen's ids)."""


def real_config(tokenizer, sam_type: str = "vit_l", **overrides: Any) -> LensConfig:
    """The shipped Qwen2.5-VL-3B-Instruct architecture + SAM ``sam_type`` (``configs/architectures``).

    The Qwen config's special-token ids are set to ``tokenizer``'s, so that a model with the real
    shapes can be built without the released tokenizer: with :func:`build_tiny_tokenizer` for a
    memory plan on the meta device or a random-weight benchmark (every tiny id is inside the real
    vocabulary, whose size is kept); with Qwen's own tokenizer the ids are the released ones.
    ``overrides``: LensConfig fields."""
    qwen = architecture("qwen2.5-vl-3b-instruct")
    if len(tokenizer) > qwen["text_config"]["vocab_size"]:
        raise ValueError(f"the tokenizer's {len(tokenizer)} tokens exceed the vocabulary of {qwen['text_config']['vocab_size']}")
    ids = special_token_ids(tokenizer)
    for key, token in QWEN_SPECIAL_IDS.items():
        qwen[key] = ids[token]
        if key in qwen["text_config"]:
            qwen["text_config"][key] = ids[token]
    return LensConfig.from_dict({"qwen": qwen, "sam": sam_architecture(sam_type), **overrides})


def build_tiny_lens(seed: int = 0, **overrides: Any) -> LensModel:
    """A tiny random LENS built offline (fp32, CPU): see :func:`tiny_config`."""
    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    return build_lens(config, tokenizer, device="cpu", dtype=torch.float32)


# ---- our checkpoints ---------------------------------------------------------------------------------
def save_pretrained(model: LensModel, directory: Union[str, Path]) -> None:
    """Write ``lens_config.json``, ``model.safetensors`` and the tokenizer into ``directory``; each file
    is written under a temporary name and renamed, so a crash never leaves a half-written file."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(directory)
    staged = directory / f".{WEIGHTS_FILE}.tmp"
    save_model(model, str(staged), metadata={"format": "lens_fast", "version": str(FORMAT_VERSION)})
    staged.replace(directory / WEIGHTS_FILE)
    staged = directory / f".{CONFIG_FILE}.tmp"
    staged.write_text(json.dumps({"format_version": FORMAT_VERSION, **model.config.to_dict()}, indent=2, sort_keys=True) + "\n")
    staged.replace(directory / CONFIG_FILE)


def load_tokenizer(directory: Union[str, Path]):
    """A Qwen2.5-VL tokenizer from ``directory``, with Qwen2-VL's chat template if it has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {directory}: {error}") from None
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    special_token_ids(tokenizer)
    return tokenizer


def read_config(directory: Union[str, Path]) -> LensConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a lens_fast checkpoint: no {CONFIG_FILE}")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    version = values.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this lens_fast reads version {FORMAT_VERSION}")
    return LensConfig.from_dict(values)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model`` strictly; ValueError naming the file and what differs."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise FileNotFoundError(f"missing weight file {path}")
    try:
        load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    except RuntimeError as error:
        raise ValueError(f"{path} does not match the model built from its config: {error}") from None


def from_pretrained(directory: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                    dtype: Optional[torch.dtype] = None) -> LensModel:
    """Load a checkpoint written by :func:`save_pretrained`. The model is built and loaded in fp32 in host
    memory, cast to ``dtype`` there and moved to ``device`` once: the device holds only the final weights
    (an fp32 build on a 24 GB GPU would take 18 GB for the 4.5 B-parameter recipe, beside the trained model
    when stage 2 loads its reference)."""
    directory = Path(directory)
    config = read_config(directory)
    tokenizer = load_tokenizer(directory)
    model = build_lens(config, tokenizer, device="cpu", dtype=torch.float32, attention=attention_implementation(device))
    load_weights(model, directory / WEIGHTS_FILE)
    return model.to(dtype=dtype or default_dtype(device)).to(device=device)


# ---- released weights ------------------------------------------------------------------------------
def from_components(
    qwen_dir: Union[str, Path], sam_checkpoint: Union[str, Path], sam_type: Union[str, SamConfig, dict] = "vit_l", *,
    device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None, **overrides: Any,
) -> LensModel:
    """A LENS model from a Qwen2.5-VL(-3B-Instruct) Hugging Face directory and a segment_anything SAM
    checkpoint (``sam_vit_b_01ec64.pth``-style state dict); context queries and connector start random.
    ``sam_type``: ``vit_b``/``vit_l``/``vit_h``, or the SAM's sizes as a :class:`SamConfig` or dict.
    ``overrides``: LensConfig fields (``mode``, ``num_queries``, ...). Local files only."""
    sam_values = sam_architecture(sam_type)
    qwen_dir, sam_checkpoint = Path(qwen_dir), Path(sam_checkpoint)
    if not (qwen_dir / "config.json").is_file():
        raise FileNotFoundError(f"{qwen_dir} is not a Hugging Face model directory: no config.json")
    if not sam_checkpoint.is_file():
        raise FileNotFoundError(f"missing SAM checkpoint {sam_checkpoint}")
    dtype = dtype or default_dtype(device)
    tokenizer = load_tokenizer(qwen_dir)
    try:
        qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(qwen_dir), dtype=dtype, attn_implementation=attention_implementation(device), local_files_only=True
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load Qwen2.5-VL from {qwen_dir}: {error}") from None
    config = LensConfig.from_dict({"qwen": qwen.config.to_dict(), "sam": sam_values, **overrides})
    sam = build_sam(config.sam_config)
    try:
        state = torch.load(sam_checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a corrupt file
        raise ValueError(f"cannot read SAM checkpoint {sam_checkpoint}: {error}") from None
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as error:
        name = sam_type if isinstance(sam_type, str) else "checkpoint of the given config"
        raise ValueError(f"{sam_checkpoint} is not a SAM {name}: {error}") from None
    model = LensModel(config, Policy(qwen, tokenizer), Segmenter(sam))
    return model.to(device=device, dtype=dtype)
