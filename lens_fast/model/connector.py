"""LENS's context queries and connector: from the policy's hidden states to one SAM prompt token.

``ContextQueries``: N learnable embeddings appended after prompt + completion; the policy runs over
them and their last-layer states carry what it understood. ``Connector``: LENS's layout (hustvl/LENS,
``SAMR1ForConditionalGeneration_qwen2p5``: ``connector``, ``conv_1d``, ``proj_to_sam``):

1. a learned position embedding [1, N, hidden] (zero-initialised) added to the N query states;
2. ``depth`` pre-LN bidirectional transformer blocks (LENS: 4, 16 heads, MLP ratio 4): x + attn(LN(x)),
   then x + MLP(LN(x)); LayerNorm eps 1e-6; attention with one fused qkv Linear (bias) and an output
   Linear, softmax(q k^T / sqrt(head_dim)) over all N queries (no mask); MLP Linear -> QuickGELU
   (x * sigmoid(1.702 x)) -> Linear; no norm after the last block;
3. a Conv1d(hidden, hidden, kernel N) collapsing the N states to one token;
4. Linear(hidden, hidden) -> GELU (exact) -> Linear(hidden, prompt_dim) (LENS: 256, SAM's prompt dim).

Initialisation as LENS declares it: the queries and the Conv1d weight N(0, 0.02) with a zero Conv1d bias
(LENS's ``_init_custom_params``); every Linear N(0, the policy's ``initializer_range``) with zero bias
(LENS's ``post_init`` applies Qwen2.5-VL's ``_init_weights`` to them: 0.02 for Qwen2.5-VL-3B; the tiny
policy's is 0.2, which keeps the tiny connector's output token at a usable scale); LayerNorms weight 1,
bias 0; the position embedding 0. The input is the last layer's (normed) hidden states at the N query positions,
as LENS takes ``hidden_states[-1][:, -N:]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6
"""LENS's connector blocks (Qwen2-VL's vision block layout) use LayerNorm(eps=1e-6)."""


class ContextQueries(nn.Module):
    """``num_queries`` embeddings of the policy's hidden size, initialised N(0, ``init_std``)."""

    def __init__(self, num_queries: int, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_queries, hidden_size) * init_std)

    def forward(self, batch: int) -> torch.Tensor:
        """[batch, N, hidden]: the same queries for every sequence."""
        return self.embeddings.unsqueeze(0).expand(batch, -1, -1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): transformers' ``quick_gelu``, the activation of LENS's connector MLP."""
    return x * torch.sigmoid(1.702 * x)


class ConnectorBlock(nn.Module):
    """One pre-LN bidirectional transformer block over [B, N, hidden] (see the module docstring)."""

    def __init__(self, hidden_size: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if hidden_size % heads:
            raise ValueError(f"heads {heads} must divide hidden_size {hidden_size}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(hidden_size, int(hidden_size * mlp_ratio))
        self.fc2 = nn.Linear(int(hidden_size * mlp_ratio), hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, hidden))
        return x + self.fc2(quick_gelu(self.fc1(self.norm2(x))))


class Connector(nn.Module):
    """Query states [B, N, hidden] -> one prompt token [B, 1, prompt_dim] (LENS's layout and init: see
    the module docstring). ``linear_init_std``: the std of every Linear's weight (LENS: the policy's
    ``initializer_range``); ``conv_init_std``: the Conv1d's (LENS: 0.02)."""

    def __init__(
        self, num_queries: int, hidden_size: int, prompt_dim: int, depth: int, heads: int, mlp_ratio: float = 4.0,
        linear_init_std: float = 0.02, conv_init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.position = nn.Parameter(torch.zeros(1, num_queries, hidden_size))
        self.blocks = nn.ModuleList(ConnectorBlock(hidden_size, heads, mlp_ratio) for _ in range(depth))
        self.collapse = nn.Conv1d(hidden_size, hidden_size, kernel_size=num_queries)
        self.project = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, prompt_dim))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                std = conv_init_std if isinstance(module, nn.Conv1d) else linear_init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``states`` [B, N, hidden] (N = ``num_queries``) -> [B, 1, prompt_dim], in ``states``' dtype."""
        if states.dim() != 3 or states.shape[1] != self.num_queries:
            raise ValueError(f"states must be [B, {self.num_queries}, hidden], got shape {tuple(states.shape)}")
        x = states + self.position
        for block in self.blocks:
            x = block(x)
        x = self.collapse(x.transpose(1, 2))  # [B, hidden, 1]
        return self.project(x.transpose(1, 2))
