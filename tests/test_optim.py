"""The trainer's AdamW memory options (lens_fast.training.optim) against plain torch AdamW: offload and step in
backward exact in fp32, bf16 device weights with fp32 masters, 8-bit states tracking fp32 ones, micro-batches,
checkpoints that resume exactly, the config's refusals, and short trainer runs."""
import io
import json
import os
import signal

import pytest
import torch
from torch import nn

from lens_fast import train
from lens_fast.training.config import TrainConfig
from lens_fast.training.optim import LeanAdamW, build_adamw, clip_grad_norm, state_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LR, WD = 1e-2, 0.1
LEAN = [dict(offload=True), dict(step_in_backward=True), dict(offload=True, step_in_backward=True)]
LEAN_IDS = ["offload", "step_in_backward", "offload+step_in_backward"]


def small_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """~13 k parameters: two weights of >= 4096 values (8-bit states), small ones (fp32 states in bnb)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 4)).to(dtype)


TEACHER = torch.randn(32, 4, generator=torch.Generator().manual_seed(7))


def batch(step: int, dtype=torch.float32) -> tuple:
    """16 random inputs of step ``step`` and a learnable target (a fixed linear teacher + noise)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 32, generator=g)
    return x.to(dtype), (x @ TEACHER + 0.1 * torch.randn(16, 4, generator=g)).to(dtype)


def schedule(optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def train_steps(model, optimizer, scheduler, steps, *, first=0, max_norm=float("inf"), passes=1) -> list:
    """``steps`` optimizer steps of an MSE regression, each over ``passes`` backward passes; the losses."""
    losses = []
    for step in range(first, first + steps):
        x, y = batch(step, next(model.parameters()).dtype)
        optimizer.zero_grad(set_to_none=True)
        for part in range(passes):
            rows = slice(part * len(x) // passes, (part + 1) * len(x) // passes)
            loss = nn.functional.mse_loss(model(x[rows]).float(), y[rows].float()) / passes
            loss.backward()
            losses.append(loss.item())
        clip_grad_norm(optimizer, max_norm)
        optimizer.step()
        scheduler.step()
    return losses


def reference(model, *, fused=False, states="fp32"):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=fused) if states == "fp32" \
        else build_adamw(model.parameters(), LR, WD, states=states)
    return opt, schedule(opt)


def params(model) -> list:
    return [p.detach().clone() for p in model.parameters()]


def test_default_is_torch_adamw_and_8bit_is_bitsandbytes():
    model = small_model()
    plain = build_adamw(model.parameters(), LR, WD)
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"] is False  # CPU: as the trainer had it
    assert plain.defaults["betas"] == (0.9, 0.999) and plain.defaults["eps"] == 1e-8
    bnb = pytest.importorskip("bitsandbytes")
    assert isinstance(build_adamw(model.parameters(), LR, WD, states="8bit"), bnb.optim.AdamW8bit)
    assert isinstance(build_adamw(model.parameters(), LR, WD, offload=True), LeanAdamW)


@pytest.mark.parametrize("options", LEAN, ids=LEAN_IDS)
def test_lean_paths_equal_plain_adamw_in_fp32(options):
    """Same values, bit for bit, as torch AdamW (the fused CPU kernel for the host step) with the LR schedule;
    clipping where the option allows it."""
    lean_model, ref_model = small_model(), small_model()
    lean = build_adamw(lean_model.parameters(), LR, WD, **options)
    ref, ref_schedule = reference(ref_model, fused=options.get("offload", False))
    clip = 0.5 if options.get("offload") else float("inf")
    lean_losses = train_steps(lean_model, lean, schedule(lean), 6, max_norm=clip)
    ref_losses = train_steps(ref_model, ref, ref_schedule, 6, max_norm=clip)
    assert lean_losses == ref_losses
    for a, b in zip(params(lean_model), params(ref_model)):
        assert torch.equal(a, b)
    assert lean.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == LR / 7  # LambdaLR after 6 steps
    # and the fused host step against torch's default CPU AdamW: the same maths to rounding
    plain_model = small_model()
    plain, plain_schedule = reference(plain_model)
    train_steps(plain_model, plain, plain_schedule, 6, max_norm=clip)
    for a, b in zip(params(lean_model), params(plain_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_step_in_backward_leaves_no_gradient_and_reports_the_norm():
    model, ref_model = small_model(), small_model()
    lean = build_adamw(model.parameters(), LR, WD, step_in_backward=True)
    x, y = batch(0)
    before = params(model)
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters())  # stepped and freed in backward
    assert all(not torch.equal(a, b) for a, b in zip(before, params(model)))
    nn.functional.mse_loss(ref_model(x), y).backward()
    expected = nn.utils.clip_grad_norm_(ref_model.parameters(), float("inf"))
    torch.testing.assert_close(clip_grad_norm(lean, float("inf")), expected, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="cannot clip by the global gradient norm.*max_norm 1.0"):
        clip_grad_norm(lean, 1.0)
    lean.close()  # the hooks leave the parameters: backward now only accumulates
    stepped = params(model)
    nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(stepped, params(model)))


def test_offload_streams_micro_batches_into_the_host_buffer():
    """Two backward passes per step: no device gradient survives a pass; the host buffer sums them as the
    device buffer would (exactly), then clips."""
    lean_model = small_model()
    lean = build_adamw(lean_model.parameters(), LR, WD, offload=True, step_in_backward=True)
    x, y = batch(0)
    for half in (slice(0, 8), slice(8, 16)):
        nn.functional.mse_loss(lean_model(x[half]), y[half]).backward()
        assert all(p.grad is None for p in lean_model.parameters())
        assert all(m.grad is not None for m in lean.masters)
    lean.zero_grad()
    assert all(m.grad is None for m in lean.masters)

    ref_model = small_model()
    ref, ref_schedule = reference(ref_model, fused=True)
    assert train_steps(lean_model, lean, schedule(lean), 4, max_norm=0.3, passes=2) == \
        train_steps(ref_model, ref, ref_schedule, 4, max_norm=0.3, passes=2)
    for a, b in zip(params(lean_model), params(ref_model)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("step_in_backward", [False, True], ids=["offload", "offload+step_in_backward"])
def test_bf16_device_weights_keep_fp32_masters(step_in_backward):
    """bf16 parameters: the host masters follow fp32 AdamW fed the same (bf16) gradients, exactly; the device
    weights are the masters rounded to bf16; the masters move where bf16 weights alone could not."""
    model = small_model(dtype=torch.bfloat16)
    masters = [nn.Parameter(p.detach().float()) for p in model.parameters()]
    lean = build_adamw(model.parameters(), 1e-4, WD, offload=True, step_in_backward=step_in_backward)
    ref = torch.optim.AdamW(masters, lr=1e-4, weight_decay=WD, fused=True)
    start = params(model)
    for step in range(4):
        x, y = batch(step, torch.bfloat16)
        lean.zero_grad()
        nn.functional.mse_loss(model(x).float(), y.float()).backward()
        if step_in_backward:
            grads = [m.grad.clone() for m in lean.masters]
        else:
            grads = [p.grad.float() for p in model.parameters()]
        for m, g in zip(masters, grads):
            m.grad = g
        lean.step()
        ref.step()
    for p, master, expected in zip(model.parameters(), lean.masters, masters):
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(master, expected.detach())
        assert torch.equal(p.detach(), master.to(torch.bfloat16))
    moved = sum(int((m != s.float()).sum()) for m, s in zip(lean.masters, start))
    moved_bf16 = sum(int((p.detach() != s).sum()) for p, s in zip(model.parameters(), start))
    assert moved > moved_bf16  # lr 1e-4: many updates are below half a bf16 ulp, kept by the masters only


@pytest.mark.parametrize("options", [{}, dict(offload=True), dict(step_in_backward=True)], ids=["plain", "offload", "step_in_backward"])
def test_8bit_states_track_fp32_adamw(options):
    """30 steps at a constant lr: every tensor's update within 10% of fp32 AdamW's (direction and size), and
    the held-out loss falls as fp32's does (in the 8-bit path: weights of >= 4096 values have 8-bit states)."""
    pytest.importorskip("bitsandbytes")
    start = params(small_model())
    q_model, f_model = small_model(), small_model()
    q = build_adamw(q_model.parameters(), LR, 0.0, states="8bit", **options)
    f = torch.optim.AdamW(f_model.parameters(), lr=LR, weight_decay=0.0)
    constant = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # noqa: E731
    train_steps(q_model, q, constant(q), 30)
    train_steps(f_model, f, constant(f), 30)
    assert any(s["state1"].dtype == torch.uint8 for inner in getattr(q, "inner", [q]) for s in inner.state.values())
    for s, a, b in zip(start, params(q_model), params(f_model)):
        dq, df = (a - s).flatten(), (b - s).flatten()
        assert torch.cosine_similarity(dq, df, dim=0) > 0.99
        assert (dq - df).norm() < 0.1 * df.norm()
    x, y = batch(999)
    with torch.no_grad():
        first = nn.functional.mse_loss(small_model()(x), y).item()
        q_loss, f_loss = (nn.functional.mse_loss(m(x), y).item() for m in (q_model, f_model))
    assert q_loss < first / 5 and abs(q_loss - f_loss) < 0.05 * f_loss


def test_8bit_offload_equals_8bit_on_the_device_here():
    """On a CPU 'device' the host step is the same bitsandbytes kernel: the same values."""
    pytest.importorskip("bitsandbytes")
    a_model, b_model = small_model(), small_model()
    a = build_adamw(a_model.parameters(), LR, WD, states="8bit", offload=True)
    b = build_adamw(b_model.parameters(), LR, WD, states="8bit")
    assert train_steps(a_model, a, schedule(a), 5) == train_steps(b_model, b, schedule(b), 5)
    for x, y in zip(params(a_model), params(b_model)):
        assert torch.equal(x, y)


def test_state_bytes_per_parameter():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    big = nn.Linear(1024, 1024, bias=False)
    for states, low, high in (("fp32", 8.0, 8.01), ("8bit", 2.0, 2.05)):
        opt = build_adamw(big.parameters(), LR, 0.0, states=states)
        big.weight.grad = torch.randn_like(big.weight)
        opt.step()
        assert low <= state_bytes(opt) / big.weight.numel() <= high, states
    lean = build_adamw(big.parameters(), LR, 0.0, offload=True)
    big.weight.grad = torch.randn_like(big.weight)
    lean.step()
    assert 8.0 <= state_bytes(lean) / big.weight.numel() <= 8.01  # the masters (4 B/param) are not states


@pytest.mark.cuda
@pytest.mark.parametrize("options", LEAN, ids=LEAN_IDS)
def test_cuda_parameters_match_adamw_on_the_gpu(options):
    """CUDA parameters: pinned host masters, non_blocking copies both ways, two backward passes per step; the
    weights follow torch's fused CUDA AdamW (fp32) to rounding, and bf16 weights are exactly the rounded masters."""
    device = torch.device("cuda")
    lean_model, ref_model = small_model().to(device), small_model().to(device)
    lean = build_adamw(lean_model.parameters(), LR, WD, **options)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=LR, weight_decay=WD, fused=True)
    assert all(m.is_pinned() for m in lean.masters)
    clip = 0.5 if options.get("offload") else float("inf")
    passes = 2 if options.get("offload") else 1
    for model, opt in ((lean_model, lean), (ref_model, ref)):
        sched = schedule(opt)
        for step in range(5):
            x, y = (t.to(device) for t in batch(step))
            opt.zero_grad(set_to_none=True)
            for half in range(passes):
                rows = slice(half * 16 // passes, (half + 1) * 16 // passes)
                (nn.functional.mse_loss(model(x[rows]), y[rows]) / passes).backward()
            clip_grad_norm(opt, clip)
            opt.step()
            sched.step()
    for a, b in zip(params(lean_model), params(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if options.get("offload"):
        model = small_model(dtype=torch.bfloat16).to(device)
        lean = build_adamw(model.parameters(), 1e-4, WD, **options)
        for step in range(3):
            x, y = (t.to(device) for t in batch(step, torch.bfloat16))
            lean.zero_grad()
            nn.functional.mse_loss(model(x).float(), y.float()).backward()
            clip_grad_norm(lean, 1.0)
            lean.step()
        for p, master in zip(model.parameters(), lean.masters):
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach().cpu(), master.to(torch.bfloat16))


OPTIONS = [({}, "fp32"), (dict(offload=True), "fp32"), (dict(step_in_backward=True), "fp32"),
           (dict(offload=True, step_in_backward=True), "fp32"), ({}, "8bit"), (dict(offload=True), "8bit"),
           (dict(offload=True, step_in_backward=True), "8bit")]


@pytest.mark.parametrize("options, states", OPTIONS, ids=[f"{s}-{'+'.join(o) or 'plain'}" for o, s in OPTIONS])
def test_state_dict_round_trip_resumes_exactly(options, states):
    if states == "8bit":
        pytest.importorskip("bitsandbytes")
    clip = 1.0 if options.get("offload") or not options.get("step_in_backward") else float("inf")
    whole_model = small_model()
    whole = build_adamw(whole_model.parameters(), LR, WD, states=states, **options)
    whole_losses = train_steps(whole_model, whole, schedule(whole), 6, max_norm=clip)

    model = small_model()
    opt = build_adamw(model.parameters(), LR, WD, states=states, **options)
    sched = schedule(opt)
    losses = train_steps(model, opt, sched, 3, max_norm=clip)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, saved)
    if isinstance(opt, LeanAdamW):
        opt.close()
    del model, opt, sched
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    resumed = small_model(seed=1)  # other weights: everything comes from the checkpoint
    resumed.load_state_dict(state["model"])
    opt = build_adamw(resumed.parameters(), LR, WD, states=states, **options)
    sched = schedule(opt)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    losses += train_steps(resumed, opt, sched, 3, first=3, max_norm=clip)
    assert losses == whole_losses
    for a, b in zip(params(resumed), params(whole_model)):
        assert torch.equal(a, b)


def test_bad_options_are_named(monkeypatch):
    model = small_model()
    with pytest.raises(ValueError, match=r"optimizer_states must be one of \('fp32', '8bit'\), got '4bit'"):
        build_adamw(model.parameters(), LR, WD, states="4bit")
    with pytest.raises(ValueError, match="optimizer_states must be one of.*got '4bit'"):
        LeanAdamW(list(model.parameters()), LR, WD, states="4bit", offload=True)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_adamw([], LR, WD)
    with pytest.raises(ValueError, match=r"must share one device, got \['cpu', 'meta'\]"):
        build_adamw([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))], LR, WD, offload=True)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"optimizer_states='8bit' needs bitsandbytes.*lens_fast\[lean\]"):
        build_adamw(model.parameters(), LR, WD, states="8bit")
    offloaded = build_adamw(model.parameters(), LR, WD, offload=True)
    with pytest.raises(ValueError, match="saved with options"):
        offloaded.load_state_dict(build_adamw(small_model().parameters(), LR, WD, offload=True, step_in_backward=True).state_dict())


def test_config_refuses_what_the_trainer_cannot_do():
    with pytest.raises(ValueError, match="optimizer_states must be one of"):
        TrainConfig(optimizer_states="bf16")
    with pytest.raises(ValueError, match="grad_clip must be 0 with step_in_backward.*got 1.0"):
        TrainConfig(step_in_backward=True)
    with pytest.raises(ValueError, match="micro_batch must be >= 0, got -1"):
        TrainConfig(micro_batch=-1)
    TrainConfig(step_in_backward=True, optimizer_offload=True)  # the host clips
    streamed = TrainConfig(step_in_backward=True, grad_clip=0.0, micro_batch=4)
    with pytest.raises(ValueError, match=r"micro_batch 4 splits the rows of a step \({'stage1': 16, 'stage2': 32}\)"):
        streamed.check_world(1)
    with pytest.raises(ValueError, match="step_in_backward needs one process.*WORLD_SIZE 2"):
        TrainConfig(step_in_backward=True, grad_clip=0.0).check_world(2)
    TrainConfig(step_in_backward=True, optimizer_offload=True, micro_batch=4).check_world(1)
    TrainConfig(step_in_backward=True, grad_clip=0.0, micro_batch=32, stage1_batch_size=32).check_world(1)
    TrainConfig(micro_batch=4).check_world(8)  # nothing to refuse without step_in_backward


def test_trainer_refuses_step_in_backward_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = train.main(["--output-dir", str(tmp_path), "--step-in-backward", "true", "--grad-clip", "0"])
    assert code == 2
    assert "step_in_backward needs one process" in capsys.readouterr().err
    assert not (tmp_path / "config.json").exists()


FAST = ["--val-size", "4", "--val-batch-size", "4", "--log-every", "1", "--progress", "false",
        "--stage1-batch-size", "8", "--batch-size", "2", "--num-generations", "4", "--max-new-tokens", "16"]


def records(path) -> list:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_trainer_learns_with_8bit_states(tmp_path):
    pytest.importorskip("bitsandbytes")
    code = train.main(["--output-dir", str(tmp_path), *FAST, "--stage1-steps", "40", "--stage2-steps", "0",
                       "--stage1-lr", "2e-3", "--optimizer-states", "8bit"])
    assert code == 0
    align = [r for r in records(tmp_path) if r.get("stage") == "align"]
    assert len(align) == 40
    first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (align[:8], align[-8:]))
    assert last < first - 0.2


@pytest.mark.slow
def test_offloaded_step_in_backward_run_resumes_exactly(tmp_path, monkeypatch):
    """Two micro-batches per step streamed into the host buffer: the run logs what plain AdamW's does (to the
    fused host kernel's rounding); stopped by SIGTERM at step 5 (checkpoint: the host masters and states) and
    resumed, it logs the same losses, rewards and gradient norms as the uninterrupted run, across the stage change."""
    common = [*FAST, "--stage1-steps", "6", "--stage2-steps", "3", "--checkpoint-every", "100", "--beta", "0.04",
              "--micro-batch", "4"]
    args = [*common, "--optimizer-offload", "true", "--step-in-backward", "true"]
    plain, whole, broken = tmp_path / "plain", tmp_path / "whole", tmp_path / "broken"
    assert train.main(["--output-dir", str(plain), *common]) == 0
    assert train.main(["--output-dir", str(whole), *args]) == 0
    real_next, calls = train.Batches.next, []

    def next_then_stop(self, size):
        calls.append(size)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self, size)

    monkeypatch.setattr(train.Batches, "next", next_then_stop)
    assert train.main(["--output-dir", str(broken), *args]) == 0
    monkeypatch.setattr(train.Batches, "next", real_next)
    state = torch.load(broken / "checkpoints" / "step_00000005" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 5 and len(state["optimizer"]["masters"]) > 0
    assert train.main(["--output-dir", str(broken), *args, "--resume", "true"]) == 0
    a, b, c = records(whole), records(broken), records(plain)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [r["step"] for r in c]
    for ra, rb, rc in zip(a, b, c):
        for key in ("loss", "grad_norm", "reward/total/mean", "kl", "val/mask_iou"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-7), (ra["step"], key)
                assert rc[key] == pytest.approx(ra[key], rel=1e-3, abs=1e-5), (ra["step"], key)
