"""Data parallelism: torchrun with 2 gloo processes matches one process with the same global batch,
and its checkpoint resumes in one process."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from test_train import FAST, _wait_for_checkpoint, records

ARGS = [*FAST, "--stage1-steps", "8", "--stage2-steps", "4", "--checkpoint-every", "4", "--beta", "0.04",
        "--stage1-batch-size", "4", "--batch-size", "2"]
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
    run = subprocess.run(_torchrun(double), env=_env(), capture_output=True, text=True)
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
