"""Data parallelism: torchrun with 2 gloo processes matches one process with the same global batch
(DDP, FSDP2 with sharded checkpoints, and FSDP2 with bf16 weights and the offloaded AdamW), and checkpoints
resume at another process count."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lens_fast.model import from_pretrained
from lens_fast.training import grpo
from lens_fast.training.distributed import World, close_world, init_world
from test_train import FAST, _wait_for_checkpoint, records

ARGS = [*FAST, "--stage1-steps", "8", "--stage2-steps", "4", "--checkpoint-every", "4", "--beta", "0.04",
        "--stage1-batch-size", "4", "--batch-size", "2", "--loss-type", "dapo"]  # dapo: token mean over every process
KEYS = ("loss", "bce", "dice", "answer_nll", "policy_loss", "reward/total/mean", "kl", "grad_norm", "val/mask_iou",
        "val/box_iou")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(output, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "lens_fast.train", *ARGS, "--output-dir", str(output), *extra]


def _one(output, *extra):
    return [sys.executable, "-m", "lens_fast.train", *ARGS, "--output-dir", str(output), *extra]


def _kill_after_checkpoint(command, output, step):
    """Start ``command``, SIGKILL its process group once a checkpoint of ``step`` or later exists."""
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_checkpoint(output, step, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _resume(command):
    resumed = subprocess.run([*command, "--resume", "true"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stdout


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The metrics of an uninterrupted one-process (DDP path) run of ARGS, and its directory."""
    output = tmp_path_factory.mktemp("single")
    subprocess.run(_one(output), check=True, env=_env(), capture_output=True)
    return output


def _compare(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=2e-3, abs=2e-4), (ra["step"], key)


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_resume_in_one(tmp_path, single):
    double, switched = tmp_path / "double", tmp_path / "switched"
    one = [sys.executable, "-m", "lens_fast.train", *ARGS]
    run = subprocess.run(_torchrun(double, "--micro-batch", "2"), env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((double / "summary.json").read_text())["processes"] == 2
    _compare(records(single), records(double))

    process = subprocess.Popen(_torchrun(switched, "--checkpoint-every", "2"), env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_checkpoint(switched, 10, process)  # in stage 2: its optimizer, schedule and KL reference come back
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*one, "--output-dir", str(switched), "--resume", "true"], env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(1 process(es))" in resumed.stdout
    _compare(records(single), records(switched))


@pytest.mark.slow
def test_fsdp_matches_one_process_and_its_sharded_checkpoints_resume_at_another_process_count(tmp_path, single):
    """FSDP2 over 2 gloo processes (micro-batches of 2 rows), killed after a checkpoint in stage 2 and resumed in 1
    process; and a 1-process FSDP2 run killed in stage 1 and resumed over 2: both give the uninterrupted 1-process (DDP path) run's losses,
    gradient norms and validation; the final checkpoint is a full save_pretrained directory."""
    two_then_one, one_then_two = tmp_path / "two_then_one", tmp_path / "one_then_two"
    fsdp = ("--sharding", "fsdp")
    _kill_after_checkpoint(_torchrun(two_then_one, *fsdp, "--micro-batch", "2", "--checkpoint-every", "1"), two_then_one, 9)
    assert "(1 process(es))" in _resume(_one(two_then_one, *fsdp))
    _compare(records(single), records(two_then_one))

    _kill_after_checkpoint(_one(one_then_two, *fsdp), one_then_two, 4)
    _resume(_torchrun(one_then_two, *fsdp))
    assert json.loads((one_then_two / "summary.json").read_text())["processes"] == 2
    _compare(records(single), records(one_then_two))

    for name in ("stage1", "final"):
        sharded = from_pretrained(one_then_two / "checkpoints" / name).state_dict()
        plain = from_pretrained(single / "checkpoints" / name).state_dict()
        assert sharded.keys() == plain.keys()
        for key, value in plain.items():
            torch.testing.assert_close(sharded[key], value, rtol=1e-3, atol=1e-4, msg=f"{name}: {key}")


LEAN_FSDP = ("--sharding", "fsdp", "--precision", "bf16", "--optimizer-offload", "true", "--stage1-steps", "3",
             "--stage2-steps", "2", "--checkpoint-every", "2", "--val-size", "4", "--val-batch-size", "4")


@pytest.mark.slow
def test_fsdp_with_bf16_weights_and_offloaded_adamw_matches_one_process_and_resumes_in_one(tmp_path):
    """bf16 weights sharded over 2 gloo processes (the fp32 prompt encoder whole on each), AdamW's fp32 masters and
    states offloaded per shard: killed after a checkpoint and resumed in 1 process, it gives an uninterrupted
    1-process run's stage-1 losses and gradient norms (bf16 weights: within bf16's rounding) and the same steps."""
    one, two_then_one = tmp_path / "one", tmp_path / "two_then_one"
    run = subprocess.run(_one(one, *LEAN_FSDP), env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    _kill_after_checkpoint(_torchrun(two_then_one, *LEAN_FSDP, "--micro-batch", "2"), two_then_one, 2)
    assert "(1 process(es))" in _resume(_one(two_then_one, *LEAN_FSDP))
    plain, resumed = records(one), records(two_then_one)
    assert [r["step"] for r in plain] == [r["step"] for r in resumed]
    for a, b in zip(plain, resumed):
        if a["stage"] == "align":
            for key in ("loss", "bce", "dice", "answer_nll"):
                assert b[key] == pytest.approx(a[key], rel=1e-2), (a["step"], key)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2), a["step"]
        elif a["stage"] == "grpo":
            assert math.isfinite(b["loss"]) and math.isfinite(b["grad_norm"]) and b["grad_norm"] > 0, a["step"]
    final = from_pretrained(two_then_one / "checkpoints" / "final")
    assert final.segmenter.prompt_encoder.no_mask_embed.weight.dtype == torch.float32


def _dapo_inputs(layer: torch.nn.Module):
    """Log-probs [4, 5] that depend on ``layer``, advantages [4], a mask with 3 + 5 + 4 + 4 tokens."""
    x = torch.linspace(-1, 1, 12).view(4, 1, 3).expand(4, 5, 3) * torch.arange(1, 6).view(1, 5, 1)
    logp = -torch.nn.functional.softplus(layer(x).sum(-1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return logp, torch.tensor([1.0, -0.5, 2.0, -1.5]), mask


def _dapo_rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    layer = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 5))
    logp, adv, mask = _dapo_inputs(layer)
    rows = slice(0, 1) if rank == 0 else slice(1, 4)  # 3 tokens here, 13 there: per-process means would differ
    tokens = World(rank, 2, torch.device("cpu")).mean({"tokens": float(mask[rows].sum())})["tokens"]
    loss, _ = grpo.policy_loss(logp[rows], logp[rows].detach(), adv[rows], mask[rows], loss_type="dapo", total_tokens=tokens)
    loss.backward()
    torch.save(layer.module.weight.grad, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_dapo_token_mean_spans_every_process(tmp_path):
    """dapo divides by the tokens of every process, so two processes' averaged gradients equal one's."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 5)
    logp, adv, mask = _dapo_inputs(layer)
    loss, _ = grpo.policy_loss(logp, logp.detach(), adv, mask, loss_type="dapo")
    loss.backward()
    mp.start_processes(_dapo_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"{rank}.pt"), layer.weight.grad)


def _timeout_rank(rank: int, port: int, out: str) -> None:
    """Rank 0 waits in an all-reduce that rank 1 never joins (it leaves after 4 s); the timeout is 0.01 minutes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = init_world("cpu", timeout_minutes=0.01)
    if rank == 0:
        started = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1))
            outcome = "completed"
        except RuntimeError as error:
            outcome = f"failed: {error}"
        with open(f"{out}/rank0.txt", "w") as file:
            file.write(f"{time.monotonic() - started:.2f} {outcome}")
    else:
        time.sleep(4)
    close_world(world)


def test_process_group_timeout_comes_from_init_world(tmp_path):
    """The collective gives up after the configured 0.6 s, not when rank 1 leaves (torch's gloo default: 30 minutes)."""
    mp.start_processes(_timeout_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    elapsed, outcome = (tmp_path / "rank0.txt").read_text().split(" ", 1)
    assert outcome.startswith("failed") and float(elapsed) < 3, outcome


def test_init_world_checks_its_timeout():
    with pytest.raises(ValueError, match="timeout_minutes"):
        init_world("cpu", timeout_minutes=0)
