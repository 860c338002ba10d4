"""Class purity of latents (paper §4.1, spec §5), streaming and sparse-aware.

For latent k with at least one positive activation, with `N_k = {n : a_kn > 0}`:

    c*_k = argmax_c #{n in N_k : y_n = c}      (ties -> the smallest class index)
    binary_k   = #{n in N_k : y_n = c*_k} / |N_k|
    weighted_k = Σ_{n in N_k, y_n = c*_k} a_kn / Σ_{n in N_k} a_kn

and the reported numbers are the means of binary_k and weighted_k over those
latents (0.0 for both when no latent ever fires). Only positive activations
count; the state is per-class counts and masses ([C, M], float64), so the
metric is one pass over the data and shards merge by addition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from monoray.errors import InputError
from monoray.metrics._checks import (
    check_activations,
    check_finite_dense,
    check_finite_values,
    check_labels,
    is_sparse,
    load_tensor_state,
    raise_nonfinite,
    to_triplets,
)

__all__ = ["ClassPurityAccumulator", "class_purity"]

_F64 = torch.float64
_CHUNK_ELEMS = 1 << 24  # dense activations are scanned in row chunks of ~16M entries


def positive_entries(
    a: Tensor, name: str = "activations", *, check: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """(row, col, float64 value) of the strictly positive entries, dense or sparse.

    With `check`, raises `InputError` on NaN/inf first.
    """
    if is_sparse(a):
        t = to_triplets(a.detach(), name)
        if check:
            check_finite_values(t, name)
        keep = t.val > 0
        return t.row[keep], t.col[keep], t.val[keep].to(_F64)
    a = a.detach()
    if check:
        check_finite_dense(a, name)
    idx = torch.nonzero(a > 0)
    row, col = idx[:, 0], idx[:, 1]
    return row, col, a[row, col].to(_F64)


class ClassPurityAccumulator:
    """Streaming class purity: `update(activations, labels)` per batch, then `compute()`.

    State: `counts` and `mass`, [n_classes, n_latents] float64 (exact integer
    counts up to 2**53).
    """

    def __init__(
        self, n_latents: int, n_classes: int, *, device: torch.device | str | None = None
    ) -> None:
        if int(n_latents) < 1 or int(n_classes) < 1:
            raise InputError(
                f"ClassPurityAccumulator: n_latents={n_latents} and n_classes={n_classes} must be >= 1"
            )
        self.n_latents = int(n_latents)
        self.n_classes = int(n_classes)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (self.n_classes, self.n_latents)
        self.counts = torch.zeros(shape, dtype=_F64, device=self.device)
        self.mass = torch.zeros(shape, dtype=_F64, device=self.device)

    def update(self, activations: object, labels: object) -> ClassPurityAccumulator:
        """Add a batch: activations [B, n_latents] (dense or sparse), labels [B] ints."""
        a = check_activations(activations)
        if int(a.shape[1]) != self.n_latents:
            raise InputError(f"activations has {a.shape[1]} columns but n_latents={self.n_latents}")
        y = check_labels(labels, int(a.shape[0]), self.n_classes).to(self.device)
        a = a.to(self.device)
        if is_sparse(a):
            parts = [positive_entries(a)]
        else:
            step = max(1, _CHUNK_ELEMS // self.n_latents)
            for i in range(0, int(a.shape[0]), step):  # validate before touching the state
                if not bool(torch.isfinite(a[i : i + step].detach()).all()):
                    raise_nonfinite(a.detach(), "activations")
            parts = []
            for i in range(0, int(a.shape[0]), step):
                r, c, v = positive_entries(a[i : i + step], check=False)
                parts.append((r + i, c, v))
        flat_counts, flat_mass = self.counts.view(-1), self.mass.view(-1)
        for r, c, v in parts:
            key = y[r] * self.n_latents + c
            flat_counts.index_add_(0, key, torch.ones_like(v))
            flat_mass.index_add_(0, key, v)
        return self

    def merge(self, other: ClassPurityAccumulator) -> ClassPurityAccumulator:
        """Add another accumulator's state (same shape). Returns `self`."""
        if not isinstance(other, ClassPurityAccumulator) or other.counts.shape != self.counts.shape:
            raise InputError(
                "merge: expected a ClassPurityAccumulator with the same n_classes and n_latents"
            )
        self.counts += other.counts.to(self.device)
        self.mass += other.mass.to(self.device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors (references)."""
        return {"counts": self.counts, "mass": self.mass}

    def load_state_dict(self, state: dict[str, Tensor]) -> ClassPurityAccumulator:
        """Replace the state with `state` (as returned by `state_dict`). Returns `self`."""
        load_tensor_state(self, state, ("counts", "mass"))
        return self

    def per_latent(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(binary, weighted, active, dominant)` per latent ([M]; 0 where inactive)."""
        total = self.counts.sum(0)
        active = total > 0
        dominant = torch.argmax(self.counts, dim=0)  # first maximum: smallest class index
        top_count = self.counts.gather(0, dominant[None]).squeeze(0)
        top_mass = self.mass.gather(0, dominant[None]).squeeze(0)
        mass = self.mass.sum(0)
        one = torch.ones_like(total)
        binary = torch.where(active, top_count / torch.where(active, total, one), 0.0)
        weighted = torch.where(active, top_mass / torch.where(active, mass, one), 0.0)
        return binary, weighted, active, dominant

    def compute(self) -> tuple[float, float]:
        """`(binary, weighted)` purity, means over latents with a positive activation."""
        binary, weighted, active, _ = self.per_latent()
        k = int(active.sum())
        if k == 0:
            return 0.0, 0.0
        return float(binary[active].mean()), float(weighted[active].mean())


def class_purity(
    activations: object, labels: object, n_classes: int | None = None
) -> tuple[float, float]:
    """`(binary, weighted)` class purity over latents with ≥1 positive activation.

    activations [N, M] dense or torch sparse; labels [N] integers in
    [0, n_classes) (n_classes defaults to max(label) + 1).
    """
    a = check_activations(activations)
    y = check_labels(labels, int(a.shape[0]), n_classes)
    c = int(n_classes) if n_classes is not None else int(y.max()) + 1
    acc = ClassPurityAccumulator(int(a.shape[1]), c, device=a.device)
    return acc.update(a, y).compute()
