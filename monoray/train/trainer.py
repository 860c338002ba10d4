"""`train_sae`: the one training loop, shared by `monoray train`, Tune trials and Train workers.

Per epoch: shuffle with a generator seeded by (seed, epoch), take Adam steps
with grad-norm clipping around the SAE's `before/after_optimizer_step` hooks,
evaluate the val split in one pass, checkpoint, then call `on_epoch`. Every
random choice of epoch e derives from (seed, e), so resuming from the
checkpoint of epoch e reproduces the uninterrupted run exactly (on CPU).
No Ray imports here: reporting to Tune is the caller's `on_epoch`.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monoray.data import DataSource, FeatureSplits
from monoray.data.types import count_zero_rows
from monoray.data.validate import check_dim
from monoray.errors import InputError
from monoray.runs.checkpoint import CHECKPOINTS, Checkpoint, load_checkpoint, save_checkpoint
from monoray.runs.device import resolve_device
from monoray.runs.outcome import DivergedError, write_outputs
from monoray.runs.seeding import epoch_seed
from monoray.sae import build_sae, drop_unused
from monoray.sae.collective import Collective
from monoray.train.artifact import write_run_sae
from monoray.train.config import TrainConfig
from monoray.train.distributed import check_shards
from monoray.train.evaluate import (
    EvalResult,
    NonFiniteOutputError,
    as_tensor,
    evaluate,
    normalize_inputs,
)
from monoray.train.schedule import Schedule, length_dependent

log = logging.getLogger(__name__)

OnEpoch = Callable[[int, dict[str, Any], Path | None], None]
"""`on_epoch(epoch, metrics, checkpoint_dir)`, called after each epoch's checkpoint is written
(checkpoint_dir is None on ranks other than 0)."""

RESUME_MAY_DIFFER = ("epochs", "device", "eval_batch_size")
"""Config keys a resumed run may change (nothing else may differ from the checkpoint's)."""
BEFORE_KEY_EXISTED = {"recon_loss": "mse"}
"""What a checkpoint written before a key existed was trained with, where that differs from the
key's default today (every architecture trained on plain MSE before `recon_loss`)."""
ON_DEVICE_BYTES = 1 << 30
"""Train splits held in memory and smaller than this are copied to the device once."""


def _blew_up(sae: torch.nn.Module, x: torch.Tensor) -> bool:
    """Non-finite parameters or pre-activations: the inputs were validated on load."""
    with torch.no_grad():
        params = all(bool(torch.isfinite(p).all()) for p in sae.parameters())
        return not (params and bool(torch.isfinite(sae._pre(x)).all()))


class _Batches:
    """Gathers shuffled training batches as float32 tensors on the device."""

    def __init__(self, features: Any, device: torch.device) -> None:
        self.n = int(features.shape[0])
        self.device = device
        self._host = features
        self._on_device: torch.Tensor | None = None
        in_memory = isinstance(features, np.ndarray) and not isinstance(features, np.memmap)
        if in_memory and features.nbytes <= ON_DEVICE_BYTES:
            self._on_device = as_tensor(np.ascontiguousarray(features, np.float32)).to(device)

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        idx = torch.sort(idx).values  # a batch is a set; sorted rows read memory maps in order
        if self._on_device is not None:
            return self._on_device[idx.to(self.device)]
        rows = as_tensor(self._host[idx.numpy()], np.float32)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)


class _Progress:
    """A rich progress bar on stderr (rich is a declared dependency; nothing per step but a
    counter increment, drawn by rich's refresh thread)."""

    def __init__(self, total: int, done: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=Console(stderr=True),
        )
        self._task = self._bar.add_task("train", total=total, completed=done, status="")
        self._bar.start()

    def step(self) -> None:
        self._bar.advance(self._task)

    def status(self, text: str) -> None:
        self._bar.update(self._task, status=text)

    def close(self) -> None:
        self._bar.stop()


def _progress_bar(total: int, done: int, enabled: bool | None) -> _Progress | None:
    show = sys.stderr.isatty() if enabled is None else enabled
    return _Progress(total, done) if show else None


def _check_resume(ckpt: Checkpoint, cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    # Keys added since: their defaults, unless the old behaviour differs from them.
    then = TrainConfig.from_dict(drop_unused({**BEFORE_KEY_EXISTED, **ckpt.config})).to_dict()
    may_differ = set(RESUME_MAY_DIFFER) - ({"epochs"} if length_dependent(cfg) else set())
    for key in sorted(set(now) | set(then)):
        if key in may_differ:
            continue
        if now.get(key) != then.get(key):
            raise InputError(
                f"{ckpt.path}/: cannot resume: the checkpoint has {key}={then.get(key)!r}, "
                f"this run {key}={now.get(key)!r}"
            )


def _not_rank0(*_: Any, **__: Any) -> None:
    """Checkpoints are rank 0's: other ranks write nothing."""


def train_sae(
    cfg: TrainConfig,
    splits: FeatureSplits,
    *,
    out_dir: str | Path,
    resume: bool = False,
    resume_from: str | Path | None = None,
    on_epoch: OnEpoch | None = None,
    progress: bool | None = None,
    keep_checkpoints: int = 2,
    collective: Collective | None = None,
) -> dict[str, float]:
    """Train an SAE on `splits.train`, evaluating `splits.val` after every epoch.

    Writes `out_dir/checkpoints/epoch-NNNN/` every epoch (the last
    `keep_checkpoints` are kept), and at the end `out_dir/metrics.json`,
    `out_dir/monoscore_profile.png` and the SAE artifact `out_dir/sae/`. `resume=True` continues from the newest
    intact checkpoint in `out_dir` (a fresh start when there is none);
    `resume_from` names a checkpoint directory to continue from instead (e.g.
    one Ray Tune restored). `progress`: None shows a bar only when stderr is a
    terminal. Returns the final epoch's metrics: train loss terms
    (`train_*`) and val metrics (`r2`, `explained_variance`, `l0`,
    `dead_fraction`, `monoscore_*`, `purity_*`). Raises `DivergedError` if
    the loss becomes NaN/inf, `InputError` for bad inputs.

    `collective` (`monoray.sae.collective.Ranks`) runs this as one of W
    torch.distributed ranks: each global batch is the one a single process
    draws, split by rank, and the result equals the single-process run (see
    `monoray.train.distributed`); rank 0 alone writes checkpoints and outputs,
    other ranks get `on_epoch(..., None)`.
    """
    out_dir = Path(out_dir)
    where = splits.source.features if splits.source is not None else "features"
    check_dim(splits.train.dim, cfg.sae.d_in, where=where)
    check_dim(splits.val.dim, cfg.sae.d_in, where=where)
    if len(splits.train) == 0 or len(splits.val) == 0:
        raise InputError(
            f"{where}: the {'train' if len(splits.train) == 0 else 'val'} split is empty"
        )
    device = resolve_device(cfg.device)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)
    sae = build_sae(cfg.sae).to(device)
    if collective is not None:
        sae.collective = collective
    coll = sae.collective
    main = coll.rank == 0
    # One fused kernel for all parameters (paper-size CPU step: monoray/sae/PERFORMANCE.md).
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=cfg.adam_eps, fused=fused)
    start, step, history = 0, 0, []
    last_eval: EvalResult | None = None
    ckpt = None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        if ckpt is None:
            raise InputError(f"{resume_from}: no checkpoint to resume from")
    elif resume:
        ckpt = load_checkpoint(out_dir / CHECKPOINTS)
        if ckpt is None:
            log.info("no checkpoint in %s; starting from scratch", out_dir)
    data_record = splits.source.to_dict() if splits.source is not None else None
    zero_rows = splits.zero_rows or count_zero_rows(splits.train, splits.val)
    if ckpt is not None:
        _check_resume(ckpt, cfg)
        ckpt_data = None if ckpt.data is None else DataSource.from_dict(ckpt.data).to_dict()
        if ckpt_data is not None and data_record is not None and ckpt_data != data_record:
            raise InputError(
                f"{ckpt.path}/: cannot resume: the checkpoint was trained on "
                f"{ckpt.data['features']}, this run uses {data_record['features']} "
                "(or a different split)"
            )
        sae.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        start, step, history = ckpt.epoch, ckpt.step, list(ckpt.history)
        log.info("resuming from %s (epoch %d, step %d)", ckpt.path, start, step)

    batches = _Batches(splits.train.features, device)
    n, bs = batches.n, cfg.batch_size
    if coll.size > 1:
        check_shards(n, bs, coll.size, where=where)
    steps_per_epoch = math.ceil(n / bs)
    schedule = Schedule.of(cfg, steps_per_epoch)
    bar = _progress_bar(
        cfg.epochs * steps_per_epoch, start * steps_per_epoch, progress if main else False
    )
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
            torch.manual_seed(epoch_seed(cfg.seed, epoch))  # in-model sampling (e.g. resampling)
            perm = torch.randperm(n, generator=generator)
            sae.train()
            sums: dict[str, torch.Tensor] = {}
            first_bad = torch.full((), -1, dtype=torch.long, device=device)
            for b in range(steps_per_epoch):
                x_raw = batches.get(coll.shard(perm[b * bs : (b + 1) * bs]))
                x = normalize_inputs(x_raw, cfg.normalize)
                try:
                    out = sae.forward_train(x, x_raw)
                except InputError as err:  # MonoLoss' input check saw the model blow up
                    if not _blew_up(sae, x):
                        raise
                    raise DivergedError(
                        f"latents became NaN/inf at epoch {epoch}, step {step + 1} "
                        f"(arch {cfg.sae.arch}, lr {cfg.lr:g}): {err}"
                    ) from None
                terms = (
                    schedule.scale_loss(out.loss, step) if schedule.coefs_scheduled else out.loss
                )
                loss = terms.loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                coll.sum_grads(sae.parameters())
                sae.before_optimizer_step()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
                if schedule.lr_scheduled:
                    for group in optimizer.param_groups:
                        group["lr"] = schedule.lr_at(step)
                optimizer.step()
                sae.after_optimizer_step(optimizer)
                step += 1
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                for key, value in terms.metrics().items():
                    v = torch.as_tensor(value).detach().to(device=device, dtype=torch.float64)
                    sums[key] = sums[key] + v if key in sums else v
                if bar is not None:
                    bar.step()
            # One host sync per epoch: the summed loss terms and the first bad step together.
            keys = list(sums)
            first_bad = coll.all_reduce(torch.where(first_bad < 0, step + 1, first_bad), "min")
            first_bad = torch.where(first_bad > step, -1, first_bad)
            totals = coll.all_reduce(torch.stack([sums[k] for k in keys]))
            packed = torch.cat([totals, first_bad.to(torch.float64)[None]]).cpu()
            bad_step = int(packed[-1])
            if bad_step >= 0:
                raise DivergedError(
                    f"loss became NaN/inf at epoch {epoch}, step {bad_step} "
                    f"(arch {cfg.sae.arch}, lr {cfg.lr:g})"
                )
            train = {
                f"train_{k}": v / steps_per_epoch
                for k, v in zip(keys, packed[:-1].tolist(), strict=True)
            }
            try:
                last_eval = evaluate(
                    sae,
                    splits.val,
                    batch_size=cfg.eval_batch_size,
                    device=device,
                    normalize=cfg.normalize,
                    collective=coll,
                )
            except NonFiniteOutputError as err:
                raise DivergedError(
                    f"evaluation after epoch {epoch} (step {step}): {err}"
                ) from None
            except InputError as err:  # never a divergence
                raise InputError(f"{where}: evaluation after epoch {epoch}: {err}") from None
            metrics = {**train, **last_eval.metrics, **zero_rows.metrics()}
            metrics |= {"epoch": float(epoch), "step": float(step)}
            history.append(metrics)
            ckpt_dir = (save_checkpoint if main else _not_rank0)(
                out_dir / CHECKPOINTS,
                epoch=epoch,
                step=step,
                config=cfg.to_dict(),
                model_state=sae.state_dict(),
                optimizer_state=optimizer.state_dict(),
                history=history,
                eval_tensors=last_eval.tensors(),
                data=data_record,
                keep=keep_checkpoints,
            )
            if bar is not None:
                bar.status(
                    f"ep {epoch} loss {train.get('train_loss', float('nan')):.3g} "
                    f"r2 {metrics['r2']:.3f} ms {metrics['monoscore_mean']:.3f}"
                )
            if on_epoch is not None:
                on_epoch(
                    epoch, {**metrics, "monoscore_profile": last_eval.profile().tolist()}, ckpt_dir
                )
    finally:
        if bar is not None:
            bar.close()

    if not history:
        raise InputError(f"{out_dir}/: nothing to train (epochs={cfg.epochs})")
    final = history[-1]
    if not main:
        return final
    if last_eval is None and ckpt is not None and "monoscore" in ckpt.eval_tensors:
        last_eval = EvalResult.from_tensors(final, ckpt.eval_tensors)
    write_outputs(out_dir, final, None if last_eval is None else last_eval.monoscore)
    write_run_sae(out_dir, sae, cfg, splits.header, epoch=int(final["epoch"]), data=data_record)
    return final
