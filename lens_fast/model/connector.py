"""LENS's context queries and connector: from the policy's hidden states to one SAM prompt token.

``ContextQueries``: N learnable embeddings appended after prompt + completion; the policy runs over
them and their last-layer states carry what it understood. ``Connector``: pre-LN bidirectional
transformer blocks over those N states, a Conv1d with kernel N collapsing them to one token, then
Linear-GELU-Linear to SAM's prompt dimension.
"""
from __future__ import annotations

import torch
from torch import nn


class ContextQueries(nn.Module):
    """``num_queries`` embeddings of the policy's hidden size, initialised N(0, ``init_std``)."""

    def __init__(self, num_queries: int, hidden_size: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(torch.randn(num_queries, hidden_size) * init_std)

    def forward(self, batch: int) -> torch.Tensor:
        """[batch, N, hidden]: the same queries for every sequence."""
        return self.embeddings.unsqueeze(0).expand(batch, -1, -1)


class Connector(nn.Module):
    """Query states [B, N, hidden] -> one prompt token [B, 1, prompt_dim]."""

    def __init__(self, num_queries: int, hidden_size: int, prompt_dim: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden_size, heads, int(hidden_size * mlp_ratio), dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.collapse = nn.Conv1d(hidden_size, hidden_size, kernel_size=num_queries)
        self.project = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, prompt_dim))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = states
        for block in self.blocks:
            x = block(x)
        x = self.collapse(self.norm(x).transpose(1, 2))  # [B, hidden, 1]
        return self.project(x.transpose(1, 2))
