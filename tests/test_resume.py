"""A run stopped after any step, of either stage, resumes to exactly the uninterrupted run; checkpoints are
published atomically and pruned; the KL reference is the same model whether or not the run was resumed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lens_fast import train
from lens_fast.model import build_tiny_lens
from lens_fast.training import checkpoint as ckpt
from test_train import FAST, records

# Stage 1 trains two parts, stage 2 five (as LENS's recipe): their optimizers' parameter groups differ.
STAGES = ["--stage1-steps", "3", "--stage2-steps", "3", "--warmup-steps", "1", "--beta", "0.04",
          "--stage1-train", "queries,connector", "--stage2-train", "vision,llm,queries,connector,sam_decoder"]
KEYS = ("loss", "bce", "dice", "answer_nll", "policy_loss", "lr", "grad_norm", "reward/total/mean", "reward/box/mean",
        "kl", "val/mask_iou", "val/box_iou")


def _same(whole: list[dict], resumed: list[dict]) -> None:
    assert [(r["step"], r["stage"]) for r in resumed] == [(r["step"], r["stage"]) for r in whole]
    for a, b in zip(whole, resumed):
        for key in KEYS:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], a["stage"], key)


def _resume_from(whole: Path, name: str, output: Path, *options: str) -> None:
    """Leave ``output`` as a run killed right after checkpoint ``name`` of ``whole`` was published (with
    ``stage1`` beside it when it existed by then), then resume it."""
    source = whole / "checkpoints" / name
    step = torch.load(source / ckpt.STATE_FILE, weights_only=False)["step"]
    (output / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, output / "checkpoints" / name)
    stage1 = whole / "checkpoints" / "stage1"
    if name != "stage1" and stage1.is_dir() and torch.load(stage1 / ckpt.STATE_FILE, weights_only=False)["step"] <= step:
        shutil.copytree(stage1, output / "checkpoints" / "stage1")
    (output / "checkpoints" / "latest").write_text(name + "\n")
    shutil.copy(whole / "metrics.jsonl", output / "metrics.jsonl")  # (lines from the checkpoint's step on are dropped)
    assert train.main(["--output-dir", str(output), *FAST, *options, "--resume", "true"]) == 0


@pytest.mark.slow
def test_resume_after_any_step_of_either_stage_matches_the_uninterrupted_run(tmp_path):
    """Kill points: the first and last step of stage 1, the boundary (the stage1 checkpoint: stage 2's
    fresh optimizer and schedule), the first and last step of stage 2."""
    whole = tmp_path / "whole"
    options = [*STAGES, "--checkpoint-every", "1", "--keep-checkpoints", "0"]
    assert train.main(["--output-dir", str(whole), *FAST, *options]) == 0
    state = torch.load(whole / "checkpoints" / "stage1" / ckpt.STATE_FILE, weights_only=False)
    assert state["stage"] == "grpo" and state["step"] == 3 and state["optimizer"]["state"] == {}
    for name in ("step_00000001", "step_00000003", "stage1", "step_00000004", "step_00000006"):
        _resume_from(whole, name, tmp_path / name, *STAGES)
        _same(records(whole), records(tmp_path / name))
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert [v["after"] for v in summary["val"]] == ["start", "stage1", "stage2"]


@pytest.mark.slow
def test_without_stage1_the_reference_is_the_starting_model_after_a_resume(tmp_path):
    """--stage1-steps 0 and beta > 0: a run resumed in stage 2 computes its KL against the starting model,
    not against a copy of the partly trained policy it resumed."""
    whole = tmp_path / "whole"
    options = ["--stage1-steps", "0", "--stage2-steps", "3", "--beta", "0.5", "--lr", "3e-3", "--warmup-steps", "0",
               "--mask-truncated-completions", "false",
               "--checkpoint-every", "1", "--keep-checkpoints", "0"]
    assert train.main(["--output-dir", str(whole), *FAST, *options]) == 0
    _resume_from(whole, "step_00000002", tmp_path / "resumed", *options)
    kl = [r["kl"] for r in records(whole) if "kl" in r]
    assert kl[-1] > 1e-4  # the policy has moved away from its start, so a wrong reference shows
    _same(records(whole), records(tmp_path / "resumed"))


def _wait_for_stage2_step(output: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = output / "metrics.jsonl"
        if log.is_file() and any(r["stage"] == "grpo" and r["step"] >= step for r in records(output)):
            return
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"stage 2 did not reach step {step} in time")


@pytest.mark.slow
def test_sigkill_in_stage2_without_a_periodic_checkpoint_resumes_from_the_boundary(tmp_path):
    """The issue's reproduction: no periodic checkpoint in stage 2, SIGKILL after stage-2 step 2, resume: the
    stage1 checkpoint carries stage 2's optimizer and LR schedule, so lr and every loss match."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    options = [*FAST, *STAGES[:2], "--stage2-steps", "5", *STAGES[4:], "--checkpoint-every", "1000", "--threads", "1"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train.main(["--output-dir", str(whole), *options]) == 0
    command = [sys.executable, "-m", "lens_fast.train", *options, "--output-dir", str(broken)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_stage2_step(broken, 4, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ckpt.latest_checkpoint(broken / "checkpoints") == broken / "checkpoints" / "stage1"
    resumed = subprocess.run([*command, "--resume", "true"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "at step 3" in resumed.stdout
    _same(records(whole), records(broken))


def test_resume_accepts_options_that_cannot_change_training(tmp_path):
    """--plan-* options, the validation size and the checkpoint cadence may change on resume; lr may not."""
    base = train.main(["--output-dir", str(tmp_path), *FAST, "--stage1-steps", "2", "--stage2-steps", "0", "--val-size", "2"])
    assert base == 0
    state = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    config = json.loads((tmp_path / "config.json").read_text())
    changed = {**config, "plan_gpus": 4, "plan_gpu_memory_gb": 80.0, "val_size": 16, "val_batch_size": 4,
               "keep_checkpoints": 5, "checkpoint_every": 7, "log_every": 3}
    assert ckpt.load_trainer_state(state, changed)["step"] == 2
    with pytest.raises(ValueError, match="lr: checkpoint 0.0003, now 0.5"):
        ckpt.load_trainer_state(state, {**config, "lr": 0.5})


def test_latest_always_names_a_complete_checkpoint_and_old_ones_are_pruned(tmp_path, monkeypatch):
    model = build_tiny_lens(seed=0)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, ckpt.periodic_name(step), model, {"step": step}, keep=2)
    ckpt.save_checkpoint(tmp_path, "stage1", model, {"step": 3}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "stage1", "step_00000002", "step_00000003"]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "stage1"

    real_replace = os.replace

    def crash_on_the_pointer(src, dst):  # the process dies before the pointer moves
        if Path(dst).name == "latest":
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_the_pointer)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, ckpt.periodic_name(4), model, {"step": 4}, keep=2)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "stage1" and (latest / "model.safetensors").is_file()
    monkeypatch.setattr(ckpt.os, "replace", real_replace)

    real_rename = Path.rename

    def crash_on_the_rename(self, target):  # the process dies as the new checkpoint moves in
        if self.name.startswith("."):
            raise OSError("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_the_rename)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, ckpt.periodic_name(5), model, {"step": 5}, keep=2)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "stage1"
    with pytest.raises(ValueError, match="is the latest one"):  # never overwritten in place
        ckpt.save_checkpoint(tmp_path, "stage1", model, {"step": 5}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "stage1"
    assert torch.load(tmp_path / "stage1" / ckpt.STATE_FILE, weights_only=False)["step"] == 3

    ckpt.save_checkpoint(tmp_path, ckpt.periodic_name(4), model, {"step": 4}, keep=2)  # (a stale step_4 is replaced)
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.periodic_name(4)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
