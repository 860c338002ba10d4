"""Figures: the MonoScore profile and the top / middle / bottom activation grid.

Built on `matplotlib.figure.Figure` with the Agg canvas, never pyplot, so
nothing touches a global backend or a display; every function returns the
Figure (MLflow's `log_figure` takes it) and saves a PNG when given a path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path | None, dpi: int = 120, *, tight: bool = True) -> Figure:
    """`tight`: crop to the drawn artists (one more draw; a figure with fixed margins
    needs none)."""
    FigureCanvasAgg(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=dpi, bbox_inches="tight" if tight else None)
    return fig


def plot_monoscore_profile(
    profiles: Mapping[str, np.ndarray] | np.ndarray,
    path: str | Path | None = None,
    *,
    title: str = "MonoScore profile (val)",
) -> Figure:
    """Per-latent MonoScore sorted high to low against latent rank (paper Fig. 26-28).

    `profiles` is one array [d_sae] or several by label (e.g. λ=0 vs λ>0). Each
    curve is sorted descending; its mean is drawn as a dashed line.
    """
    if not isinstance(profiles, Mapping):
        profiles = {"MonoScore": np.asarray(profiles)}
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    for i, (label, values) in enumerate(profiles.items()):
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        color = f"C{i}"
        ax.plot(
            np.arange(1, v.size + 1), v, color=color, lw=1.5, label=f"{label} (mean {v.mean():.3f})"
        )
        ax.axhline(v.mean(), color=color, lw=0.8, ls="--")
    ax.set_xlabel("latent rank")
    ax.set_ylabel("MonoScore")
    ax.set_title(title)
    ax.set_xlim(1, max(max(np.asarray(v).size for v in profiles.values()), 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    # Fixed margins, not tight_layout: every trial draws one, and layout passes cost a draw each.
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.91)
    return _save(fig, path, tight=False)


@dataclass(frozen=True, slots=True)
class Sample:
    """One activating sample shown in the grid."""

    id: int
    """Sample id (stable across runs)."""
    activation: float
    """The latent's activation on it."""
    label: int | None = None
    """Class label, if the data has labels."""
    image: np.ndarray | None = None
    """[H, W] or [H, W, C] image, if the data has images."""


@dataclass(frozen=True, slots=True)
class LatentPanel:
    """One grid row: a latent's top, middle and bottom positively activating samples."""

    latent: int
    """Latent index."""
    rank: int
    """1-based rank of the latent by val MonoScore (1 = most monosemantic)."""
    monoscore: float
    """The latent's val MonoScore."""
    n_active: int
    """Number of val samples on which the latent is positive."""
    groups: Mapping[str, Sequence[Sample]]
    """"top", "middle", "bottom" -> samples, each ordered by activation high to low."""


def plot_activation_grid(
    panels: Sequence[LatentPanel],
    path: str | Path | None = None,
    *,
    title: str = "",
    cmap: str = "gray_r",
) -> Figure:
    """Paper Fig. 3 layout: per latent, top-n | middle-n | bottom-n activating images.

    Each latent's row is ONE image (its samples side by side, each scaled to its own
    range as `imshow` would, blank where a sample has no image) with one axes, not one
    axes per sample: a front's grids are drawn for every front SAE of every sweep.
    """
    groups = ("top", "middle", "bottom")
    per = max((len(p.groups.get(g, ())) for p in panels for g in groups), default=1) or 1
    shape = next(
        (
            s.image.shape
            for p in panels
            for g in groups
            for s in p.groups.get(g, ())
            if s.image is not None
        ),
        None,
    )
    cols = 3 * per + 2  # as many tile widths as the samples, two narrow spacers between groups
    fig = Figure(figsize=(0.75 * cols + 1.6, 1.05 * len(panels) + 0.7))
    rows = max(len(panels), 1)
    for r, panel in enumerate(panels):
        ax = fig.add_subplot(rows, 1, r + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(
            f"latent {panel.latent}\nrank {panel.rank}\n"
            f"MS {panel.monoscore:.3f}\nn+ {panel.n_active}",
            fontsize=7,
            rotation=0,
            ha="right",
            va="center",
        )
        h, w = _tile(shape)
        gap = max(1, round(0.25 * w))
        centers, labels = [], []
        for gi, g in enumerate(groups):
            samples = list(panel.groups.get(g, ()))
            x0 = gi * (per * w + gap)
            if r == 0:
                ax.text(
                    x0 + per * w / 2,
                    -0.12 * h,
                    g,
                    ha="center",
                    va="bottom",
                    fontsize=9,
                    fontweight="bold",
                )
            for j, smp in enumerate(samples[:per]):
                lab = "" if smp.label is None else f"y={smp.label} "
                centers.append(x0 + j * w + (shape[1] if shape else 1) / 2)
                labels.append(f"{lab}{smp.activation:.2f}")
        if shape is not None:
            ax.imshow(
                _row_image(panel, groups, per, shape, gap),
                cmap=cmap,
                interpolation="nearest",
                vmin=0.0,
                vmax=1.0,
                aspect="equal",
            )
        ax.set_xlim(-0.5, 3 * per * w + 2 * gap - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        for x, text in zip(centers, labels, strict=True):
            ax.text(x, h + 0.05 * h, text, ha="center", va="top", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(hspace=0.55)
    return _save(fig, path)


def _tile(shape: tuple[int, ...] | None) -> tuple[int, int]:
    """(height, width) of one sample's cell: its image and a thin margin right of it."""
    if shape is None:
        return 1, 1
    return shape[0], shape[1] + max(1, round(0.08 * shape[1]))


def _row_image(
    panel: LatentPanel, groups: Sequence[str], per: int, shape: tuple[int, ...], gap: int
) -> np.ndarray:
    """One latent's samples as one [H, W_total(, C)] image in [0, 1]; NaN (drawn as the
    background) where there is no sample."""
    h, w = _tile(shape)
    out = np.full((h, 3 * per * w + 2 * gap, *shape[2:]), np.nan)
    for gi, g in enumerate(groups):
        for j, smp in enumerate(list(panel.groups.get(g, ()))[:per]):
            if smp.image is None or smp.image.shape != shape:
                continue
            img = np.asarray(smp.image, dtype=np.float64)
            if img.ndim == 2 or img.max() > 1.0:  # imshow's own scaling of a 2-D image
                lo, hi = np.nanmin(img), np.nanmax(img)
                img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            x0 = gi * (per * w + gap) + j * w
            out[:, x0 : x0 + shape[1]] = img
    if out.ndim == 3:  # RGB: the background is white, not NaN
        out = np.where(np.isnan(out), 1.0, out)
    return out
