"""Reconstruction and sparsity metrics (spec §5), streaming in float64.

Definitions, for features `x` [N, d], reconstructions `x̂` [N, d], latents `z` [N, M]:

- per dim j: `SS_tot_j = Σ_n (x_nj - mean_j)²`, `SS_res_j = Σ_n (x_nj - x̂_nj)²`.
- `r2_score` (the paper's R²): mean over dims with `SS_tot_j > 0` of
  `1 - SS_res_j / SS_tot_j`. A dim counts as constant when
  `SS_tot_j <= 1e-12·Σ_n x_nj²` (float64 rounding leaves ~1e-32 relative
  residue on an exactly constant dim). NaN if every dim is constant.
- `explained_variance` (SAELens convention, one global ratio):
  `1 - Σ_j SS_res_j / Σ_j SS_tot_j`; `fvu = Σ_j SS_res_j / Σ_j SS_tot_j`
  (both NaN when the data is constant by the same rule).
- `l0`: mean number of non-zero latents per sample.
- `dead_fraction`: fraction of latents that never fired (`z > 0`) on the data.

The streaming state is `n`, per-dim `mean` and `m2` (Chan et al.'s pairwise
update: stable where `Σx² - (Σx)²/n` would cancel), `ss_res`, and for latents
the non-zero count and a per-latent "ever fired" mask. All of it merges
exactly across shards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from monoray.errors import InputError
from monoray.metrics._checks import (
    as_tensor,
    check_2d_float,
    check_activations,
    check_finite_dense,
    check_finite_values,
    is_sparse,
    load_tensor_state,
    to_triplets,
)

__all__ = [
    "ReconstructionAccumulator",
    "dead_fraction",
    "explained_variance",
    "l0",
    "r2_score",
]

_F64 = torch.float64
CONST_RTOL = 1e-12
"""A dim is constant when SS_tot <= CONST_RTOL · Σx² (see the module docstring)."""


def _check_pair(x: object, x_hat: object) -> tuple[Tensor, Tensor]:
    xt = as_tensor(x, "x")
    check_2d_float(xt, "x")
    if is_sparse(xt):
        raise InputError("x: expected a dense tensor")
    xh = as_tensor(x_hat, "x_hat")
    check_2d_float(xh, "x_hat")
    if is_sparse(xh):
        raise InputError("x_hat: expected a dense tensor")
    if tuple(xt.shape) != tuple(xh.shape):
        raise InputError(f"x has shape {tuple(xt.shape)} but x_hat has shape {tuple(xh.shape)}")
    check_finite_dense(xt.detach(), "x")
    check_finite_dense(xh.detach(), "x_hat")
    return xt.detach(), xh.detach()


def _latent_stats(z: Tensor) -> tuple[int, Tensor]:
    """(number of non-zero entries, per-latent fired mask `any(z > 0)`) of validated latents."""
    z = z.detach()
    if is_sparse(z):
        t = to_triplets(z, "latents")
        check_finite_values(t, "latents")
        nnz = int((t.val != 0).sum())
        fired = torch.zeros(t.n_cols, dtype=torch.bool, device=t.val.device)
        fired[t.col[t.val > 0]] = True
        return nnz, fired
    check_finite_dense(z, "latents")
    return int(torch.count_nonzero(z)), (z > 0).any(0)


class ReconstructionAccumulator:
    """Streaming R², explained variance / FVU, MSE, L0 and dead fraction.

    `update(x, x_hat, latents=None)` per batch; `compute()` returns a dict with
    `r2`, `explained_variance`, `fvu`, `mse`, and `l0` / `dead_fraction` when
    latents were given (`n_latents` must then be set).
    """

    _KEYS = ("n", "mean", "m2", "ss_res", "latent_rows", "latent_nnz", "fired")

    def __init__(
        self, dim: int, n_latents: int | None = None, *, device: torch.device | str | None = None
    ) -> None:
        if int(dim) < 1 or (n_latents is not None and int(n_latents) < 1):
            raise InputError(
                f"ReconstructionAccumulator: dim={dim} and n_latents={n_latents} must be >= 1"
            )
        self.dim = int(dim)
        self.n_latents = None if n_latents is None else int(n_latents)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        dev = self.device
        self.n = torch.zeros((), dtype=torch.int64, device=dev)
        self.mean = torch.zeros(self.dim, dtype=_F64, device=dev)
        self.m2 = torch.zeros(self.dim, dtype=_F64, device=dev)
        self.ss_res = torch.zeros(self.dim, dtype=_F64, device=dev)
        self.latent_rows = torch.zeros((), dtype=torch.int64, device=dev)
        self.latent_nnz = torch.zeros((), dtype=torch.int64, device=dev)
        self.fired = torch.zeros(self.n_latents or 0, dtype=torch.bool, device=dev)

    def update(self, x: object, x_hat: object, latents: object = None) -> ReconstructionAccumulator:
        """Add a batch: x, x_hat [B, dim]; optional latents [B, n_latents] (dense or sparse)."""
        xt, xh = _check_pair(x, x_hat)
        if int(xt.shape[1]) != self.dim:
            raise InputError(f"x has {xt.shape[1]} columns but dim={self.dim}")
        z_stats = None
        if latents is not None:
            if self.n_latents is None:
                raise InputError("latents: this accumulator was created without n_latents")
            z = check_activations(latents, "latents")
            if int(z.shape[0]) != int(xt.shape[0]):
                raise InputError(f"x has {xt.shape[0]} rows but latents has {z.shape[0]}")
            if int(z.shape[1]) != self.n_latents:
                raise InputError(f"latents has {z.shape[1]} columns but n_latents={self.n_latents}")
            z_stats = _latent_stats(z.to(self.device))
        xb = xt.to(device=self.device, dtype=_F64)
        xhb = xh.to(device=self.device, dtype=_F64)
        nb = int(xb.shape[0])
        mean_b = xb.mean(0)
        m2_b = ((xb - mean_b) ** 2).sum(0)
        self._combine(nb, mean_b, m2_b)
        self.ss_res += ((xb - xhb) ** 2).sum(0)
        if z_stats is not None:
            self.latent_rows += nb
            self.latent_nnz += z_stats[0]
            self.fired |= z_stats[1]
        return self

    def _combine(self, nb: int | Tensor, mean_b: Tensor, m2_b: Tensor) -> None:
        na = int(self.n)
        nb = int(nb)
        if nb == 0:
            return
        tot = na + nb
        delta = mean_b - self.mean
        self.mean += delta * (nb / tot)
        self.m2 += m2_b + delta * delta * (na * nb / tot)
        self.n += nb

    def merge(self, other: ReconstructionAccumulator) -> ReconstructionAccumulator:
        """Add another accumulator's state (same dim and n_latents). Returns `self`."""
        if not isinstance(other, ReconstructionAccumulator) or (other.dim, other.n_latents) != (
            self.dim,
            self.n_latents,
        ):
            raise InputError(
                "merge: expected a ReconstructionAccumulator with the same dim and n_latents"
            )
        self._combine(int(other.n), other.mean.to(self.device), other.m2.to(self.device))
        self.ss_res += other.ss_res.to(self.device)
        self.latent_rows += other.latent_rows.to(self.device)
        self.latent_nnz += other.latent_nnz.to(self.device)
        self.fired |= other.fired.to(self.device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The state as plain tensors (references)."""
        return {k: getattr(self, k) for k in self._KEYS}

    def load_state_dict(self, state: dict[str, Tensor]) -> ReconstructionAccumulator:
        """Replace the state with `state` (as returned by `state_dict`). Returns `self`."""
        load_tensor_state(self, state, self._KEYS)
        return self

    def ss_tot(self) -> Tensor:
        """Per-dim total sum of squares about the mean ([dim], float64)."""
        return self.m2.clone()

    def r2_per_dim(self) -> Tensor:
        """Per-dim `1 - SS_res/SS_tot` ([dim]); NaN on constant dims."""
        n = float(self.n)
        sumsq = self.m2 + n * self.mean * self.mean
        varying = self.m2 > CONST_RTOL * sumsq
        safe = torch.where(varying, self.m2, torch.ones_like(self.m2))
        return torch.where(varying, 1.0 - self.ss_res / safe, math.nan)

    def compute(self) -> dict[str, float]:
        """`r2`, `explained_variance`, `fvu`, `mse` (+ `l0`, `dead_fraction` with latents)."""
        n = int(self.n)
        if n < 1:
            raise InputError("ReconstructionAccumulator: no samples added; call update() first")
        per_dim = self.r2_per_dim()
        valid = ~torch.isnan(per_dim)
        r2 = float(per_dim[valid].mean()) if bool(valid.any()) else math.nan
        tot, res = float(self.m2.sum()), float(self.ss_res.sum())
        sumsq = float((self.m2 + n * self.mean * self.mean).sum())
        fvu = res / tot if tot > CONST_RTOL * sumsq else math.nan
        out = {
            "r2": r2,
            "explained_variance": 1.0 - fvu,
            "fvu": fvu,
            "mse": res / (n * self.dim),
        }
        rows = int(self.latent_rows)
        if self.n_latents is not None and rows > 0:
            out["l0"] = int(self.latent_nnz) / rows
            out["dead_fraction"] = float((~self.fired).sum()) / self.n_latents
        return out


def r2_score(x: object, x_hat: object) -> float:
    """Mean over non-constant dims of `1 - SS_res_j/SS_tot_j` (the paper's R²), float64."""
    xt, xh = _check_pair(x, x_hat)
    return (
        ReconstructionAccumulator(int(xt.shape[1]), device=xt.device).update(xt, xh).compute()["r2"]
    )


def explained_variance(x: object, x_hat: object) -> float:
    """`1 - Σ_j SS_res_j / Σ_j SS_tot_j` over all dims (SAELens convention), float64."""
    xt, xh = _check_pair(x, x_hat)
    acc = ReconstructionAccumulator(int(xt.shape[1]), device=xt.device).update(xt, xh)
    return acc.compute()["explained_variance"]


def l0(activations: object) -> float:
    """Mean number of non-zero entries per row (dense or sparse activations)."""
    z = check_activations(activations)
    nnz, _ = _latent_stats(z)
    return nnz / int(z.shape[0])


def dead_fraction(activations: object) -> float:
    """Fraction of latents (columns) with no positive entry (dense or sparse activations)."""
    z = check_activations(activations)
    _, fired = _latent_stats(z)
    return float((~fired).sum()) / int(z.shape[1])
