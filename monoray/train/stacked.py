"""`Stack`: the TopK and BatchTopK members of a pack's kernel group stepped by one set of
batched ops.

A small SAE's step is a few dozen tiny kernels, so P members stepped one after another
cost P times the per-kernel overhead; stacked, the P members' parameters are [P, ...]
tensors and every op of the step (encoder GEMM, per-member TopK / BatchTopK selection
with its own k, decoder GEMM, reconstruction loss, AuxK, MonoLoss, backward, decoder-row
projection, grad clipping, Adam, row renormalisation, dead-latent counters, BatchTopK
threshold EMA, TopK dead-latent re-initialisation) runs once for all of them. It is the
dense formulation of each member's own step (`TopKFamily.forward_train` and
`Run.train_step`): the same maths on the same batches, so a stacked member differs from
the member trained alone by float rounding only (the sums run in another order; bounds in
`tests/test_train_packed.py`).

Each member's `SparseAutoencoder` parameters and buffers, and its Adam state, are views
into the stack while it trains, so evaluation, checkpoints and resume read and write the
member's own tensors as before. A member's loss terms are summed per epoch on the device
and handed to its `EpochTotals`, so a diverging member fails at the end of the epoch with
the same reason as alone ("loss became NaN/inf at epoch e, step s") and the others,
untouched by its NaNs (nothing mixes members), go on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from monoray import metrics
from monoray.train.trainer import EpochTotals, Run

STACKABLE_ARCHS = ("topk", "batchtopk")
"""Architectures a stack trains; the others step one member at a time."""
PARAMS = ("W_dec", "W_enc", "b_enc", "b_dec")
"""`SparseAutoencoder.parameters()` order (grad clipping and Adam state follow it)."""
BETAS = (0.9, 0.999)
"""`torch.optim.Adam`'s defaults, which `Run` uses."""
_F64 = torch.float64


STACK_MAX_SPARSE_WORK = 1 << 21
"""Largest batch * d_sae * d_in stacked where the member alone takes the sparse path (CPU, impl
"auto" or "sparse"). Below it a step is mostly per-kernel overhead, which a stack shares;
above it the stack's dense [P, batch, d_sae] work costs more than the sparse kernels save.
Measured (4 BatchTopK members, one thread): stacked 3.7x faster per step at 2^18 (the demo),
2.0x at 2^20, 0.72x at 2^22, 0.2x at 2^27."""


def small_step(batch: int, d_sae: int, d_in: int) -> bool:
    """A step that is mostly per-kernel overhead on CPU (`STACK_MAX_SPARSE_WORK`)."""
    return batch * d_sae * d_in <= STACK_MAX_SPARSE_WORK


def stackable(run: Run) -> bool:
    """Whether `run` trains in a stack: a TopK/BatchTopK SAE on one process with constant loss
    coefficients (a scheduled λ steps alone) whose step is dense anyway (impl "dense", or
    "auto" on an accelerator) or small (`STACK_MAX_SPARSE_WORK`)."""
    cfg = run.cfg
    sae = cfg.sae
    dense = sae.impl == "dense" or (sae.impl == "auto" and run.device.type != "cpu")
    small = small_step(cfg.batch_size, sae.d_sae, sae.d_in)
    return (
        sae.arch in STACKABLE_ARCHS
        and run.sae.collective.size == 1
        and not run.schedule.coefs_scheduled
        and (dense or small)
    )


def stack_key(run: Run) -> tuple:
    """Members with equal keys share a stack (same shapes and MonoLoss arithmetic)."""
    s = run.cfg.sae
    return (s.d_in, s.d_sae, s.mono_eps, s.mono_precision)


class Stack:
    """P stackable runs (same `stack_key`, same data group) trained as one."""

    def __init__(self, runs: Sequence[Run]) -> None:
        self.runs = list(runs)
        sae0 = self.runs[0].sae
        dev = self.device = sae0.W_dec.device
        loss_cfgs = [r.cfg.sae for r in self.runs]
        p = self.size = len(self.runs)

        def per_member(values: list, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.tensor(values, dtype=dtype, device=dev)

        self.is_batch = per_member([c.arch == "batchtopk" for c in loss_cfgs], torch.bool)
        self.k = per_member([c.k for c in loss_cfgs], torch.int64)
        self.aux_coef = per_member([c.aux_coef for c in loss_cfgs])
        self.aux_k = per_member([c.aux_k for c in loss_cfgs], torch.int64)
        self.dead_after = per_member([c.dead_steps_threshold for c in loss_cfgs], torch.int64)
        self.normalized = per_member(
            [c.recon_loss == "normalized_mse" for c in loss_cfgs], torch.bool
        )
        self.ema = per_member([c.threshold_ema for c in loss_cfgs])
        reinit = [c.dead_reinit_steps if c.arch == "topk" else 0 for c in loss_cfgs]
        self.reinit_after = per_member([s if s > 0 else -1 for s in reinit], torch.int64)
        self.any_reinit = any(s > 0 for s in reinit)
        self.mono_coef = per_member([c.mono_coef for c in loss_cfgs])
        self.mono_idx = [i for i, c in enumerate(loss_cfgs) if c.mono_coef != 0]
        self.topk_idx = [i for i, c in enumerate(loss_cfgs) if c.arch == "topk"]
        self.batch_idx = [i for i, c in enumerate(loss_cfgs) if c.arch == "batchtopk"]
        self.topk_rows, self.batch_rows, self.mono_rows = (
            torch.tensor(idx, dtype=torch.int64, device=dev)
            for idx in (self.topk_idx, self.batch_idx, self.mono_idx)
        )
        self.topk_max = max((loss_cfgs[i].k for i in self.topk_idx), default=0)
        self.batch_max = max((loss_cfgs[i].k for i in self.batch_idx), default=0)
        self.mono_eps = loss_cfgs[0].mono_eps
        self.mono_work = loss_cfgs[0].mono_precision
        self.clip = per_member([r.cfg.grad_clip for r in self.runs])
        self.adam_eps = per_member([r.cfg.adam_eps for r in self.runs])

        # Parameters, Adam state and buffers as [P, ...] tensors; each member's are views.
        self.params: list[Tensor] = []
        self.exp_avg: list[Tensor] = []
        self.exp_avg_sq: list[Tensor] = []
        self.steps: list[Tensor] = []
        for name in PARAMS:
            own = [getattr(r.sae, name) for r in self.runs]
            states = [
                r.optimizer.state.get(param, {}) for r, param in zip(self.runs, own, strict=True)
            ]
            stacked = torch.stack([t.detach() for t in own]).requires_grad_()
            avg = torch.stack(
                [s.get("exp_avg", torch.zeros_like(t)) for s, t in zip(states, own, strict=True)]
            )
            avg_sq = torch.stack(
                [s.get("exp_avg_sq", torch.zeros_like(t)) for s, t in zip(states, own, strict=True)]
            )
            zero = torch.zeros((), dtype=torch.float32, device=dev)
            step = torch.stack([s.get("step", zero).to(torch.float32) for s in states])
            for i, (r, param) in enumerate(zip(self.runs, own, strict=True)):
                param.data = stacked.data[i]
                r.optimizer.state[param] = {
                    "step": step[i],
                    "exp_avg": avg[i],
                    "exp_avg_sq": avg_sq[i],
                }
            self.params.append(stacked)
            self.exp_avg.append(avg)
            self.exp_avg_sq.append(avg_sq)
            self.steps.append(step)
        self.since = self._buffer("steps_since_fired", range(p))
        batch = self.batch_idx
        self.threshold = self._buffer("threshold", batch) if batch else None
        self.updates = self._buffer("threshold_updates", batch) if batch else None
        self.sums: dict[str, Tensor] = {}
        self.first_bad = torch.full((p,), -1, dtype=torch.long, device=dev)

    def _buffer(self, name: str, members: Sequence[int]) -> Tensor:
        """Buffer `name` of `members` as one tensor; each member's buffer becomes its view."""
        stacked = torch.stack([getattr(self.runs[i].sae, name) for i in members])
        for j, i in enumerate(members):
            self.runs[i].sae._buffers[name] = stacked[j]
        return stacked

    @property
    def W_dec(self) -> Tensor:
        return self.params[0]

    @property
    def W_enc(self) -> Tensor:
        return self.params[1]

    @property
    def b_enc(self) -> Tensor:
        return self.params[2]

    @property
    def b_dec(self) -> Tensor:
        return self.params[3]

    # ---- the step ------------------------------------------------------------------
    def step(self, x: Tensor, embeddings: Tensor) -> None:
        """One optimizer step of every member on batch `x` (normalised; `embeddings` the
        MonoLoss embeddings); the loss terms go to the epoch's sums."""
        b = x.shape[0]
        dead = self.since >= self.dead_after[:, None]  # before this batch is counted
        pre = torch.baddbmm(self.b_enc[:, None], x[None] - self.b_dec[:, None], self.W_enc.mT)
        with torch.no_grad():
            src = pre.detach()
            if self.batch_idx:  # BatchTopK selects (and AuxK ranks) ReLU'd pre-activations
                src = torch.where(self.is_batch[:, None, None], src.clamp_min(0), src)
            keep = self._select(src)
        z = torch.where(keep, pre.relu(), 0.0)
        recon = torch.baddbmm(self.b_dec[:, None], z, self.W_dec)
        mse = self._recon_loss(recon, x)
        aux = self._aux(src, pre, dead, (x - recon).detach())
        loss = mse + self.aux_coef * aux
        mono = self._mono(z, embeddings) if self.mono_idx else None
        if mono is not None:
            loss = loss.index_add(0, self.mono_rows, self.mono_coef[self.mono_rows] * mono)
        loss.sum().backward()
        with torch.no_grad():
            fired = z.detach() > 0
            l0 = fired.sum((1, 2)).to(z.dtype) / b
            self.since.add_(1).masked_fill_(fired.any(1), 0)
            if self.threshold is not None:
                self._update_threshold(src, keep)
            reinit = self._plan_reinit(x - recon.detach()) if self.any_reinit else None
            self._optimizer_step()
            if reinit is not None:
                self._reinit(reinit)
        for r in self.runs:
            r.step += 1
        self._add(loss, mse, aux, l0, mono)

    def _select(self, src: Tensor) -> Tensor:
        """[P, B, M] bool: the entries each member keeps (TopK: its k per row; BatchTopK:
        its k * B of the batch)."""
        _, b, m = src.shape
        keep = torch.zeros_like(src, dtype=torch.bool)
        if self.topk_idx:
            rows = self.topk_rows
            k = self.k[rows]
            _, idx = src[rows].topk(self.topk_max, dim=2)
            ranked = torch.arange(idx.shape[2], device=src.device) < k[:, None, None]
            keep[rows] = torch.zeros_like(keep[rows]).scatter(2, idx, ranked.expand_as(idx))
        if self.batch_idx:
            rows = self.batch_rows
            n_keep = self.k[rows] * b
            flat = src[rows].reshape(len(self.batch_idx), b * m)
            _, idx = flat.topk(min(self.batch_max * b, b * m), dim=1)
            ranked = torch.arange(idx.shape[1], device=src.device) < n_keep[:, None]
            sel = torch.zeros_like(flat, dtype=torch.bool).scatter(1, idx, ranked)
            keep[rows] = sel.view(-1, b, m)
        return keep

    def _recon_loss(self, recon: Tensor, target: Tensor) -> Tensor:
        """[P] `recon_loss` of each member's [B, d] reconstruction of its target: "mse" (the
        mean over batch and dims) or "normalized_mse" (per-sample error / mean square of the
        target, then the mean), as `monoray.sae.base.recon_loss`."""
        err = (recon - target).pow(2).mean(-1)
        energy = target.pow(2).mean(-1)
        inv = 1.0 / torch.where(energy > 0, energy, 1.0)
        return (err * torch.where(self.normalized[:, None], inv, 1.0)).mean(1)

    def _aux(self, src: Tensor, pre: Tensor, dead: Tensor, residual: Tensor) -> Tensor:
        """[P] AuxK losses: each sample's top `min(aux_k, dead)` dead latents reconstruct the
        residual (0 where a member has none dead or aux_coef 0)."""
        n_aux = torch.where(self.aux_coef != 0, torch.minimum(dead.sum(1), self.aux_k), 0)
        top = int(n_aux.max())
        if top == 0:
            return pre.new_zeros(self.size)
        with torch.no_grad():
            _, idx = src.masked_fill(~dead[:, None], -math.inf).topk(top, dim=2)
            ranked = torch.arange(top, device=src.device) < n_aux[:, None, None]
        values = torch.where(ranked, pre.gather(2, idx).relu(), 0.0)
        acts = torch.zeros_like(pre).scatter(2, idx, values)
        return torch.where(n_aux > 0, self._recon_loss(torch.bmm(acts, self.W_dec), residual), 0.0)

    def _mono(self, z: Tensor, embeddings: Tensor) -> Tensor:
        """MonoLoss of each member with λ > 0, in `mono_idx` order: `mono_loss`'s dense
        path (`metrics.stacked_mono_loss`), the members' own sparse path in dense form."""
        return metrics.stacked_mono_loss(
            embeddings.detach(), z[self.mono_rows], eps=self.mono_eps, precision=self.mono_work
        )

    def _update_threshold(self, src: Tensor, keep: Tensor) -> None:
        """BatchTopK: EMA of the smallest positive value each member kept."""
        assert self.threshold is not None and self.updates is not None
        rows = self.batch_rows
        kept = src[rows]
        smallest = torch.where(keep[rows] & (kept > 0), kept, math.inf).amin((1, 2))
        beta = self.ema[rows]
        ema = torch.where(
            self.updates == 0, smallest, beta * self.threshold + (1 - beta) * smallest
        )
        valid = torch.isfinite(smallest)
        self.threshold.copy_(torch.where(valid, ema, self.threshold))
        self.updates.add_(valid.to(torch.int64))

    def _plan_reinit(self, residual: Tensor) -> list[tuple[int, Tensor, Tensor]] | None:
        """TopK: latents dead for `dead_reinit_steps` get the batch's worst reconstructed
        samples' residual directions (as `TopKSAE._plan_reinit`); None when none is due."""
        due = self.since >= self.reinit_after[:, None]
        due &= self.reinit_after[:, None] > 0
        if not bool(due.any()):
            return None
        plans = []
        for i in due.any(1).nonzero().squeeze(1).tolist():
            rows = due[i].nonzero().squeeze(1)
            res = residual[i]
            norms = res.norm(dim=1)
            worst = norms.argsort(descending=True, stable=True)
            pick = worst[torch.arange(rows.numel(), device=res.device) % worst.numel()]
            plans.append((i, rows, (res / norms[:, None].clamp_min(1e-12))[pick]))
        return plans

    def _reinit(self, plans: list[tuple[int, Tensor, Tensor]]) -> None:
        for i, rows, directions in plans:
            self.W_dec[i, rows] = directions
            self.W_enc[i, rows] = directions
            self.b_enc[i, rows] = 0
            self.since[i, rows] = 0
            for moments in (self.exp_avg, self.exp_avg_sq):
                for j in range(3):  # W_dec, W_enc, b_enc
                    moments[j][i, rows] = 0

    def _optimizer_step(self) -> None:
        """Decoder-row gradient projection, per-member grad-norm clipping, Adam (each
        member's lr at its step), unit decoder rows: `Run.train_step` on the stack."""
        w_dec = self.W_dec
        grads = [t.grad for t in self.params]
        g_dec = grads[0]
        assert g_dec is not None
        dots = (g_dec * w_dec).sum(2, keepdim=True)
        g_dec.sub_(w_dec * (dots / w_dec.norm(dim=2, keepdim=True).square()))
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads if g is not None])
        total = norms.norm(dim=0)
        coef = torch.where(self.clip > 0, (self.clip / (total + 1e-6)).clamp(max=1.0), 1.0)
        lr = self._lrs()
        b1, b2 = BETAS
        for param, g, avg, avg_sq, step in zip(
            self.params, grads, self.exp_avg, self.exp_avg_sq, self.steps, strict=True
        ):
            assert g is not None
            shape = (-1,) + (1,) * (g.dim() - 1)
            g.mul_(coef.view(shape))
            step.add_(1)
            bc1 = (1 - b1 ** step.to(_F64)).to(g.dtype)
            bc2_sqrt = (1 - b2 ** step.to(_F64)).sqrt().to(g.dtype)
            avg.lerp_(g, 1 - b1)
            avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (avg_sq.sqrt() / bc2_sqrt.view(shape)).add_(self.adam_eps.view(shape))
            param.addcdiv_(avg * (lr / bc1).view(shape), denom, value=-1.0)
            param.grad = None
        w_dec.div_(w_dec.norm(dim=2, keepdim=True).clamp_min(1e-12))

    def _lrs(self) -> Tensor:
        lrs = []
        for r in self.runs:
            lr = r.schedule.lr_at(r.step) if r.schedule.lr_scheduled else r.cfg.lr
            for group in r.optimizer.param_groups:
                group["lr"] = lr
            lrs.append(lr)
        return torch.tensor(lrs, dtype=torch.float32, device=self.device)

    # ---- the epoch's loss terms ------------------------------------------------------
    def _add(self, loss: Tensor, mse: Tensor, aux: Tensor, l0: Tensor, mono: Tensor | None) -> None:
        step = self.runs[0].step
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        terms = {"loss": loss, "mse": mse.detach(), "aux": aux.detach(), "l0": l0}
        for key, value in terms.items():
            v = value.to(_F64)
            self.sums[key] = self.sums[key] + v if key in self.sums else v
        if mono is not None:
            v = mono.detach().to(_F64)
            self.sums["mono"] = self.sums["mono"] + v if "mono" in self.sums else v

    def totals(self) -> list[EpochTotals]:
        """Each member's `EpochTotals` of the epoch so far (the terms `train_sae` sums)."""
        out = []
        zero = torch.zeros((), dtype=_F64, device=self.device)
        for i, r in enumerate(self.runs):
            t = EpochTotals(r.device)
            if self.sums:
                t.sums = {
                    "loss": self.sums["loss"][i],
                    "mse": self.sums["mse"][i],
                    "sparsity": zero,
                    "aux": self.sums["aux"][i],
                    "l0": self.sums["l0"][i],
                }
                if i in self.mono_idx:
                    t.sums["mono"] = self.sums["mono"][self.mono_idx.index(i)]
            t.first_bad = self.first_bad[i]
            out.append(t)
        return out
