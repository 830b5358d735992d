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

Rows that are nearly full run padded all the same: there the gathers and scatters cost about
what the pads do, and the copy of attention's output that o_proj keeps would make a training
forward hold more than the padded one the memory plan counts (engine.memory_tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch

# The share of pad positions below which the padded pass is taken.
MIN_PAD_SHARE = 0.1


def layout_of(idx: torch.Tensor, lengths: Optional[torch.Tensor],
              at: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional["Ragged"]]:
    """(real tokens bool [B, T], their Ragged layout or None where the rows run padded) of the
    right-padded rows idx [B, T] of these lengths; (None, None) without lengths. `at`, the
    positions whose outputs are wanted, must lie among the real tokens."""
    if lengths is None:
        return None, None
    batch, seq = idx.shape
    lengths = lengths.to(device=idx.device, dtype=torch.long)
    if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > seq).any()):
        raise ValueError(f"lengths must be {batch} counts between 1 and {seq}, got {lengths.tolist()}")
    real = torch.arange(seq, device=idx.device) < lengths[:, None]
    if at is not None and bool((at & ~real).any()):
        raise ValueError("at marks positions past a row's length")
    return real, Ragged.of(real)


def zero_pads(out: torch.Tensor, real: Optional[torch.Tensor], layout: Optional["Ragged"]) -> torch.Tensor:
    """A per-position output [B, T, ...] (the real tokens' [N, ...] under a layout) in the
    input's layout, zeros at the pads; as it is without lengths (real None)."""
    if real is None:
        return out
    if layout is not None:
        return layout.spread(out)
    return out.masked_fill(~real.view(*real.shape, *(1,) * (out.dim() - 2)), 0)


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
    def of(cls, real: torch.Tensor) -> Optional["Ragged"]:
        """The layout of `real` [B, T] (layout_of's); None where the pads are too few to skip."""
        batch, seq = real.shape
        lengths = real.sum(1)
        n = int(lengths.sum())
        if batch * seq - n < MIN_PAD_SHARE * batch * seq:
            return None
        width = int(lengths.max())
        real = real[:, :width]
        t = torch.arange(width, device=real.device)
        rows = torch.arange(batch, device=real.device)[:, None].expand_as(real)[real]
        positions = t.expand_as(real)[real]
        return cls(rows * seq + positions, rows * width + positions, positions, batch, seq, width)

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


def scores_at_ends(model, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """A scalar model's score of each right-padded row at its last real token, index `last`
    [B]: [B] fp32. The rows run as their real tokens alone, the last layer at those tokens only."""
    ends = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    ends[torch.arange(ids.size(0), device=ids.device), last] = True
    return model(ids, lengths=last + 1, at=ends)
