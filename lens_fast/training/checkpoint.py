"""Training checkpoints: model, optimiser, scheduler, RNG states, step and data position, written
atomically (temporary directory + rename) under ``<output_dir>/checkpoints/``; ``latest`` points at
the newest complete one."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from lens_fast.model import LensModel

STATE_FILE = "trainer_state.pt"
VERSION = 1
COMPATIBLE_KEYS_IGNORED = ("output_dir", "resume", "progress", "log_every", "checkpoint_every", "device", "max_bad_steps",
                           "threads", "micro_batch", "kv_cache")
"""Config keys that may change between a run and its resumption (they change where and how, not what, is computed)."""


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


def save_checkpoint(root: Path, name: str, model: LensModel, trainer_state: dict) -> Path:
    """Write ``root/name`` atomically (a crash leaves the previous checkpoint intact) and point
    ``root/latest`` at it. ``trainer_state``: picklable (optimiser/scheduler state dicts, step...)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    torch.save({"version": VERSION, **trainer_state, "rng": rng_state()}, staging / STATE_FILE)
    final = root / name
    old = root / f".{name}.old"
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    return final


def latest_checkpoint(root: Path) -> Optional[Path]:
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
        if key not in COMPATIBLE_KEYS_IGNORED and json.dumps(saved.get(key), default=str) != json.dumps(config.get(key), default=str)
    ]
    if differences:
        raise ValueError(f"{path} was written by a different config: " + "; ".join(differences))
    return state
