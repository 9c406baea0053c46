"""FSDP2 in one process (a process group of one): the sharded model computes what the plain model
computes (generation inside ``gathered``, the training pass, gradients), its unsharded copy holds the
same weights, and sharded checkpoints round-trip and are written atomically."""
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lens_fast.model import build_tiny_lens
from lens_fast.training import checkpoint as ckpt
from lens_fast.training.config import TrainConfig
from lens_fast.training.distributed import fsdp_units, gathered, init_world, replicated_parameters, shard_model
from lens_fast.training.optim import build_adamw, clip_grad_norm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXPRESSIONS = ["the red circle", "the star"]


@pytest.fixture(scope="module")
def world():
    assert not dist.is_initialized()
    world = init_world("cpu", "fsdp")
    assert dist.is_initialized() and world.size == 1
    yield world
    dist.destroy_process_group()


def pictures(seed=0, sizes=((100, 150), (77, 33))):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def sharded_pair(world, dtype=torch.float32, **overrides):
    plain = build_tiny_lens(seed=0, **overrides).to(dtype)
    sharded = shard_model(build_tiny_lens(seed=0, **overrides).to(dtype), world)
    return plain, sharded


def training_pass(model, completions=None):
    """(completions, log-probs, low-res masks, {name: full gradient}) of a sum over both outputs."""
    images = model.prepare_images(pictures())
    prompts = model.tokenize_prompts(images, EXPRESSIONS)
    if completions is None:
        with torch.no_grad(), gathered(model):
            generators = [torch.Generator().manual_seed(i) for i in range(len(images))]
            completions = model.generate(prompts, model.encode(images, sam=False), num_generations=3, max_new_tokens=8,
                                         temperature=1.0, generator=generators)
    model.zero_grad(set_to_none=True)
    logp, low_res = model(images, prompts, completions)
    (logp.sum() + low_res.float().pow(2).mean()).backward()
    grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
             for name, p in model.named_parameters() if p.grad is not None}
    return completions, logp.detach(), low_res.detach(), grads


def test_sharded_model_generates_and_trains_as_the_plain_model(world):
    plain, sharded = sharded_pair(world)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    units = fsdp_units(sharded)
    assert len(units) == 2 + 2  # the tiny policy's decoder layers and vision blocks
    completions, logp, low_res, grads = training_pass(sharded)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())  # sharded again after gathered
    again, plain_logp, plain_low_res, plain_grads = training_pass(plain, None)
    assert torch.equal(again.ids, completions.ids) and torch.equal(again.mask, completions.mask)
    torch.testing.assert_close(logp, plain_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low_res, plain_low_res, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and len(grads) > 50
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    state = ckpt.unsharded_copy(sharded).state_dict()
    for name, value in plain.state_dict().items():
        assert torch.equal(state[name], value), name


def test_sharded_bf16_model_keeps_its_fp32_prompt_encoder_whole_and_trains_as_the_plain_bf16_model(world):
    """bf16 weights: SAM's prompt encoder stays fp32 and unsharded (FSDP2 reduces one dtype per unit), the rest
    is sharded; log-probs, masks, gradients and an offloaded AdamW step (fp32 host masters of the shards and of
    the whole prompt encoder) are the plain bf16 model's."""
    plain, sharded = sharded_pair(world, torch.bfloat16)
    whole = replicated_parameters(sharded)
    assert {id(p) for p in whole} == {id(p) for p in sharded.segmenter.prompt_encoder.parameters()}
    assert all(p.dtype == torch.float32 and not isinstance(p, DTensor) for p in whole)
    others = [p for p in sharded.parameters() if p.dtype != torch.float32]
    assert others and all(p.dtype == torch.bfloat16 and isinstance(p, DTensor) for p in others)
    assert replicated_parameters(build_tiny_lens(seed=0)) == []  # fp32 weights: everything is sharded

    optimizers = [build_adamw([p for p in m.parameters() if p.requires_grad], 1e-3, 0.1, offload=True) for m in (sharded, plain)]
    completions, logp, low_res, grads = training_pass(sharded)
    _, plain_logp, plain_low_res, plain_grads = training_pass(plain, completions)
    assert logp.dtype == torch.float32 and low_res.dtype == torch.bfloat16
    torch.testing.assert_close(logp, plain_logp, rtol=0, atol=0)
    torch.testing.assert_close(low_res, plain_low_res, rtol=0, atol=0)
    assert grads.keys() == plain_grads.keys()
    assert any(name.startswith("segmenter.prompt_encoder.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=0, atol=0, msg=name)
    norms = [clip_grad_norm(optimizer, 1.0) for optimizer in optimizers]
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-5, atol=0)  # (sums in another order)
    assert norms[0] > 1.0  # the clipping acts
    for optimizer in optimizers:
        optimizer.step()
    state = ckpt.unsharded_copy(sharded).state_dict()
    for mine, theirs in zip(*(optimizer.masters for optimizer in optimizers)):
        assert mine.shape == theirs.shape  # one process holds every shard
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-8)  # (the clipping scales differ by ~1e-6)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(state[name], value, msg=name)  # the masters rounded to bf16: one ulp at most


def test_sharded_bf16_model_steps_torch_adamw_as_the_plain_bf16_model(world):
    """Without offload, torch's AdamW on the mix of bf16 DTensors and the whole fp32 prompt encoder: the clipping
    norm spans both (torch's clip_grad_norm_ cannot mix them; the plain model's norm is computed in bf16, ours in
    fp32: within bf16's precision) and the step gives the plain model's weights."""
    plain, sharded = sharded_pair(world, torch.bfloat16)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (sharded, plain)]
    fp32_name = "segmenter.prompt_encoder.no_mask_embed.weight"
    fp32_before = plain.state_dict()[fp32_name].clone()
    completions, *_ = training_pass(sharded)
    training_pass(plain, completions)
    norms = [clip_grad_norm(optimizer, 1.0) for optimizer in optimizers]
    assert float(norms[0]) == pytest.approx(float(norms[1]), rel=4e-3) and float(norms[0]) > 1.0
    for optimizer in optimizers:
        optimizer.step()
    state = ckpt.unsharded_copy(sharded).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(state[name], value, msg=name)
    assert state[fp32_name].dtype == torch.float32 and not torch.equal(state[fp32_name], fp32_before)  # stepped too


def test_frozen_parts_of_a_sharded_model_get_no_gradient_and_unfreeze(world):
    _, sharded = sharded_pair(world)
    sharded.requires_grad_(False)
    sharded.connector.requires_grad_(True)  # LENS's stage 1: queries + connector only
    sharded.queries.requires_grad_(True)
    _, _, _, grads = training_pass(sharded)
    assert grads and all(name.startswith(("connector.", "queries.")) for name in grads)
    sharded.requires_grad_(True)  # the stage switch: everything trains
    _, _, _, grads = training_pass(sharded)
    assert any(name.startswith("policy.model.model.language_model.layers.") for name in grads)
    assert any(name.startswith("policy.model.model.visual.blocks.") for name in grads)


def adamw_step(model):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    training_pass(model)
    optimizer.step()
    return optimizer


def test_sharded_checkpoint_round_trip_full_files_and_atomicity(world, tmp_path, monkeypatch):
    _, sharded = sharded_pair(world)
    optimizer = adamw_step(sharded)
    ckpt.save_sharded_checkpoint(tmp_path, "first", sharded, optimizer, {"step": 1}, world, full_model=True)
    path = tmp_path / "first"
    assert ckpt.latest_checkpoint(tmp_path) == path and ckpt.is_sharded(path)
    full = ckpt.unsharded_copy(sharded).state_dict()
    loaded = ckpt.LensModel.from_pretrained(path).state_dict()  # the save_pretrained files
    for name, value in full.items():
        assert torch.equal(loaded[name], value), name

    fresh = shard_model(build_tiny_lens(seed=1), world)  # other weights, and no AdamW state yet (a resume)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)
    ckpt.load_sharded_checkpoint(path, fresh, fresh_optimizer)
    for name, value in ckpt.unsharded_copy(fresh).state_dict().items():
        assert torch.equal(value, full[name]), name
    stepped = 0
    for mine, theirs in zip(optimizer.param_groups[0]["params"], fresh_optimizer.param_groups[0]["params"]):
        if mine in optimizer.state:  # (parameters that never had a gradient have no AdamW state)
            stepped += 1
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer.state[mine][key].full_tensor(), fresh_optimizer.state[theirs][key].full_tensor())
    assert stepped > 50

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.dcp, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_sharded_checkpoint(tmp_path, "second", sharded, optimizer, {"step": 2}, world)
    assert ckpt.latest_checkpoint(tmp_path) == path and not (tmp_path / "second").exists()
    assert not ckpt.is_sharded(tmp_path / ".second.tmp")


def test_sharding_option_is_checked():
    assert TrainConfig().sharding == "ddp"
    with pytest.raises(ValueError, match=r"sharding must be one of \('ddp', 'fsdp'\), got 'zero3'"):
        TrainConfig(sharding="zero3")
    assert TrainConfig(sharding="fsdp", precision="bf16-mixed").sharding == "fsdp"
    assert TrainConfig(sharding="fsdp", precision="bf16", optimizer_offload=True, optimizer_states="8bit").sharding == "fsdp"
    refused = r"sharding 'fsdp' runs torch's AdamW \(fp32 states\) or the offloaded one .*got "
    with pytest.raises(ValueError, match=refused + r"step_in_backward=True, optimizer_states='fp32', optimizer_offload=True"):
        TrainConfig(sharding="fsdp", optimizer_offload=True, step_in_backward=True)
    with pytest.raises(ValueError, match=refused + r"step_in_backward=False, optimizer_states='8bit', optimizer_offload=False"):
        TrainConfig(sharding="fsdp", optimizer_states="8bit")


def test_not_sharded_model_is_untouched_by_gathered():
    model = build_tiny_lens(seed=0)
    before = [p for p in model.parameters()]
    with gathered(model):
        pass
    assert all(a is b for a, b in zip(before, model.parameters()))
