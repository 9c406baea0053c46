"""Data parallelism: torchrun with 2 gloo processes matches one process with the same global batch,
and its checkpoint resumes in one process."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lens_fast.training import grpo
from lens_fast.training.distributed import World
from test_train import FAST, _wait_for_checkpoint, records

ARGS = [*FAST, "--stage1-steps", "8", "--stage2-steps", "4", "--checkpoint-every", "4", "--beta", "0.04",
        "--stage1-batch-size", "4", "--batch-size", "2", "--loss-type", "dapo"]  # dapo: token mean over every process
KEYS = ("loss", "bce", "dice", "answer_nll", "policy_loss", "reward/total/mean", "kl", "val/mask_iou", "val/box_iou")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(output, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            "-m", "lens_fast.train", *ARGS, "--output-dir", str(output), *extra]


def _compare(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in KEYS:
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=2e-3, abs=2e-4), (ra["step"], key)


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_resume_in_one(tmp_path):
    single, double, switched = tmp_path / "single", tmp_path / "double", tmp_path / "switched"
    one = [sys.executable, "-m", "lens_fast.train", *ARGS]
    subprocess.run([*one, "--output-dir", str(single)], check=True, env=_env(), capture_output=True)
    run = subprocess.run(_torchrun(double, "--micro-batch", "2"), env=_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((double / "summary.json").read_text())["processes"] == 2
    _compare(records(single), records(double))

    process = subprocess.Popen(_torchrun(switched), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    _wait_for_checkpoint(switched, 4, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([*one, "--output-dir", str(switched), "--resume", "true"], env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "(1 process(es))" in resumed.stdout
    _compare(records(single), records(switched))



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
