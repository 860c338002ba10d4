"""`train_pack`: P SAEs trained in one process on one pass over the data.

Each member is the run `train_sae(cfgs[i], splits, out_dir=out_dirs[i])` would
be, step for step (`Run` in `monoray.train.trainer` is that run's state and
step), and writes the same files. What the members share:

- the data: members with the same (seed, batch_size, normalize, device) draw the
  same batches in the same order, so each step gathers and normalises one batch
  for all of them (a *data group*; groups with other keys run one after another
  in the same process);
- the step: within a data group, TopK and BatchTopK members with the same
  `stack_key` step as one `Stack` (`monoray.train.stacked`: [P, ...] parameters,
  one set of batched ops for the whole step; where that pays, see `stackable`);
- the encoder GEMM of the members that step one by one: within a data group,
  members with the same (d_in, d_sae) get their pre-activations from one
  `torch.baddbmm` over their stacked W_enc, b_enc, b_dec (a *kernel group*;
  architecture, k, λ, lr, impl and every loss option may differ: the
  pre-activation is the same affine map in every architecture; on CPU only for
  small steps). It runs without grad, as each SAE's own `_pre(x)` does; the
  sparse path recomputes its kept entries with grad, the dense path attaches it
  with a dense backward per member (`SparseAutoencoder.forward_train(pre=...)`);
- evaluation: one pass over the val split per (device, eval_batch_size), with the
  same batched GEMM for the encoders.

Everything else is the member's own: parameters, Adam state, lr schedule,
λ and loss options, BatchTopK threshold, AuxK counters, the global torch RNG
stream (saved and restored around each of its steps). On CPU the batched GEMM
gives bit-identical pre-activations to each member's own `addmm`, so a member
that steps on its own on the sparse path equals the member trained alone
exactly; a stacked member (dense batched kernels), and any member on CUDA, may
differ by float rounding. A member that diverges or meets bad input is failed
alone (`MemberOutcome.failure`) and dropped; the others go on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from monoray.data import FeatureSplits
from monoray.errors import InputError
from monoray.runs.outcome import DivergedError, failure_report
from monoray.runs.seeding import epoch_seed
from monoray.sae import SparseAutoencoder
from monoray.train.config import TrainConfig
from monoray.train.evaluate import (
    EvalResult,
    Evaluation,
    NonFiniteOutputError,
    normalize_inputs,
    val_batch,
)
from monoray.train.stacked import Stack, small_step, stack_key, stackable
from monoray.train.trainer import (
    EpochTotals,
    Run,
    _Batches,
    _progress_bar,
    open_run,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochEnd:
    """One member's end of a pack epoch, checkpointed: what `on_epoch` hears of it."""

    member: int
    """Its index in the pack."""
    metrics: dict[str, Any]
    """`train_sae`'s `on_epoch` metrics, with the val `monoscore_profile` (a list)."""
    checkpoint: Path
    """Its checkpoint directory of this epoch."""


PackOnEpoch = Callable[[int, list[EpochEnd]], set[int]]
"""on_epoch(epoch, ends) -> the members (indices) to stop now: called once per pack epoch,
after every member ending it has its checkpoint of that epoch written."""

T = TypeVar("T")


@dataclass(frozen=True)
class MemberOutcome:
    """How one member of a pack ended: exactly one of the three fields is set."""

    metrics: dict[str, Any] | None = None
    """Final metrics (as `train_sae` returns them) if the member completed its epochs."""
    failure: dict[str, Any] | None = None
    """`failure_report(err, rank=0)` if it diverged or met bad input."""
    stopped_epoch: int | None = None
    """The epoch after which `on_epoch` asked to stop it (no `metrics.json` is written)."""


@dataclass(eq=False)
class Member:
    """A live member: its index in the pack and its run."""

    index: int
    run: Run
    done: int
    """Epochs finished."""
    totals: EpochTotals | None = None
    train: dict[str, float] = field(default_factory=dict)
    """The train metrics of the epoch being finished."""
    rng: list[Tensor] = field(default_factory=list)
    """The member's global torch RNG state(s) between its steps (CPU, then CUDA)."""

    @property
    def cfg(self) -> TrainConfig:
        return self.run.cfg

    @property
    def next_epoch(self) -> int:
        return self.done + 1

    def data_key(self) -> Hashable:
        c = self.cfg
        return (c.seed, c.batch_size, c.normalize, self.run.device)

    def kernel_key(self) -> Hashable:
        return (self.cfg.sae.d_in, self.cfg.sae.d_sae)


def _groups(items: Iterable[T], key: Callable[[T], Hashable]) -> list[list[T]]:
    """Items grouped by `key`, groups and members in first-seen order."""
    out: dict[Hashable, list[T]] = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return list(out.values())


@torch.no_grad()
def stacked_pre(saes: Sequence[SparseAutoencoder], x: Tensor) -> list[Tensor]:
    """Each SAE's `_pre(x)`, (x - b_dec) W_encᵀ + b_enc, from one batched GEMM (the SAEs
    share d_in and d_sae)."""
    w_enc = torch.stack([s.W_enc for s in saes])
    b_enc = torch.stack([s.b_enc for s in saes])
    b_dec = torch.stack([s.b_dec for s in saes])
    pre = torch.baddbmm(b_enc[:, None], x[None] - b_dec[:, None], w_enc.transpose(1, 2))
    return list(pre.unbind(0))


def _kernel_pres(members: Sequence[Member], x: Tensor) -> list[Tensor | None]:
    """Pre-activations for `members` (one data group's batch x): batched per kernel group;
    None (the SAE computes its own) for a member alone in its kernel group, or on CPU when
    the step is large: there the GEMM is compute-bound and stacking the encoders (a copy of
    every member's W_enc per batch) only adds time."""
    pres: list[Tensor | None] = [None] * len(members)
    slots = _groups(range(len(members)), lambda i: members[i].kernel_key())
    for slot in slots:
        d_in, d_sae = members[slot[0]].kernel_key()
        large = x.device.type == "cpu" and not small_step(x.shape[0], d_sae, d_in)
        if len(slot) < 2 or large:
            continue
        saes = [members[i].run.sae for i in slot]
        for i, pre in zip(slot, stacked_pre(saes, x), strict=True):
            pres[i] = pre
    return pres


class _Rng:
    """Swaps a member's global torch RNG state in around its work (`train_sae` seeds the
    global RNG per epoch for in-model sampling; each member keeps its own stream)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def get(self) -> list[Tensor]:
        state = [torch.get_rng_state()]
        return [*state, torch.cuda.get_rng_state()] if self.cuda else state

    def set(self, state: list[Tensor]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda:
            torch.cuda.set_rng_state(state[1])


@dataclass(eq=False)
class Epoch:
    """How a data group's members step in one epoch (`Pack.begin_epoch`)."""

    epoch: int
    normalize: str
    """The data group's `normalize`."""
    rng: _Rng
    stacks: list[tuple[list[Member], Stack]]
    """Stackable members of one kernel group (two or more) and their `Stack`."""
    single: list[Member]
    """The members that step one by one."""


class Pack:
    """The pack's live members and the outcomes of those that ended."""

    def __init__(self, size: int, on_epoch: PackOnEpoch | None, keep: int) -> None:
        self.outcomes: list[MemberOutcome | None] = [None] * size
        self.live: list[Member] = []
        self.on_epoch = on_epoch
        self.keep = keep

    @classmethod
    def open(
        cls,
        cfgs: Sequence[TrainConfig],
        splits: FeatureSplits,
        out_dirs: Sequence[Path],
        *,
        resume: bool,
        on_epoch: PackOnEpoch | None = None,
        keep: int = 2,
    ) -> Pack:
        """Every member's run (`open_run`); a finished or failing one gets its outcome now."""
        if len(cfgs) != len(out_dirs):
            raise InputError(f"train_pack: {len(cfgs)} configs but {len(out_dirs)} out dirs")
        pack = cls(len(cfgs), on_epoch, keep)
        for i, (cfg, out_dir) in enumerate(zip(cfgs, out_dirs, strict=True)):
            try:
                run = open_run(cfg, splits, out_dir=Path(out_dir), resume=resume)
                if run.start >= cfg.epochs:  # finished before: rewrite its outputs only
                    pack.outcomes[i] = MemberOutcome(metrics=run.finish(None))
                    continue
            except InputError as err:
                pack.outcomes[i] = MemberOutcome(failure=failure_report(err, rank=0))
                continue
            pack.live.append(Member(i, run, run.start))
        return pack

    def begin_epoch(self, group: list[Member], epoch: int) -> Epoch:
        """Seed epoch `epoch` of a data group as `train_sae` does (every member's RNG stream
        starts there) and stack its stackable members by kernel group."""
        torch.manual_seed(epoch_seed(group[0].cfg.seed, epoch))
        rng = _Rng(group[0].run.device)
        seeded = rng.get()
        for m in group:
            m.run.sae.train()
            m.totals = EpochTotals(m.run.device)
            m.rng = seeded
        kernels = _groups([m for m in group if stackable(m.run)], lambda m: stack_key(m.run))
        stacks = [(ms, Stack([m.run for m in ms])) for ms in kernels if len(ms) > 1]
        stacked = {m for ms, _ in stacks for m in ms}
        single = [m for m in group if m not in stacked]
        return Epoch(epoch, group[0].cfg.normalize, rng, stacks, single)

    def fail(self, member: Member, err: Exception) -> None:
        report = failure_report(err, rank=0)
        if report is None:
            raise err
        log.info("pack member %d failed: %s", member.index, err)
        self.outcomes[member.index] = MemberOutcome(failure=report)
        if member in self.live:
            self.live.remove(member)

    def step(self, now: Epoch, x_raw: Tensor) -> int:
        """One optimizer step of every live member of a data group on the batch `x_raw`: each
        stack as one, the others one after another (their encoder GEMM batched per kernel
        group); a member that fails is dropped. Returns the number of members stepped."""
        alive = [m for m in now.single if m in self.live]
        x = normalize_inputs(x_raw, now.normalize)
        for _, stack in now.stacks:
            stack.step(x, x_raw)
        for m, pre in zip(alive, _kernel_pres(alive, x), strict=True):
            now.rng.set(m.rng)
            try:
                terms = m.run.train_step(x, x_raw, now.epoch, pre=pre)
            except (DivergedError, InputError) as err:
                self.fail(m, err)
                continue
            finally:
                m.rng = now.rng.get()
            assert m.totals is not None
            m.totals.add(terms, m.run.step)
        return len(alive) + sum(len(ms) for ms, _ in now.stacks)

    def train_epoch(self, group: list[Member], epoch: int, batches: _Batches, bar: Any) -> None:
        """Epoch `epoch` of one data group, one batch gather per step for all its members."""
        cfg = group[0].cfg
        n, bs = batches.n, cfg.batch_size
        steps_per_epoch = math.ceil(n / bs)
        generator = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch))
        now = self.begin_epoch(group, epoch)
        perm = torch.randperm(n, generator=generator)
        for b in range(steps_per_epoch):
            if not now.stacks and not any(m in self.live for m in now.single):
                return
            stepped = self.step(now, batches.get(perm[b * bs : (b + 1) * bs]))
            if bar is not None:
                for _ in range(stepped):
                    bar.step()
        for ms, stack in now.stacks:
            for m, totals in zip(ms, stack.totals(), strict=True):
                m.totals = totals
        for m in [m for m in group if m in self.live]:
            assert m.totals is not None
            try:
                m.train = m.totals.result(m.run, epoch, steps_per_epoch)
            except DivergedError as err:
                self.fail(m, err)

    def evaluate(
        self, members: list[Member], splits: FeatureSplits, epoch: int
    ) -> dict[int, EvalResult]:
        """Every member's evaluation after `epoch` in one pass over the val split (per
        device and eval batch size); a member whose evaluation fails is failed."""
        results: dict[int, EvalResult] = {}
        for group in _groups(members, lambda m: (m.run.device, m.cfg.eval_batch_size)):
            device, batch_size = group[0].run.device, group[0].cfg.eval_batch_size
            accs = {m.index: Evaluation(m.run.sae, splits.val, device) for m in group}
            n = splits.val.features.shape[0]
            for start in range(0, n, batch_size):
                alive = [m for m in group if m in self.live]
                try:
                    x_raw = val_batch(splits.val, start, min(start + batch_size, n), device)
                except InputError as err:
                    for m in alive:
                        self.fail(m, m.run.evaluate_error(err, epoch))
                    break
                for norm_group in _groups(alive, lambda m: m.cfg.normalize):
                    x = normalize_inputs(x_raw, norm_group[0].cfg.normalize)
                    pres = _kernel_pres(norm_group, x)
                    for m, pre in zip(norm_group, pres, strict=True):
                        try:
                            accs[m.index].update(start, x_raw, x, pre=pre)
                        except (NonFiniteOutputError, InputError) as err:
                            self.fail(m, m.run.evaluate_error(err, epoch))
            for m in group:
                if m in self.live:
                    results[m.index] = accs[m.index].result()
        return results

    def end_epoch(self, members: list[Member], epoch: int, results: dict[int, EvalResult]) -> None:
        """Checkpoint every member ending pack epoch `epoch`, report them (`on_epoch`), then
        finish each whose last epoch it was and stop those `on_epoch` stops."""
        if not members:
            return
        ends = []
        for m in members:
            result = results[m.index]
            metrics, ckpt_dir = m.run.end_epoch(epoch, m.train, result, keep=self.keep)
            m.done = epoch
            assert ckpt_dir is not None
            report = {**metrics, "monoscore_profile": result.profile().tolist()}
            ends.append(EpochEnd(m.index, report, ckpt_dir))
        stops = self.on_epoch(epoch, ends) if self.on_epoch is not None else set()
        for m in members:
            if m.index in stops:
                self.outcomes[m.index] = MemberOutcome(stopped_epoch=epoch)
            elif epoch >= m.cfg.epochs:
                self.outcomes[m.index] = MemberOutcome(metrics=m.run.finish(results[m.index]))
            else:
                continue
            self.live.remove(m)


def train_pack(
    cfgs: Sequence[TrainConfig],
    splits: FeatureSplits,
    *,
    out_dirs: Sequence[Path],
    resume: bool = False,
    on_epoch: PackOnEpoch | None = None,
    progress: bool | None = None,
    keep_checkpoints: int = 2,
) -> list[MemberOutcome]:
    """Train `cfgs[i]` into `out_dirs[i]` for every i, as one pack (module doc).

    Member i's out dir gets what `train_sae(cfgs[i], splits, out_dir=out_dirs[i])`
    writes, and its training is that run's. `resume=True` continues every
    unfinished member from the newest intact checkpoint in its out dir (members
    may be at different epochs; a finished member is not retrained, its outputs
    are rewritten from its last checkpoint). `on_epoch(epoch, ends)` is called once per
    pack epoch, when every member ending it has its checkpoint of that epoch written, with
    an `EpochEnd` for each (in member order); the members whose indices it returns stop
    there.
    Returns one `MemberOutcome` per member, in order.
    """
    pack = Pack.open(
        cfgs, splits, out_dirs, resume=resume, on_epoch=on_epoch, keep=keep_checkpoints
    )
    batches = {
        dev: _Batches(splits.train.features, dev) for dev in {m.run.device for m in pack.live}
    }
    n = len(splits.train)
    steps = {m.index: math.ceil(n / m.cfg.batch_size) for m in pack.live}
    bar = _progress_bar(
        sum(m.cfg.epochs * steps[m.index] for m in pack.live),
        sum(m.run.start * steps[m.index] for m in pack.live),
        progress,
    )
    try:
        while pack.live:
            # Members behind (after a resume) catch up first, so that the pack shares again.
            epoch = min(m.next_epoch for m in pack.live)
            now = [m for m in pack.live if m.next_epoch == epoch]
            for group in _groups(now, Member.data_key):
                pack.train_epoch(group, epoch, batches[group[0].run.device], bar)
            now = [m for m in now if m in pack.live]
            results = pack.evaluate(now, splits, epoch)
            pack.end_epoch([m for m in now if m in pack.live], epoch, results)
    finally:
        if bar is not None:
            bar.close()
    outcomes = pack.outcomes
    assert all(o is not None for o in outcomes)
    return [o for o in outcomes if o is not None]
