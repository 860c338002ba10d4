"""`monoray inspect`: top / middle / bottom activating val samples of chosen latents.

Loads a run's SAE artifact (`sae/`; a run made before it: its checkpoint) and the
data source recorded in it, runs one evaluation pass over the val split, and for each chosen latent shows its
top-n, middle-n and bottom-n positively activating samples, ordered by
activation high to low (the paper's Fig. 3). Data with images (digits)
renders a PNG grid; otherwise the sample ids and labels are printed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monoray.errors import InputError

if TYPE_CHECKING:
    from monoray.data import FeatureSplit
    from monoray.plots import LatentPanel
    from monoray.sae.io import SAEArtifact

GROUPS = ("top", "middle", "bottom")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show top/middle/bottom activating samples of chosen latents",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="run directory, its sae/ or a checkpoint dir"
    )
    parser.add_argument("--latents", type=int, nargs="+", default=None, help="latent indices")
    parser.add_argument(
        "--top-ranked",
        type=int,
        default=None,
        metavar="N",
        help="the N latents with the highest val MonoScore (default: 5 across the ranking)",
    )
    parser.add_argument("--per-group", type=int, default=5, metavar="N", help="samples per group")
    parser.add_argument(
        "--out", type=Path, default=None, metavar="PNG", help="default DIR/inspect.png"
    )
    parser.add_argument("--features", default=None, help="data to inspect (default: the run's)")
    parser.add_argument("--val-features", default=None, help="with --features: its val split")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.set_defaults(run=run)


def spread_latents(
    monoscore: np.ndarray, fire_count: np.ndarray, n: int = 5, min_active: int = 15
) -> list[int]:
    """`n` latents spread evenly over the MonoScore ranking (best first).

    Latents active on at least `min_active` samples (enough to fill the three
    groups) are preferred; with too few of those, any latent that fires.
    """
    ranked = np.argsort(-monoscore, kind="stable")
    order = [int(i) for i in ranked if fire_count[i] >= min_active]
    if len(order) < n:
        order = [int(i) for i in ranked if fire_count[i] > 0]
    if len(order) <= n:
        return order
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))
    return [order[p] for p in picks]


def pick_groups(acts: np.ndarray, per: int) -> dict[str, np.ndarray]:
    """Row indices of the top / middle / bottom `per` positive activations (high to low).

    With fewer than `3 * per` positives the sorted positives are cut into
    three consecutive parts instead, so no sample appears twice.
    """
    pos = np.flatnonzero(acts > 0)
    ranked = pos[np.argsort(-acts[pos], kind="stable")]
    m = ranked.size
    if m <= 3 * per:
        parts = np.array_split(ranked, 3)
        return dict(zip(GROUPS, parts, strict=True))
    mid = m // 2 - per // 2
    return {"top": ranked[:per], "middle": ranked[mid : mid + per], "bottom": ranked[-per:]}


def run(args: argparse.Namespace) -> int:
    from monoray.data import DataSource, load_features, load_source
    from monoray.plots import plot_activation_grid
    from monoray.train.artifact import open_run_sae

    if not args.dir.exists():
        raise InputError(f"{args.dir}: no such directory")
    if args.per_group < 1:
        raise InputError(f"--per-group must be >= 1, got {args.per_group}")
    art = open_run_sae(args.dir)
    if args.features is not None:
        splits = load_features(args.features, val_source=args.val_features, d_in=art.sae.cfg.d_in)
    elif art.data is not None:
        splits = load_source(DataSource.from_dict(art.data))
    else:
        raise InputError(f"{args.dir}: the SAE records no data source; pass --features")
    panels, m = latent_panels(
        art,
        splits.val,
        latents=args.latents,
        top_ranked=args.top_ranked,
        per_group=args.per_group,
        device=args.device,
        where=str(args.dir),
    )
    print(panels_text(panels))
    val = splits.val
    purity = f"purity_binary {m['purity_binary']:.4f}  " if val.labels is not None else ""
    print(
        f"val: r2 {m['r2']:.4f}  monoscore_mean {m['monoscore_mean']:.4f}  "
        f"{purity}({len(val)} samples, epoch {art.epoch})"
    )
    if val.images is not None:
        out = args.out or (args.dir / "inspect.png")
        plot_activation_grid(panels, out, title=grid_title(art))
        print(f"wrote {out}")
    elif args.out is not None:
        raise InputError(
            f"{args.out}: this data has no images to render; the table above is the output"
        )
    return 0


def grid_title(art: SAEArtifact) -> str:
    cfg = art.sae.cfg
    return f"{cfg.arch}  λ={cfg.mono_coef:g}  epoch {art.epoch}  (val, positive activations)"


def latent_panels(
    art: SAEArtifact,
    val: FeatureSplit,
    *,
    latents: Sequence[int] | None = None,
    top_ranked: int | None = None,
    per_group: int = 5,
    device: str = "auto",
    where: str = "",
) -> tuple[list[LatentPanel], dict[str, float]]:
    """A panel per chosen latent (`latents`, else the `top_ranked` best by val MonoScore,
    else 5 spread over the ranking) and the val metrics of the same pass."""
    from monoray.plots import LatentPanel, Sample
    from monoray.runs.device import resolve_device
    from monoray.train.evaluate import evaluate

    dev = resolve_device(device)
    sae = art.sae.to(dev)
    d_sae = sae.cfg.d_sae
    normalize = art.normalisation.applied

    if latents is not None:
        latents = list(dict.fromkeys(latents))
        bad = [i for i in latents if not 0 <= i < d_sae]
        if bad:
            raise InputError(f"--latents: {bad[0]} is out of range (d_sae is {d_sae})")
    else:
        first = evaluate(sae, val, device=dev, normalize=normalize)
        ms = np.asarray(first.monoscore, dtype=np.float64)
        fc = np.asarray(first.fire_count)
        if top_ranked is not None:
            if top_ranked < 1:
                raise InputError(f"--top-ranked must be >= 1, got {top_ranked}")
            latents = [int(i) for i in np.argsort(-ms, kind="stable")[:top_ranked]]
        else:
            latents = spread_latents(ms, fc, min_active=3 * per_group)
        if not latents:
            raise InputError(f"{where}: no latent fires on the val split")

    result = evaluate(sae, val, device=dev, normalize=normalize, collect=latents)
    assert result.collected is not None
    rank_of = np.empty(d_sae, dtype=np.int64)
    rank_of[np.argsort(-result.monoscore, kind="stable")] = np.arange(1, d_sae + 1)
    panels = []
    for j, latent in enumerate(latents):
        acts = result.collected[:, j]
        groups = pick_groups(acts, per_group)
        panels.append(
            LatentPanel(
                latent=latent,
                rank=int(rank_of[latent]),
                monoscore=float(result.monoscore[latent]),
                n_active=int((acts > 0).sum()),
                groups={
                    g: [
                        Sample(
                            id=int(val.ids[r]),
                            activation=float(acts[r]),
                            label=None if val.labels is None else int(val.labels[r]),
                            image=None if val.images is None else val.images[r],
                        )
                        for r in rows
                    ]
                    for g, rows in groups.items()
                },
            )
        )
    return panels, dict(result.metrics)


def panels_text(panels: Sequence[LatentPanel]) -> str:
    """Plain-text table: latent, rank, MonoScore, then id:label (activation) per group."""
    lines = []
    for p in panels:
        lines.append(
            f"latent {p.latent}  rank {p.rank}  monoscore {p.monoscore:.4f}  active on {p.n_active}"
        )
        for g in GROUPS:
            cells = [
                f"{s.id}" + ("" if s.label is None else f":y={s.label}") + f" ({s.activation:.3f})"
                for s in p.groups.get(g, ())
            ]
            lines.append(f"  {g:<6}  " + ("  ".join(cells) if cells else "-"))
    return "\n".join(lines)
