"""How an SAE training step sees the other ranks: `LOCAL` (one process) or `Ranks` (W
torch.distributed ranks, each holding a contiguous slice of the global batch, rank 0 first).

The SAE's batch-level decisions go through a `Collective`, so one training
step serves both: with `Ranks` every rank computes additive shares of the
single-process loss (means divide by the GLOBAL element count, MonoLoss is
the global-batch loss), the shares' gradients are summed over ranks
(`sum_grads`), and every batch-level choice (BatchTopK selection and its
threshold, dead-latent counters, TopK re-initialisation) is made on the
global batch and is identical on every rank. `LOCAL` is the identity: the
single-process step is exactly what it was.

Tie rule of the BatchTopK selection (both paths): among equal values the
entry with the lower flat position in the global batch (row-major; rank r's
rows after rank r-1's) is kept, so the kept set does not depend on W.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from monoray.sae.sparse import batch_topk


class Mergeable(Protocol):
    """A metric accumulator: tensor state, `load_state_dict` and an exact `merge`."""

    def state_dict(self) -> dict[str, Tensor]: ...
    def load_state_dict(self, state: dict[str, Tensor]) -> Any: ...
    def merge(self, other: Any) -> Any: ...


def smallest_positive(values: Tensor) -> Tensor:
    """0-dim min of the values > 0 (inf when there is none)."""
    if values.numel() == 0:
        return values.new_full((), torch.inf)
    return torch.where(values > 0, values, torch.inf).min()


class Collective:
    """One process: every method is the identity of the single-process step."""

    rank = 0
    size = 1
    rows = 0
    """Rows of the current global batch (set by `begin_batch`)."""

    def begin_batch(self, local_rows: int) -> int:
        """Start a training step on `local_rows` rows; returns the global batch size."""
        self.rows = local_rows
        return local_rows

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's indices of a global batch of sample indices."""
        return batch

    def mean(self, t: Tensor) -> Tensor:
        """Mean over every element of a [rows, ...] batch tensor (this rank's share)."""
        return t.mean()

    def share(self, value: Tensor) -> Tensor:
        """This rank's share of a loss term every rank computed in full (MonoLoss)."""
        return value

    def batch_topk(self, acts: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
        """The `n_keep` largest entries of the global [rows, M] matrix (ties: lower position)
        that lie on this rank: (values, local flat positions increasing, smallest positive
        kept value of the global selection)."""
        values, flat = batch_topk(acts, n_keep)
        return values, flat, smallest_positive(values)

    def any_(self, mask: Tensor) -> Tensor:
        """Elementwise OR of a bool tensor over ranks."""
        return mask

    def cat_rows(self, t: Tensor) -> Tensor:
        """[global rows, ...]: this rank's [local rows, ...] rows joined in rank order."""
        return t

    def rows_at(self, t: Tensor, idx: Tensor) -> Tensor:
        """Rows `idx` (global row numbers) of the global batch tensor whose rows here are `t`."""
        return t[idx]

    def sum_grads(self, params: Any) -> None:
        """Sum parameter gradients over ranks (the shares' gradients add up to the step's)."""

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """`t` reduced over ranks ("sum", "min", "max")."""
        return t

    def merged(self, acc: Mergeable) -> Mergeable:
        """An accumulator holding the merge of every rank's `acc` (rank order), on every rank."""
        return acc

    def val_rows(self, n: int) -> tuple[int, int]:
        """[start, stop) of the val split this rank evaluates."""
        return 0, n


LOCAL = Collective()


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


class Ranks(Collective):
    """The ranks of an initialised torch.distributed group (gloo: CPU tensors; NCCL: CUDA)."""

    def __init__(self, group: object = None, device: torch.device | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.device = device or torch.device("cpu")
        self._counts: list[int] = []
        self._offset = 0

    # ---- batch bookkeeping -----------------------------------------------------------
    def begin_batch(self, local_rows: int) -> int:
        counts = torch.zeros(self.size, dtype=torch.int64, device=self.device)
        counts[self.rank] = local_rows
        dist.all_reduce(counts, group=self.group)
        self._counts = counts.tolist()
        self._offset = sum(self._counts[: self.rank])
        self.rows = sum(self._counts)
        return self.rows

    def shard(self, batch: Tensor) -> Tensor:
        return torch.tensor_split(torch.sort(batch).values, self.size)[self.rank]

    def val_rows(self, n: int) -> tuple[int, int]:
        bounds = [n * r // self.size for r in range(self.size + 1)]
        return bounds[self.rank], bounds[self.rank + 1]

    # ---- loss shares -------------------------------------------------------------------
    def mean(self, t: Tensor) -> Tensor:
        per_row = t[0].numel() if t.dim() > 1 else 1
        return t.sum() / (self.rows * per_row)

    def share(self, value: Tensor) -> Tensor:
        # value / W, but the gradient of `value` itself: each rank's gradient of the global
        # MonoLoss is already its rows' share (mono_loss_global), and sum_grads adds them.
        return value / self.size + (value - value.detach()) * (1 - 1 / self.size)

    def sum_grads(self, params: Any) -> None:
        params = list(params)
        has = torch.tensor(
            [p.grad is not None for p in params], dtype=torch.int32, device=self.device
        )
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=self.group)
        grads = []
        for p, any_rank in zip(params, has.tolist(), strict=True):
            if any_rank and p.grad is None:  # used on another rank only: a zero share here
                p.grad = torch.zeros_like(p)
            if any_rank:
                grads.append(p.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # ---- selections ----------------------------------------------------------------------
    def batch_topk(self, acts: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
        # Rank r's share of the global selection is a prefix of its own entries in the order
        # (value desc, position asc), so its local top-n_keep holds it; the gathered
        # candidates give the global cut T and how many entries equal to T each rank keeps.
        local = min(n_keep, acts.numel())
        values, flat = batch_topk(acts, local)
        cand = values.new_full((n_keep,), -torch.inf)
        cand[:local] = values
        gathered = cand.new_empty(self.size * n_keep)
        dist.all_gather_into_tensor(gathered, cand, group=self.group)
        gathered = gathered.view(self.size, n_keep)
        cut = gathered.reshape(-1).topk(n_keep, sorted=False).values.min()
        above = (gathered > cut).sum(1)
        ties = (gathered == cut).sum(1)
        need = n_keep - above.sum()
        before = ties.cumsum(0) - ties
        quota = (need - before[self.rank]).clamp(0, ties[self.rank])
        tie = values == cut
        keep = (values > cut) | (tie & (tie.cumsum(0) <= quota))
        smallest = torch.where((gathered >= cut) & (gathered > 0), gathered, torch.inf).min()
        return values[keep], flat[keep], smallest

    def any_(self, mask: Tensor) -> Tensor:
        m = mask.to(torch.int32)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m.bool()

    def cat_rows(self, t: Tensor) -> Tensor:
        width = max(self._counts)
        padded = t.new_zeros(width, *t.shape[1:])
        padded[: t.shape[0]] = t
        out = t.new_empty(self.size * width, *t.shape[1:])
        dist.all_gather_into_tensor(out, padded.contiguous(), group=self.group)
        return torch.cat([out[r * width : r * width + c] for r, c in enumerate(self._counts)])

    def rows_at(self, t: Tensor, idx: Tensor) -> Tensor:
        local = idx - self._offset
        mine = (local >= 0) & (local < t.shape[0])
        out = t.new_zeros(idx.numel(), *t.shape[1:])
        out[mine] = t[local[mine]]
        dist.all_reduce(out, group=self.group)  # one owner per row: a sum of one term
        return out

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out

    def merged(self, acc: Mergeable) -> Mergeable:
        state = acc.state_dict()
        gathered: dict[str, list[Tensor]] = {}
        for key, t in state.items():
            send = t.to(torch.uint8) if t.dtype == torch.bool else t
            parts = [torch.empty_like(send) for _ in range(self.size)]
            dist.all_gather(parts, send.contiguous(), group=self.group)
            gathered[key] = [p.to(t.dtype) for p in parts]
        total = copy.deepcopy(acc).load_state_dict({k: v[0] for k, v in gathered.items()})
        for r in range(1, self.size):
            other = copy.deepcopy(acc).load_state_dict({k: v[r] for k, v in gathered.items()})
            total.merge(other)
        return total
