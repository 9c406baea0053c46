"""The GRPO objective as the field runs it (TRL, verl, DAPO, Dr. GRPO, GSPO), as plain tensor maths.

Layout: B prompts x G completions, completion ``b * G + g`` answers prompt b; token tensors are
[N, L] with a bool ``mask`` of the completion's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from lens_fast.training.distributed import World

SCALE_REWARDS = ("group", "batch", "none")
AGGREGATIONS = ("sum", "normalize_then_sum")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # LENS: (r - mean) / (std + 1e-4)


def _normalise(rewards: torch.Tensor, scale: str) -> torch.Tensor:
    """[B, G] rewards -> group-centred advantages, divided by the group std, the batch std, or nothing."""
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(1, keepdim=True) + STD_EPS)
    if scale == "batch":
        return centred / (rewards.std() + STD_EPS)
    return centred


def group_local(scale: str, aggregation: str) -> bool:
    """True when a row's advantage depends on its own group's rewards only: ``scale="none"`` (nothing is
    divided by a batch statistic) or ``scale="group"`` with ``aggregation="sum"``. Otherwise it needs the
    whole batch's rewards (every process's): ``batch`` divides by the batch std, ``normalize_then_sum``
    (scaled) normalises the summed components over the batch."""
    return scale == "none" or (scale == "group" and aggregation == "sum")


def advantages(components: Mapping[str, torch.Tensor], group: int, *, scale: str = "group",
               aggregation: str = "sum", weights: Mapping[str, float] | None = None,
               world: World | None = None) -> torch.Tensor:
    """Advantages float32 [n] from per-completion reward components (each [n], n = B * G: rows ``b * G``
    to ``b * G + G - 1`` are prompt b's group), on the components' device.

    ``aggregation="sum"``: the weighted sum of the components is centred on its group mean and scaled by
    ``scale`` (LENS, GRPO; TRL's ``sum_then_normalize``).
    ``"normalize_then_sum"``: each component is centred on its group mean and scaled by ``scale`` on its
    own, then the weighted sum is centred on its batch mean and divided by its batch std (with
    ``scale="none"`` the sum is left as it is), so a component with a small spread (box, format) is not
    drowned by one with a large spread (mask). With ``scale="group"`` this is TRL's
    ``multi_objective_aggregation="normalize_then_sum"`` (TRL ignores ``scale_rewards`` there, always
    dividing each component by its group std); ``batch`` (each component divided by its batch std) and
    ``none`` (components only centred: Dr. GRPO) are this project's.
    ``scale``: divide by the group std (``group``), the batch std (``batch``) or not at all (``none``,
    Dr. GRPO). Std is the unbiased (``torch.std``) one, as TRL's, plus ``STD_EPS``.

    ``world``: under data parallelism each process passes its own rows (whole groups; the processes' rows
    in rank order form the global batch, as ``World.share`` deals prompts). When the advantages need batch
    statistics (not :func:`group_local`) every process's components are gathered and the global batch's
    advantages computed as one process would; this process's rows are returned. Collective then: every
    process calls it. Without ``world`` (or with a world of one) the rows given are the whole batch.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"reward_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    if not components:
        raise ValueError("components must hold at least one reward component")
    lengths = {k: v.numel() for k, v in components.items()}
    if len(set(lengths.values())) != 1 or next(iter(lengths.values())) % group:
        raise ValueError(f"components must all hold the same number of rows, a multiple of group {group} (whole "
                         f"groups), got {lengths}")
    if world is not None and world.size > 1 and not group_local(scale, aggregation):
        names = list(components)  # insertion order: the sum below adds them in one order on every process
        local = torch.stack([components[k].float().reshape(-1) for k in names], 1)
        rows, first = world.gather_rows(local)
        everything = advantages(dict(zip(names, rows.unbind(1))), group, scale=scale, aggregation=aggregation, weights=weights)
        return everything[first : first + local.shape[0]]
    weights = weights or {}
    grouped = {k: v.float().reshape(-1, group) for k, v in components.items()}
    if aggregation == "sum":
        total = sum(weights.get(k, 1.0) * v for k, v in grouped.items())
        return _normalise(total, scale).reshape(-1)
    total = sum(weights.get(k, 1.0) * _normalise(v, scale) for k, v in grouped.items()).reshape(-1)
    return (total - total.mean()) / (total.std() + STD_EPS) if scale != "none" else total


def zero_variance_fraction(rewards: torch.Tensor, group: int) -> float:
    """Fraction of groups whose G rewards are all equal (they teach nothing)."""
    grouped = rewards.view(-1, group)
    return float((grouped.max(1).values - grouped.min(1).values <= 1e-6).float().mean())


@dataclass
class PolicyLossStats:
    kl: float
    clip_fraction: float
    ratio_mean: float


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    total_rows: int | None = None,
    total_tokens: float | None = None,
) -> tuple[torch.Tensor, PolicyLossStats]:
    """The clipped GRPO surrogate + beta * k3 KL, aggregated by ``loss_type``.

    ``logp`` (with grad), ``old_logp`` (the policy that sampled; equal to ``logp.detach()`` on the
    first update of a rollout, so the ratio is 1 and clipping is inert), ``ref_logp``: float [N, L];
    ``advantages`` [N]; ``mask`` bool [N, L]. Per token: ratio r = exp(logp - old_logp) (``token``), or
    one ratio per sequence from its mean log-ratio (``sequence``: GSPO); surrogate
    -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A); k3 KL exp(ref - logp) - (ref - logp) - 1.
    ``loss_type``: ``grpo`` token-mean per sequence then mean (LENS), ``dapo`` sum over every token
    / token count, ``dr_grpo`` sum / (N * max_completion_length).

    When these N rows are one micro-batch of a larger step (or one process's share under data
    parallel), ``total_rows`` / ``total_tokens`` are the step's row and token counts that the means
    divide by (default: this call's), so the micro-batches' losses add up to the whole step's loss.
    Under DDP, which averages gradients over P processes, pass ``total_tokens`` = global tokens / P.
    """
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}, got {importance_sampling_level!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        seq = (log_ratio * mask).sum(1) / mask.sum(1).clamp(min=1)
        log_ratio = seq.unsqueeze(1).expand_as(logp)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp (the reference policy's log-probs)")
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    rows = logp.shape[0] if total_rows is None else total_rows
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(rows, 1)
    elif loss_type == "dapo":
        tokens = mask.sum() if total_tokens is None else torch.tensor(float(total_tokens), device=logp.device)
        loss = (per_token * mask).sum() / tokens.clamp(min=1)
    else:
        length = max_completion_length or logp.shape[1]
        loss = (per_token * mask).sum() / (max(rows, 1) * length)
    with torch.no_grad():
        tokens = mask.sum().clamp(min=1)
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon_high) & (adv > 0))
        stats = PolicyLossStats(
            kl=float((kl * mask).sum() / tokens),
            clip_fraction=float((is_clipped.to(mask.dtype) * mask).sum() / tokens),
            ratio_mean=float((ratio * mask).sum() / tokens),
        )
    return loss, stats
