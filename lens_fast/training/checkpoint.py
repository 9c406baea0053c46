"""Training checkpoints: model, optimiser, scheduler, RNG states, step, stage and data position, written
atomically under ``<output_dir>/checkpoints/``: each is written in a staging directory, renamed to its own
name (``step_<step>``, ``stage1``, ``final``), and only then named by the pointer file ``latest``, replaced in
one atomic rename: at every moment ``latest`` names a complete checkpoint. The last ``keep`` periodic
(``step_*``) checkpoints are kept; ``stage1`` (the KL reference) and ``final`` always.

Two formats: a full checkpoint (process 0 writes ``save_pretrained`` files + the optimiser's state
dict in ``trainer_state.pt``; DDP and single-process runs) and a sharded one (FSDP2 runs: every
process writes its shard of model and optimiser states with ``torch.distributed.checkpoint`` under
``shards/``, loadable at any process count (an offloaded :class:`LeanAdamW` writes its host masters and
states, :meth:`LeanAdamW.sharded_state_dict`); ``trainer_state.pt`` holds the rest). A sharded
``stage1`` or ``final`` also holds the full ``save_pretrained`` files, so that ``from_pretrained``
reads it (the reference model, ``lens_fast.eval --checkpoint``)."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from lens_fast.model import LensModel, build_lens
from lens_fast.training.distributed import World
from lens_fast.training.optim import LeanAdamW

STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"
VERSION = 1
COMPATIBLE_KEYS_IGNORED = ("output_dir", "resume", "progress", "log_every", "checkpoint_every", "keep_checkpoints", "device",
                           "max_bad_steps", "threads", "dist_timeout_minutes", "micro_batch", "kv_cache", "val_size",
                           "val_batch_size")
"""Config keys that may change between a run and its resumption (they change where, how or how much is
logged and validated, not what is trained); so may every ``plan_*`` key (``--plan`` only)."""
PERIODIC_PREFIX = "step_"


def periodic_name(step: int) -> str:
    """The name of the periodic checkpoint written after ``step`` steps."""
    return f"{PERIODIC_PREFIX}{step:08d}"


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, name: str, model: LensModel, trainer_state: dict, keep: int = 0) -> Path:
    """Write ``root/name`` atomically (a crash leaves the previous checkpoint intact), point ``root/latest``
    at it and keep the last ``keep`` periodic checkpoints (0: all). ``trainer_state``: picklable
    (optimiser/scheduler state dicts, step...)."""
    staging = _staging(root, name)
    model.save_pretrained(staging)
    torch.save({"version": VERSION, **trainer_state, "rng": rng_state()}, staging / STATE_FILE)
    return _publish(staging, root, name, keep)


def save_sharded_checkpoint(root: Path, name: str, model: LensModel, optimizer: torch.optim.Optimizer,
                            trainer_state: dict, world: World, *, full_model: bool = False, keep: int = 0) -> None:
    """Collective (every process calls it): write ``root/name`` with each process's shard of the
    FSDP2-sharded ``model``'s and ``optimizer``'s states (``torch.distributed.checkpoint``), process 0's
    ``trainer_state`` (picklable, without the optimiser) and RNG states, and with ``full_model`` also
    the full ``save_pretrained`` files (gathered on process 0's CPU). Atomic as
    :func:`save_checkpoint`: ``latest`` moves once every shard is written."""
    staging = _staging_path(root, name)
    if world.is_main:
        _staging(root, name)
    world.barrier()
    model_state, optimizer_state = _sharded_states(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=staging / SHARDS_DIR)
    if full_model:
        copy = unsharded_copy(model, main_only=True)
        if copy is not None:
            copy.save_pretrained(staging)
    if world.is_main:
        torch.save({"version": VERSION, **trainer_state, "rng": rng_state()}, staging / STATE_FILE)
        _publish(staging, root, name, keep)
    world.barrier()


def load_sharded_checkpoint(path: Path, model: LensModel, optimizer: torch.optim.Optimizer) -> None:
    """Collective: load the model and optimiser shards of sharded checkpoint ``path`` into the
    FSDP2-sharded ``model`` and its ``optimizer`` (written at any process count). Every model
    tensor must be in the checkpoint; AdamW states only for the parameters that had a gradient
    before it was written (the others, e.g. SAM's unused point embeddings, have none: their fresh
    zero states are never used, AdamW skips a parameter without a gradient). An offloaded
    :class:`LeanAdamW` gets its host masters (then copied into the parameters) and states back."""
    model_state, optimizer_state = _sharded_states(model, optimizer)
    shards = path / SHARDS_DIR
    dcp.load({"model": model_state}, checkpoint_id=shards)
    set_model_state_dict(model, model_state)
    dcp.load({"optimizer": optimizer_state}, checkpoint_id=shards, planner=DefaultLoadPlanner(allow_partial_load=True))
    if isinstance(optimizer, LeanAdamW):  # its masters (loaded in place) go into the parameters after the weights
        optimizer.load_sharded_state_dict(optimizer_state, _parameter_names(model, optimizer))
    else:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(strict=False))


def _sharded_states(model: LensModel, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimiser) state dicts of an FSDP2-sharded ``model`` for ``torch.distributed.checkpoint``: torch's
    (``get_state_dict``), or a :class:`LeanAdamW`'s own (its host masters and states by parameter name)."""
    if isinstance(optimizer, LeanAdamW):
        return get_model_state_dict(model), optimizer.sharded_state_dict(_parameter_names(model, optimizer))
    return get_state_dict(model, optimizer)


def _parameter_names(model: LensModel, optimizer: LeanAdamW) -> list[str]:
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for p in optimizer.params]


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` holds model and optimiser shards (else: full files)."""
    return (path / SHARDS_DIR).is_dir()


def unsharded_copy(model: LensModel, *, main_only: bool = False) -> Optional[LensModel]:
    """A plain (unsharded) LensModel with the weights of FSDP2-sharded ``model`` (collective): on every
    process on the model's device, or with ``main_only`` on process 0's CPU only (None elsewhere)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=main_only))
    if not state:
        return None
    device = "cpu" if main_only else model.device
    # built in the weights' dtype (a bf16 model's fp32 prompt encoder stays fp32: no round trip through bf16)
    copy = build_lens(model.config, model.tokenizer, device=device, dtype=model.policy.lm_head.weight.dtype)
    copy.load_state_dict(state)
    return copy


def _staging_path(root: Path, name: str) -> Path:
    return root / f".{name}.tmp"


def _staging(root: Path, name: str) -> Path:
    """A fresh, empty staging directory for checkpoint ``name``."""
    root.mkdir(parents=True, exist_ok=True)
    staging = _staging_path(root, name)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def _publish(staging: Path, root: Path, name: str, keep: int) -> Path:
    """Rename the complete ``staging`` directory to ``root/name``, then atomically replace the pointer
    ``root/latest`` with its name; then drop all but the last ``keep`` periodic checkpoints (0: none
    dropped; never the one ``latest`` names). A ``root/name`` already there is one no pointer names (a
    run resumed from an earlier checkpoint writes it again): it is replaced first."""
    final = root / name
    if final.exists():
        if latest_checkpoint(root) == final:
            raise ValueError(f"checkpoint {final} is the latest one; it is not overwritten")
        shutil.rmtree(final)
    staging.rename(final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    if keep > 0:
        periodic = sorted(p for p in root.glob(f"{PERIODIC_PREFIX}*") if p.is_dir())
        for old in periodic[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``root/latest`` names (None: no complete checkpoint yet)."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def load_trainer_state(path: Path, config: dict) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``; ValueError naming what differs when it was written by
    another config (apart from :data:`COMPATIBLE_KEYS_IGNORED`) or another checkpoint version."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state.get("version") != VERSION:
        raise ValueError(f"{path} is checkpoint version {state.get('version')!r}; this lens_fast reads version {VERSION}")
    saved = state.get("config", {})
    differences = [
        f"{key}: checkpoint {saved.get(key)!r}, now {config.get(key)!r}"
        for key in sorted(set(saved) | set(config))
        if key not in COMPATIBLE_KEYS_IGNORED and not key.startswith("plan_") and json.dumps(saved.get(key), default=str) != json.dumps(config.get(key), default=str)
    ]
    if differences:
        raise ValueError(f"{path} was written by a different config: " + "; ".join(differences))
    return state
