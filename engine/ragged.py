"""Right-padded rows run as their real tokens only.

A batch of sequences of different lengths is a [B, T] tensor padded to its longest row, and a
padded forward pass spends on every pad position what it spends on a real token: the
projections, the MLP, the norms, their backward passes. In an RL batch (prompt | answer | pad,
prompts of 9 to 38 tokens on the demo) a quarter of the positions or more are pads. Called with
`lengths`, the model runs everything that works token by token on the [N, d] real tokens alone
and lays them out as [B, T', ...] (T' the longest row) only for attention, where causal SDPA
over right-padded rows never lets a real token read a pad; the pads there are zeros whose
outputs nobody reads. The real positions compute the padded forward's arithmetic (the same
values up to the rounding of a matmul over another number of rows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Ragged:
    """Where the real tokens of right-padded rows lie: row b holds lengths[b] of them, first."""
    index: torch.Tensor      # [N] flat positions b * T + t of the real tokens in the [B, T] input
    inner: torch.Tensor      # [N] the same tokens' flat positions in [B, width]
    positions: torch.Tensor  # [N] t, each token's position in its row
    batch: int
    seq: int                 # T, the input's width
    width: int               # the longest row: attention's width

    @classmethod
    def of(cls, lengths: torch.Tensor, seq: int) -> "Ragged":
        lengths = lengths.to(torch.long)
        if lengths.dim() != 1 or bool((lengths < 1).any()) or bool((lengths > seq).any()):
            raise ValueError(f"lengths must be [batch] counts between 1 and {seq}, got {lengths.tolist()}")
        width = int(lengths.max())
        t = torch.arange(width, device=lengths.device)
        real = t < lengths[:, None]                                  # [B, width]
        rows = torch.arange(len(lengths), device=lengths.device)[:, None].expand_as(real)[real]
        positions = t.expand_as(real)[real]
        return cls(rows * seq + positions, rows * width + positions, positions, len(lengths), seq, width)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] (the input's layout) -> [N, ...], the real tokens in row-major order."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.index)

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at the pads: an output in the input's layout."""
        out = x.new_zeros((self.batch * self.seq, *x.shape[1:])).index_copy_(0, self.index, x)
        return out.view(self.batch, self.seq, *x.shape[1:])

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, heads, hd] -> [B, heads, width, hd] for attention, zeros at the pads."""
        out = x.new_zeros((self.batch * self.width, *x.shape[1:])).index_copy_(0, self.inner, x)
        return out.view(self.batch, self.width, *x.shape[1:]).transpose(1, 2)

    def from_heads(self, y: torch.Tensor) -> torch.Tensor:
        """Attention's [B, heads, width, hd] -> [N, heads * hd], the real tokens' rows."""
        return y.transpose(1, 2).reshape(self.batch * self.width, -1).index_select(0, self.inner)
