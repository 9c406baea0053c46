"""LeanAdamW's offload on FSDP2-sharded (DTensor) parameters: 2 gloo processes (mp.spawn) step a sharded toy
model (one parameter left whole, as a bf16 model's fp32 ones) as torch's AdamW steps its sharded twin and as one
process steps the plain model on the whole batch (global-norm clipping included), and the sharded checkpoint of
the host masters and states, written by 2 processes, loads into 1 (another process count) with every value;
sharded checkpoints resume."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lens_fast.training import checkpoint as ckpt
from lens_fast.training.distributed import World, average_replicated_gradients
from lens_fast.training.optim import LeanAdamW, _fp32_moments, build_adamw, clip_grad_norm

LR, WD, STEPS, MAX_NORM = 1e-2, 0.1, 4, 0.5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toy(seed: int = 0, hidden: int = 16) -> nn.Module:
    """Linear layers with rows that do not split evenly over 2 processes (5 and 1) and a frozen bias; with
    ``hidden`` >= 683, weights of >= 4096 values (bitsandbytes keeps 8-bit states for those only)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 5), nn.Tanh(), nn.Linear(5, 1))
    model[0].bias.requires_grad_(False)
    return model


def sharded(model: nn.Module, mesh, whole: tuple = ()) -> nn.Module:
    """``model`` sharded by FSDP2 (its middle layer a unit), the parameters ``whole`` left unsharded (as
    ``shard_model`` leaves a bf16 model's fp32 ones)."""
    fully_shard(model[2], mesh=mesh)
    return fully_shard(model, mesh=mesh, ignored_params=set(whole) or None)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def trainable(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def run(model, optimizer, rank: int, size: int, steps: range = range(STEPS)) -> list[float]:
    """``steps`` of an MSE regression on this process's rows of each batch; the clipped global norms."""
    norms = []
    for step in steps:
        x, y = batch(step)
        rows = slice(rank * len(x) // size, (rank + 1) * len(x) // size)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x[rows]), y[rows]).mul(100.0).backward()  # x100: the clipping acts
        average_replicated_gradients(model)  # (the trainer's gradient_sync: the whole parameters' all-reduce)
        norms.append(float(clip_grad_norm(optimizer, MAX_NORM)))
        optimizer.step()
    return norms


def names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _rank(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    whole = toy()
    lean_model, torch_model = sharded(whole, mesh, whole=(whole[4].bias,)), sharded(toy(), mesh)
    lean = build_adamw(trainable(lean_model), LR, WD, offload=True)
    reference = torch.optim.AdamW(trainable(torch_model), lr=LR, weight_decay=WD)
    result = {"lean_norms": run(lean_model, lean, rank, 2), "torch_norms": run(torch_model, reference, rank, 2),
              "local_master_sizes": [m.numel() for m in lean.masters],
              "lean": {n: p.full_tensor() if isinstance(p, DTensor) else p.detach() for n, p in lean_model.named_parameters()},
              "torch": {n: p.full_tensor() for n, p in torch_model.named_parameters()},
              "torch_states": {n: {k: reference.state[p][k].full_tensor() for k in ("exp_avg", "exp_avg_sq")}
                               for n, p in zip(names(torch_model), trainable(torch_model))}}
    dcp.save({"optimizer": lean.sharded_state_dict(names(lean_model))}, checkpoint_id=f"{out}/shards")
    if rank == 0:
        torch.save(result, f"{out}/result.pt")
    dist.destroy_process_group()


def test_offload_on_sharded_parameters_equals_torch_adamw_and_its_checkpoint_loads_in_one_process(tmp_path):
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    result = torch.load(tmp_path / "result.pt")
    assert sum(result["local_master_sizes"]) < sum(p.numel() for p in trainable(toy()))  # rank 0 holds a shard only
    plain = toy()  # one process, the whole batch, torch's clip_grad_norm_ and AdamW
    plain_norms = run(plain, torch.optim.AdamW(trainable(plain), lr=LR, weight_decay=WD), 0, 1)
    assert result["lean_norms"] == pytest.approx(result["torch_norms"], rel=1e-5)
    assert result["lean_norms"] == pytest.approx(plain_norms, rel=1e-5)
    assert min(result["torch_norms"]) > MAX_NORM  # every step was clipped
    start = toy()
    for name, value in result["torch"].items():
        torch.testing.assert_close(result["lean"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(result["lean"][name], plain.get_parameter(name).detach(), rtol=1e-5, atol=1e-6, msg=name)
        if start.get_parameter(name).requires_grad:
            assert not torch.equal(value, start.get_parameter(name)), name  # trained
        else:
            assert torch.equal(value, start.get_parameter(name)), name  # frozen

    # The same checkpoint in a world of one: every master and moment of the 2 processes' shards.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sharded(toy(seed=1), init_device_mesh("cpu", (1,)))
        optimizer = build_adamw(trainable(model), LR, WD, offload=True)
        state = optimizer.sharded_state_dict(names(model))
        dcp.load({"optimizer": state}, checkpoint_id=tmp_path / "shards")
        optimizer.load_sharded_state_dict(state, names(model))
    finally:
        dist.destroy_process_group()
    for name, p, master in zip(names(model), trainable(model), optimizer.masters):
        torch.testing.assert_close(master, result["lean"][name], rtol=0, atol=0, msg=name)
        assert torch.equal(p.to_local(), master), name  # the masters went into the parameters
        assert state[name]["master"].to_local().data_ptr() == master.data_ptr()  # loaded in place, on the host
        moments = optimizer.inner[0].state[master]
        assert float(moments["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[key], result["torch_states"][name][key], rtol=1e-4, atol=1e-9, msg=name)


def test_sharded_parameters_are_refused_where_the_hooks_cannot_see_their_gradients():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = sharded(toy(), init_device_mesh("cpu", (1,)))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        with pytest.raises(ValueError, match="DTensor.*needs offload=True and step_in_backward=False.*got offload=True, "
                                             "step_in_backward=True"):
            LeanAdamW(trainable(model), LR, WD, offload=True, step_in_backward=True)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="sharded_state_dict needs offload=True"):
        LeanAdamW(trainable(toy()), LR, WD, step_in_backward=True).sharded_state_dict(names(toy()))


@pytest.mark.parametrize("states", ["fp32", "8bit"])
def test_sharded_state_round_trip_resumes_exactly(tmp_path, states):
    """A sharded checkpoint (``training.checkpoint``) saved after 2 steps and loaded into a fresh model and
    optimizer of other weights continues as the uninterrupted run: with fp32 states the same states on load and
    the same masters and weights, bit for bit, 2 steps later; 8-bit states are written dequantized (so that they
    load at any process count) and quantized again on load: within one 8-bit code."""
    if states == "8bit":
        pytest.importorskip("bitsandbytes")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = sharded(toy(hidden=1024), mesh)
        optimizer = build_adamw(trainable(model), LR, WD, states=states, offload=True)
        run(model, optimizer, 0, 1, range(2))
        optimizer.param_groups[0]["lr"] = LR / 3  # (a scheduler's value: restored too)
        if states == "8bit":
            kinds = {state["state1"].dtype for state in optimizer.inner[0].state.values()}
            assert kinds == {torch.uint8, torch.float32}  # the large weights quantized, the biases not
        world = World(0, 1, torch.device("cpu"))
        ckpt.save_sharded_checkpoint(tmp_path, "step2", model, optimizer, {"step": 2}, world)

        fresh_model = sharded(toy(seed=1, hidden=1024), mesh)
        fresh = build_adamw(trainable(fresh_model), LR, WD, states=states, offload=True)
        ckpt.load_sharded_checkpoint(tmp_path / "step2", fresh_model, fresh)
        assert fresh.param_groups[0]["lr"] == LR / 3
        for master, mine, theirs in zip(optimizer.masters, optimizer.inner[0].state.values(), fresh.inner[0].state.values()):
            assert mine.keys() == theirs.keys() and mine["step"] == theirs["step"] == 2
            if states == "fp32":
                for key in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(mine[key], theirs[key]), key
            else:  # quantized again: a block whose largest moment is negative may move by one code (the signed
                # map ends at -0.993), so the moments come back within 1% of the block's largest
                for saved, loaded in zip(_fp32_moments(mine, master)[1:], _fp32_moments(theirs, master)[1:]):
                    torch.testing.assert_close(loaded, saved, rtol=0, atol=0.01 * float(saved.abs().max()))
        run(model, optimizer, 0, 1, range(2, 4))
        run(fresh_model, fresh, 0, 1, range(2, 4))
    finally:
        dist.destroy_process_group()
    exact = dict(rtol=0, atol=0) if states == "fp32" else dict(rtol=0, atol=1e-3)
    for mine, theirs in zip(optimizer.masters, fresh.masters):
        torch.testing.assert_close(theirs, mine, **exact)
    for mine, theirs in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(theirs.to_local(), mine.to_local(), **exact)
