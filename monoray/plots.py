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


def _save(fig: Figure, path: str | Path | None, dpi: int = 120) -> Figure:
    FigureCanvasAgg(fig)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(str(path), dpi=dpi, bbox_inches="tight")
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
    fig.tight_layout()
    return _save(fig, path)


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
    """Paper Fig. 3 layout: per latent, top-n | middle-n | bottom-n activating images."""
    groups = ("top", "middle", "bottom")
    per = max((len(p.groups.get(g, ())) for p in panels for g in groups), default=1) or 1
    cols = 3 * per + 2  # two narrow spacer columns between the groups
    ratios = ([1.0] * per + [0.25]) * 2 + [1.0] * per
    fig = Figure(figsize=(0.75 * cols + 1.6, 1.05 * len(panels) + 0.7))
    grid = fig.add_gridspec(
        max(len(panels), 1), cols, width_ratios=ratios, wspace=0.08, hspace=0.55
    )
    for r, panel in enumerate(panels):
        for gi, g in enumerate(groups):
            samples = list(panel.groups.get(g, ()))
            for j in range(per):
                ax = fig.add_subplot(grid[r, gi * (per + 1) + j])
                ax.set_xticks([])
                ax.set_yticks([])
                if gi == 0 and j == 0:
                    ax.set_ylabel(
                        f"latent {panel.latent}\nrank {panel.rank}\n"
                        f"MS {panel.monoscore:.3f}\nn+ {panel.n_active}",
                        fontsize=7,
                        rotation=0,
                        ha="right",
                        va="center",
                    )
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if r == 0 and j == per // 2:
                    ax.set_title(f"{g}\n", fontsize=9, fontweight="bold")
                if j >= len(samples):
                    continue
                s = samples[j]
                if s.image is not None:
                    ax.imshow(
                        s.image, cmap=cmap if s.image.ndim == 2 else None, interpolation="nearest"
                    )
                lab = "" if s.label is None else f"y={s.label} "
                ax.set_xlabel(f"{lab}{s.activation:.2f}", fontsize=6.5, labelpad=1)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
