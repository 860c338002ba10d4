"""`evaluate`: every validation metric of an SAE in ONE pass over a split.

Per batch: encode (batch independent, no state change), decode, then feed the
streaming accumulators: reconstruction (R², explained variance), sparsity (L0,
firing counts), class purity (when the split has labels) and the exact
one-pass MonoScore (`MonoScoreAccumulator`, embeddings = the raw features).
Nothing here writes to the SAE: no `.train()/.eval()` flips, no buffers
touched, everything under `torch.no_grad()`.

Reconstruction metrics compare the SAE's input (after `normalize`) with its
output, both in the same space.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from monoray.data import FeatureSplit
from monoray.metrics import (
    ClassPurityAccumulator,
    MonoScoreAccumulator,
    ReconstructionAccumulator,
    monoscore_summary,
)
from monoray.metrics._checks import raise_nonfinite
from monoray.sae import SparseAutoencoder, SparseLatents
from monoray.sae.collective import LOCAL, Collective
from monoray.sae.inputs import normalize_inputs

VAL_KEYS = (
    "r2",
    "explained_variance",
    "l0",
    "dead_fraction",
    "monoscore_mean",
    "monoscore_mean_active",
    "monoscore_median",
    "purity_binary",
    "purity_weighted",
)
"""Validation metrics every epoch reports (purity is NaN when the split has no labels)."""


class NonFiniteOutputError(ArithmeticError):
    """The SAE's latents or reconstruction hold NaN/inf: the model diverged, not the data."""


def as_tensor(array: np.ndarray, dtype: Any = None) -> Tensor:
    """A CPU tensor sharing `array`'s memory (read-only arrays too, e.g. from `ray.get`;
    callers never write to it)."""
    array = np.asarray(array, dtype=dtype)
    if not array.flags.writeable:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
            return torch.from_numpy(array)
    return torch.from_numpy(array)


@dataclass(frozen=True, slots=True)
class EvalResult:
    """Outcome of one evaluation pass."""

    metrics: dict[str, float]
    """Flat scalars: `VAL_KEYS` plus `monoscore_median_active`, `monoscore_active_fraction`,
    `val_samples`."""
    monoscore: np.ndarray
    """[d_sae] float64 exact MonoScore of each latent on the split (0 where undefined)."""
    fire_count: np.ndarray
    """[d_sae] int64 number of samples on which each latent is > 0."""
    collected: np.ndarray | None = field(default=None)
    """[N, len(collect)] float32 activations of the latents asked for, in split order."""

    def profile(self) -> np.ndarray:
        """MonoScores sorted high to low (paper Fig. 26-28)."""
        return np.sort(self.monoscore)[::-1].copy()

    def tensors(self) -> dict[str, Tensor]:
        """Per-latent arrays for `eval.safetensors` in a checkpoint."""
        return {
            "monoscore": torch.from_numpy(self.monoscore.copy()),
            "fire_count": torch.from_numpy(self.fire_count.copy()),
        }

    @classmethod
    def from_tensors(cls, metrics: dict[str, float], tensors: dict[str, Tensor]) -> EvalResult:
        """Rebuild from a checkpoint's `eval.safetensors` and its metrics."""
        return cls(
            metrics=dict(metrics),
            monoscore=tensors["monoscore"].numpy().astype(np.float64),
            fire_count=tensors["fire_count"].numpy().astype(np.int64),
        )


def _as_sparse(latents: Any) -> SparseLatents:
    if isinstance(latents, SparseLatents):
        return latents
    return SparseLatents.from_dense(latents)


@torch.no_grad()
def evaluate(
    sae: SparseAutoencoder,
    split: FeatureSplit,
    *,
    batch_size: int = 4096,
    device: torch.device | str | None = None,
    normalize: str = "unit",
    collect: Sequence[int] | None = None,
    collective: Collective = LOCAL,
) -> EvalResult:
    """All validation metrics of `sae` on `split` in one pass (see `VAL_KEYS`).

    `device` defaults to the SAE's; `collect` names latents whose activations
    on every sample are returned in `EvalResult.collected` (for `inspect`).
    The SAE is only read: `encode` and `decode`, no mode switch. Raises
    `NonFiniteOutputError` when the SAE's output is not finite (a divergence)
    and `InputError` for bad inputs. With a `collective` of W ranks each rank
    evaluates a contiguous shard and every accumulator is merged over the ranks
    (the same result on every rank).
    """
    device = torch.device(device) if device is not None else next(sae.parameters()).device
    n, d = split.features.shape
    m = sae.cfg.d_sae
    mono = MonoScoreAccumulator(d, m, device=device)
    recon_acc = ReconstructionAccumulator(d, m, device=device)
    labels = split.labels
    purity = None
    if labels is not None and len(labels):  # classes of the whole split, on every rank
        purity = ClassPurityAccumulator(m, int(labels.max()) + 1, device=device)
    fire = torch.zeros(m, dtype=torch.int64, device=device)
    chosen = None
    if collect is not None:
        chosen = torch.full((m,), -1, dtype=torch.int64, device=device)
        chosen[torch.as_tensor(list(collect), dtype=torch.int64, device=device)] = torch.arange(
            len(collect), device=device
        )
        collected = np.zeros((n, len(collect)), dtype=np.float32)
    lo, hi = collective.val_rows(n)
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        x_raw = as_tensor(split.features[start:stop], np.float32)
        x_raw = x_raw.to(device)
        if not bool(torch.isfinite(x_raw).all()):  # bad data, not a divergence
            raise_nonfinite(x_raw, "val features", row_offset=start)
        x = normalize_inputs(x_raw, normalize)
        lat = _as_sparse(sae.encode(x))
        recon = sae.decode(lat)
        if not bool(torch.isfinite(lat.values).all() & torch.isfinite(recon).all()):
            raise NonFiniteOutputError(
                f"the SAE's output holds NaN/inf on val rows {start}-{stop - 1}"
            )
        csr = lat.to_csr()
        recon_acc.update(x, recon, csr)
        mono.update(x_raw, csr)
        if purity is not None:
            purity.update(csr, as_tensor(labels[start:stop]))
        pos = lat.values > 0
        cols = lat.col_indices[pos]
        fire += torch.bincount(cols, minlength=m)
        if chosen is not None:
            rows = lat.row_indices()[pos]
            j = chosen[cols]
            keep = j >= 0
            block = torch.zeros(stop - start, len(collect), dtype=torch.float32, device=device)
            block[rows[keep], j[keep]] = lat.values[pos][keep].float()
            collected[start:stop] = block.cpu().numpy()

    if collective.size > 1:
        mono = collective.merged(mono)
        recon_acc = collective.merged(recon_acc)
        purity = None if purity is None else collective.merged(purity)
        fire = collective.all_reduce(fire)
    result = mono.result()
    summary = monoscore_summary(result.scores, result.active)
    recon_metrics = recon_acc.compute()
    if purity is not None:
        p_bin, p_wtd = purity.compute()
    else:
        p_bin = p_wtd = float("nan")
    fire_np = fire.cpu().numpy()
    metrics = {
        "r2": recon_metrics["r2"],
        "explained_variance": recon_metrics["explained_variance"],
        "l0": recon_metrics["l0"],
        "dead_fraction": recon_metrics["dead_fraction"],
        "fvu": recon_metrics["fvu"],
        "mse": recon_metrics["mse"],
        **summary.as_dict(),
        "purity_binary": p_bin,
        "purity_weighted": p_wtd,
        "val_samples": float(n),
    }
    return EvalResult(
        metrics=metrics,
        monoscore=result.scores.cpu().numpy().astype(np.float64),
        fire_count=fire_np.astype(np.int64),
        collected=collected if collect is not None else None,
    )
