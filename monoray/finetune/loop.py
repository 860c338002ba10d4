"""`train_finetune`: the one finetuning loop, for `monoray finetune`, Tune trials and Train workers.

One process or W torch.distributed ranks (gloo on CPU, NCCL on GPU) run the
same code. Per epoch: a permutation seeded by (seed, epoch) cut into global
batches of `batch_size`; rank r takes the r-th contiguous slice of each global
batch. The loss backpropagated is

    CE_sum_local · W / B_global  +  λ · mono_term_for_ddp(L_mono_global, W)

so that after DDP averages the gradients over W ranks they are the gradients
of `CE_mean(global batch) + λ · L_mono(global batch)`: the same numbers as one
process on the whole batch (spec §3; the backbone is frozen in eval mode, so
nothing else depends on how the batch is split). A final partial batch with
fewer images than workers is skipped.

After every epoch: validation on the val split, sharded over the ranks, with
top-1/top-5 counts, `MonoScoreAccumulator` and `ClassPurityAccumulator` state
summed over ranks (exact dataset MonoScore / purity of the mono layer), then
rank 0 writes a checkpoint (safetensors + JSON: the trainable parameters,
i.e. LoRA, mono layer and classifier, and the SGD state; the frozen backbone
is rebuilt from its weights) and every rank calls `on_epoch`. No Ray imports
here: reporting is the caller's `on_epoch`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from monoray.errors import InputError
from monoray.finetune.backbones import build_backbone
from monoray.finetune.config import FinetuneConfig
from monoray.finetune.data import FinetuneData, ImageDataset, build_transform, open_finetune_data
from monoray.finetune.model import FinetuneModel
from monoray.metrics import ClassPurityAccumulator, MonoScoreAccumulator, monoscore_summary
from monoray.metrics.distributed_loss import mono_loss_global, mono_term_for_ddp
from monoray.runs.checkpoint import CHECKPOINTS, Checkpoint, load_checkpoint, save_checkpoint
from monoray.runs.device import resolve_device
from monoray.runs.outcome import DivergedError, write_metrics
from monoray.runs.seeding import epoch_seed

log = logging.getLogger(__name__)

OnEpoch = Callable[[int, dict[str, Any], Path | None], None]
"""`on_epoch(epoch, metrics, checkpoint_dir)`; checkpoint_dir is None on ranks other than 0."""
RESUME_MAY_DIFFER = ("epochs", "device", "eval_batch_size", "loader_workers")
"""Config keys a resumed run may change."""


@dataclass(frozen=True, slots=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int

    @classmethod
    def current(cls) -> World:
        """Rank and size of the initialised torch.distributed group, else (0, 1)."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(0, 1)


def lr_at(cfg: FinetuneConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    total = max(cfg.epochs * steps_per_epoch - warm, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, total) / total))


def global_batches(n: int, batch_size: int, world: int, generator: torch.Generator) -> list[Tensor]:
    """The epoch's global batches of sample positions (a final batch smaller than `world` is dropped)."""
    perm = torch.randperm(n, generator=generator)
    batches = list(torch.split(perm, batch_size))
    return [b for b in batches if b.numel() >= world]


def local_rows(batch: Tensor, world: World) -> Tensor:
    """This rank's contiguous slice of a global batch (rank 0 first)."""
    return torch.tensor_split(batch, world.size)[world.rank]


@dataclass(frozen=True, slots=True)
class StepLoss:
    """The loss terms of one training step on one rank."""

    backward: Tensor
    """What this rank backpropagates: `CE_sum · W / B_global + λ · mono_term_for_ddp(mono, W)`."""
    ce_sum: Tensor
    """Cross entropy summed over this rank's rows."""
    mono: Tensor
    """MonoLoss of the global batch (the same on every rank; 0 when λ = 0)."""
    rows: int
    """This rank's rows."""

    def sums(self) -> Tensor:
        """float64 [ce_sum, mono, rows, non-finite flag], summed per epoch (one sync at its end)."""
        bad = ~torch.isfinite(self.ce_sum) | ~torch.isfinite(self.mono)
        parts = [self.ce_sum.detach(), self.mono.detach(), self.ce_sum.new_tensor(self.rows), bad]
        return torch.stack([t.to(torch.float64) for t in parts])


def step_loss(
    net: torch.nn.Module,
    x: Tensor,
    y: Tensor,
    emb: Tensor,
    cfg: FinetuneConfig,
    world: World,
    global_rows: int,
) -> StepLoss:
    """Forward this rank's rows of a global batch of `global_rows` images; the step's loss terms.

    After DDP averages the parameter gradients of `backward` over the W ranks
    they equal the gradients of `CE_mean + λ · L_mono` over the global batch.
    """
    out = net(x)
    ce_sum = F.cross_entropy(out.logits, y, reduction="sum")
    loss = ce_sum * (world.size / global_rows)
    mono = torch.zeros((), device=x.device)
    if cfg.mono_coef > 0:
        mono = mono_loss_global(emb, out.activations, eps=cfg.mono_eps)
        loss = loss + cfg.mono_coef * mono_term_for_ddp(mono, world.size)
    return StepLoss(loss, ce_sum, mono, int(y.numel()))


def _check_resume(ckpt: Checkpoint, cfg: FinetuneConfig) -> None:
    now = cfg.to_dict()
    for key in sorted(set(now) | set(ckpt.config)):
        if key not in RESUME_MAY_DIFFER and now.get(key) != ckpt.config.get(key):
            raise InputError(
                f"{ckpt.path}/: cannot resume: the checkpoint has {key}={ckpt.config.get(key)!r}, "
                f"this run {key}={now.get(key)!r}"
            )


def build_model(
    cfg: FinetuneConfig, n_classes: int
) -> tuple[FinetuneModel, tuple[float, ...], tuple[float, ...]]:
    """The model (same init on every rank: seeded by `cfg.seed`) and its input (mean, std)."""
    torch.manual_seed(cfg.seed)
    backbone = build_backbone(
        cfg.backbone,
        weights=cfg.weights,
        image_size=cfg.image_size,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
    )
    return FinetuneModel(backbone, n_classes, cfg.expansion), backbone.mean, backbone.std


def train_finetune(
    cfg: FinetuneConfig,
    *,
    out_dir: str | Path,
    data: FinetuneData | None = None,
    resume_from: str | Path | None = None,
    on_epoch: OnEpoch | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Finetune `cfg.backbone` on `cfg.images` (all ranks of an initialised process group take part).

    Writes `out_dir/checkpoints/epoch-NNNN/` every epoch (rank 0) and
    `out_dir/metrics.json` at the end. `resume_from` names a checkpoint (or a
    run directory) to continue from. `device` overrides `cfg.device` (Train
    workers pass their own GPU). Returns the last epoch's metrics: `accuracy`,
    `top5`, `monoscore_*`, `purity_*`, `train_loss`, `train_ce`, `train_mono`,
    `lr`, `epoch`, `step`. Raises `DivergedError` on a non-finite loss.
    """
    out_dir = Path(out_dir)
    world = World.current()
    device = device or resolve_device(cfg.device)
    data = data or open_finetune_data(cfg.images, cfg.embeddings, subset=cfg.subset)
    if len(data.train) < world.size or len(data.val) == 0:
        raise InputError(
            f"{cfg.images}: {len(data.train)} training and {len(data.val)} val images are too "
            f"few for {world.size} workers"
        )
    model, mean, std = build_model(cfg, data.n_classes)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    start, step, history = 0, 0, []
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        if ckpt is None:
            raise InputError(f"{resume_from}: no checkpoint to resume from")
        _check_resume(ckpt, cfg)
        if set(model.trainable_state()) != set(ckpt.model_state):
            raise InputError(f"{ckpt.path}/: checkpoint parameters do not match the model")
        model.load_state_dict(ckpt.model_state, strict=False)
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        start, step, history = ckpt.epoch, ckpt.step, list(ckpt.history)
        log.info("resuming from %s (epoch %d, step %d)", ckpt.path, start, step)
    net: torch.nn.Module = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    train_tf = build_transform(cfg.augment, cfg.image_size, mean, std, train=True)
    eval_tf = build_transform(cfg.augment, cfg.image_size, mean, std, train=False)
    n = len(data.train)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs + int(n % bs >= world.size)  # = len(global_batches(...))
    metrics: dict[str, float] = {}
    for epoch in range(start + 1, cfg.epochs + 1):
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
        batches = global_batches(n, bs, world.size, generator)
        dataset = ImageDataset(data.train, train_tf, seed=cfg.seed, epoch=epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[local_rows(b, world).tolist() for b in batches],
            num_workers=cfg.loader_workers,
            pin_memory=device.type == "cuda",
        )
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce_sum, mono_sum, rows, bad
        for b, (x, y, emb) in enumerate(loader):
            lr = lr_at(cfg, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y, emb = (t.to(device, non_blocking=True) for t in (x, y, emb))
            terms = step_loss(net, x, y, emb, cfg, world, batches[b].numel())
            optimizer.zero_grad(set_to_none=True)
            terms.backward.backward()
            optimizer.step()
            step += 1
            with torch.no_grad():
                sums += terms.sums()
        local_bad = sums[3].clone()
        if world.size > 1:
            dist.all_reduce(sums)
        ce_total, mono_total, rows, bad = sums.tolist()
        if bad:
            raise DivergedError(
                f"loss became NaN/inf in epoch {epoch}{_bad_ranks(local_bad, world)} "
                f"(backbone {cfg.backbone}, lr {cfg.lr:g})"
            )
        # every rank sums the same global mono value once per step
        train_mono = mono_total / world.size / max(len(batches), 1)
        train_ce = ce_total / max(rows, 1)
        try:
            val = evaluate(model, data, eval_tf, cfg, world, device)
        except DivergedError as err:
            raise DivergedError(
                f"{err} after epoch {epoch} (backbone {cfg.backbone}, lr {cfg.lr:g})"
            ) from None
        metrics = {
            "train_loss": train_ce + cfg.mono_coef * train_mono,
            "train_ce": train_ce,
            "train_mono": train_mono,
            "lr": lr_at(cfg, max(step - 1, 0), steps_per_epoch),
            **val.metrics,
            "epoch": float(epoch),
            "step": float(step),
        }
        history.append(metrics)
        ckpt_dir = None
        if world.rank == 0:
            ckpt_dir = save_checkpoint(
                out_dir / CHECKPOINTS,
                epoch=epoch,
                step=step,
                config=cfg.to_dict(),
                model_state=model.trainable_state(),
                optimizer_state=optimizer.state_dict(),
                history=history,
                eval_tensors={"monoscore": val.scores},
                data=data.record,
            )
        if on_epoch is not None:
            on_epoch(epoch, {**metrics, "monoscore_profile": val.profile()}, ckpt_dir)
    if not history:
        raise InputError(f"{out_dir}/: nothing to train (epochs={cfg.epochs})")
    final = history[-1]
    if world.rank == 0:
        write_metrics(out_dir, final)
    return final


def _bad_ranks(local_bad: Tensor, world: World) -> str:
    """The ranks whose loss was non-finite, as text for the message (all ranks call this)."""
    if world.size == 1:
        return ""
    flags = [torch.zeros_like(local_bad) for _ in range(world.size)]
    dist.all_gather(flags, local_bad)
    ranks = [str(r) for r, f in enumerate(flags) if float(f) > 0]
    return f" on rank {', '.join(ranks)}"


@dataclass(frozen=True, slots=True)
class ValResult:
    """Validation metrics of one epoch (identical on every rank)."""

    metrics: dict[str, float]
    """accuracy, top5, monoscore_* and purity_* of the val split."""
    scores: Tensor
    """[width] float64 dataset MonoScore of each mono-layer latent."""

    def profile(self) -> list[float]:
        """Per-latent MonoScore sorted descending (the Pareto profile plots)."""
        return torch.sort(self.scores, descending=True).values.tolist()


@torch.no_grad()
def evaluate(
    model: FinetuneModel,
    data: FinetuneData,
    transform: Any,
    cfg: FinetuneConfig,
    world: World,
    device: torch.device,
) -> ValResult:
    """Top-1/top-5 accuracy and dataset MonoScore / purity of the mono layer on the val split.

    Each rank evaluates a contiguous shard; counts and accumulator states are
    summed (min/max reduced) over the ranks, so the result is the exact
    full-split value on every rank. Raises `DivergedError` on every rank when
    the activations of any rank are non-finite (the inputs were checked on
    load: the model diverged).
    """
    model.eval()
    width = model.classifier.in_features
    mono = MonoScoreAccumulator(data.embedding_dim, width, device=device)
    purity = ClassPurityAccumulator(width, data.n_classes, device=device)
    # top1, top5, n, and 2**rank if this rank saw non-finite activations (a rank bitmask once summed)
    counts = torch.zeros(4, dtype=torch.float64, device=device)
    shard = np.array_split(np.arange(len(data.val)), world.size)[world.rank]
    dataset = torch.utils.data.Subset(
        ImageDataset(data.val, transform, seed=cfg.seed, epoch=0), shard.tolist()
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.eval_batch_size, num_workers=cfg.loader_workers
    )
    k = min(5, data.n_classes)
    for x, y, emb in loader:
        x, y, emb = x.to(device), y.to(device), emb.to(device)
        out = model(x)
        if not bool(torch.isfinite(out.activations).all()):  # one sync per val batch
            counts[3] = 2.0**world.rank
            break
        top = out.logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        counts[:3] += torch.stack(
            [hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(y.numel(), device=device)]
        ).double()
        mono.update(emb, out.activations)
        purity.update(out.activations, y)
    if world.size > 1:
        mono.all_reduce()
        for t in (counts, purity.counts, purity.mass):
            dist.all_reduce(t)
    top1, top5, total, non_finite = counts.tolist()
    if non_finite:
        ranks = [r for r in range(world.size) if int(non_finite) >> r & 1]
        where = f" on rank {', '.join(map(str, ranks))}" if world.size > 1 else ""
        raise DivergedError(f"the mono layer's activations on the val split became NaN/inf{where}")
    result = mono.result()
    binary, weighted = purity.compute()
    metrics = {
        "accuracy": top1 / total,
        "top5": top5 / total,
        **monoscore_summary(result.scores, result.active).as_dict(),
        "purity_binary": binary,
        "purity_weighted": weighted,
    }
    return ValResult(metrics, result.scores.cpu())
