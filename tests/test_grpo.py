"""The GRPO objective against hand-computed cases; advantages from 2 gloo processes equal one process's."""
import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lens_fast.training import grpo
from lens_fast.training.distributed import World


def test_advantages_group_scale_matches_hand_computation():
    adv = grpo.advantages({"r": torch.tensor([1.0, 0.0, 0.0, 1.0])}, 2)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)
    torch.testing.assert_close(adv, expected)


def test_advantages_batch_and_none_scales():
    rewards = {"r": torch.tensor([1.0, 0.0, 3.0, 3.0])}
    none = grpo.advantages(rewards, 2, scale="none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, 0.0, 0.0]))
    batch = grpo.advantages(rewards, 2, scale="batch")
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std()
    torch.testing.assert_close(batch, torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-4))


def test_normalize_then_sum_normalises_each_component_first():
    mask = torch.tensor([1.0, 0.0, 0.5, 0.5])
    box = torch.tensor([0.0, 0.1, 0.0, 0.1])
    summed = grpo.advantages({"mask": mask, "box": box}, 2, aggregation="sum", scale="none")
    torch.testing.assert_close(summed, torch.tensor([0.45, -0.45, -0.05, 0.05]))

    def norm(r):
        g = r.view(2, 2)
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).reshape(-1)

    total = norm(mask) + norm(box)
    per = grpo.advantages({"mask": mask, "box": box}, 2, aggregation="normalize_then_sum")
    torch.testing.assert_close(per, (total - total.mean()) / (total.std() + 1e-4))  # TRL's definition
    assert per[3] > 0.5 and per[2] < -0.5  # the box's small spread still decides the second group


def test_normalize_then_sum_subtracts_the_batch_mean_of_the_weighted_sum():
    """TRL: (s - mean(s)) / (std(s) + 1e-4) over the batch; the group-centred sum's mean is 0 only up to
    rounding, which the subtraction removes: the advantages sum to 0 to float precision."""
    rewards = {"mask": torch.tensor([0.3, 0.7, 0.1, 0.9, 0.2, 0.25]), "box": torch.tensor([0.0, 0.01, 0.02, 0.0, 0.5, 0.1])}
    adv = grpo.advantages(rewards, 3, aggregation="normalize_then_sum", weights={"box": 2.0})
    grouped = {k: v.view(2, 3) for k, v in rewards.items()}
    parts = {k: (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4) for k, g in grouped.items()}
    total = (parts["mask"] + 2.0 * parts["box"]).reshape(-1)
    torch.testing.assert_close(adv, (total - total.mean()) / (total.std() + 1e-4))
    assert abs(float(adv.sum())) < 1e-5


def test_advantages_reject_rows_that_are_not_whole_groups():
    with pytest.raises(ValueError, match="group 3"):
        grpo.advantages({"r": torch.zeros(4)}, 3)
    with pytest.raises(ValueError, match="same number of rows"):
        grpo.advantages({"a": torch.zeros(4), "b": torch.zeros(6)}, 2)
    with pytest.raises(ValueError, match="group must be"):
        grpo.advantages({"r": torch.zeros(4)}, 0)


OPTIONS = list(itertools.product(grpo.SCALE_REWARDS, grpo.AGGREGATIONS))
GROUP = 4
SHARES = ((0, 2), (2, 5))  # groups [first, last) of each process: 2 and 3 (uneven, as gather_rows allows)


def test_group_local_options():
    local = {(scale, aggregation) for scale, aggregation in OPTIONS if grpo.group_local(scale, aggregation)}
    assert local == {("group", "sum"), ("none", "sum"), ("none", "normalize_then_sum")}


def _components() -> dict:
    """Rewards of 5 groups of 4 whose spreads differ by group and by component."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 1.0, 0.3, 2.0, 0.05]).repeat_interleave(GROUP)
    return {"mask": torch.rand(5 * GROUP, generator=generator) * scales,
            "box": torch.rand(5 * GROUP, generator=generator) ** 3,
            "format": (torch.rand(5 * GROUP, generator=generator) > 0.5).float()}


def _advantages_rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        world = World(rank, 2, torch.device("cpu"))
        rows = slice(SHARES[rank][0] * GROUP, SHARES[rank][1] * GROUP)
        mine = {k: v[rows] for k, v in _components().items()}
        result = {(scale, aggregation): grpo.advantages(mine, GROUP, scale=scale, aggregation=aggregation,
                                                        weights={"box": 2.0}, world=world)
                  for scale, aggregation in OPTIONS}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_one_process_advantages_for_every_option(tmp_path):
    mp.start_processes(_advantages_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    parts = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    components = _components()
    for scale, aggregation in OPTIONS:
        one = grpo.advantages(components, GROUP, scale=scale, aggregation=aggregation, weights={"box": 2.0})
        two = torch.cat([part[scale, aggregation] for part in parts])
        assert torch.equal(two, one), (scale, aggregation)
        per_process = torch.cat([grpo.advantages({k: v[first * GROUP:last * GROUP] for k, v in components.items()}, GROUP,
                                                 scale=scale, aggregation=aggregation, weights={"box": 2.0})
                                 for first, last in SHARES])
        # what each process computed alone before: equal only where advantages are per group
        assert torch.equal(per_process, one) == grpo.group_local(scale, aggregation), (scale, aggregation)


def test_zero_variance_fraction():
    assert grpo.zero_variance_fraction(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2) == pytest.approx(2 / 3)


def _inputs():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    return logp, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_first_update_loss_is_minus_advantage_aggregated(loss_type):
    logp, mask, adv = _inputs()
    loss, stats = grpo.policy_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_completion_length=4)
    per_token = -adv[:, None].expand(2, 3) * mask
    if loss_type == "grpo":
        expected = ((per_token.sum(1) / mask.sum(1)).mean())  # (-1 + 2) / 2
    elif loss_type == "dapo":
        expected = per_token.sum() / mask.sum()  # (-2 + 6) / 5
    else:
        expected = per_token.sum() / (2 * 4)
    assert loss.item() == pytest.approx(float(expected))
    assert stats.clip_fraction == 0.0 and stats.ratio_mean == pytest.approx(1.0)
    loss.backward()
    # d/dlogp of -exp(logp - sg(logp)) * A = -A (per token weight of the aggregation)
    if loss_type == "dapo":
        torch.testing.assert_close(logp.grad, (-adv[:, None] * mask / 5).float())


def test_clipping_with_asymmetric_upper_bound():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, loss_type="dapo")
    # ratio 1.5 with A > 0 clipped to 1.2; ratio 0.5 with A > 0: min(0.5, 0.8) = 0.5 (not clipped)
    assert float(loss) == pytest.approx(-(1.2 + 0.5) / 2)
    assert stats.clip_fraction == pytest.approx(0.5)
    loss, _ = grpo.policy_loss(logp, old, torch.tensor([1.0]), mask, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    assert float(loss) == pytest.approx(-(1.28 + 0.5) / 2)
    loss, stats = grpo.policy_loss(logp, old, torch.tensor([-1.0]), mask, epsilon=0.2, loss_type="dapo")
    # A < 0: -min(1.5 * -1, 1.2 * -1) = 1.5 ; -min(-0.5, -0.8) = 0.8
    assert float(loss) == pytest.approx((1.5 + 0.8) / 2)
    assert stats.clip_fraction == pytest.approx(0.5)


def test_sequence_level_ratio_is_the_geometric_mean():
    logp = torch.log(torch.tensor([[2.0, 0.5, 4.0]]))
    mask = torch.tensor([[True, True, False]])
    loss, stats = grpo.policy_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask, epsilon=10.0,
                                   importance_sampling_level="sequence", loss_type="grpo")
    assert float(loss) == pytest.approx(-1.0)  # sqrt(2 * 0.5) = 1
    assert stats.ratio_mean == pytest.approx(1.0)


def test_k3_kl_term():
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -0.5]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = grpo.policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, ref_logp=ref, beta=0.1)
    kl = [math.exp(-0.5) + 0.5 - 1, math.exp(0.5) - 0.5 - 1]
    assert stats.kl == pytest.approx(sum(kl) / 2)
    assert float(loss) == pytest.approx(0.1 * sum(kl) / 2)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.policy_loss(logp, logp.detach(), torch.tensor([0.0]), mask, beta=0.1)


def test_bad_options_are_named():
    logp, mask, adv = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo.policy_loss(logp, logp.detach(), adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.policy_loss(logp, logp.detach(), adv, mask, importance_sampling_level="word")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.advantages({"r": torch.zeros(2)}, 2, scale="std")


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_add_up_to_the_whole_step(loss_type):
    """Rows split into micro-batches (or processes) with the step's totals give the whole loss and gradient."""
    generator = torch.Generator().manual_seed(3)
    logp = (-torch.rand(6, 5, generator=generator)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, 5, generator=generator)
    ref = logp.detach() + 0.1 * torch.randn(6, 5, generator=generator)
    adv = torch.randn(6, generator=generator)
    mask = torch.rand(6, 5, generator=generator) > 0.3
    options = dict(loss_type=loss_type, beta=0.04, epsilon_high=0.28, max_completion_length=7)
    whole, _ = grpo.policy_loss(logp, old, adv, mask, ref_logp=ref, **options)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts = [grpo.policy_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logp=ref[rows], total_rows=6,
                              total_tokens=float(mask.sum()), **options)[0] for rows in (slice(0, 1), slice(1, 4), slice(4, 6))]
    (parts_grad,) = torch.autograd.grad(sum(parts), logp)
    torch.testing.assert_close(sum(parts), whole)
    torch.testing.assert_close(parts_grad, whole_grad)
    assert not torch.allclose(parts[0], whole)  # the split is not trivial
