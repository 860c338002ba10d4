"""mono_loss_global on real gloo process groups equals mono_loss of the concatenated batch.

One pool of 3 spawned ranks serves the whole module (starting a process group
costs seconds; a task costs milliseconds). Groups: "world" (ranks 0-2),
"pair" (ranks 0 and 1) and "solo" (rank 2 alone). The parent sends each
rank a task and compares what comes back with the single-process `mono_loss`
(float64 statistics, so 1e-9 relative is a meaningful bar).
"""

from __future__ import annotations

import itertools
import os
import tempfile
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_metrics_common import Case, cases
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from monoray.errors import InputError
from monoray.metrics import DEFAULT_EPS, mono_loss, mono_loss_global, mono_term_for_ddp

WORLD = 3
GROUPS = {"world": (0, 1, 2), "pair": (0, 1), "solo": (2,)}
TIMEOUT_S = 60  # a hang fails the test instead of blocking the run


# ------------------------------------------------------------------ rank pool
def _worker(rank: int, init_file: str, inbox: Any, outbox: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    groups = {"world": None, "pair": dist.new_group([0, 1]), "solo": dist.new_group([2])}
    try:
        while (task := inbox.get()) is not None:
            fn, args = task
            try:
                outbox.put((rank, fn(groups, *args)))
            except Exception as err:  # sent back to the test as text
                outbox.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


class Ranks:
    """WORLD persistent gloo ranks; `run` sends tasks to some of them and collects the results."""

    def __init__(self, init_file: str) -> None:
        ctx = mp.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in range(WORLD)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(target=_worker, args=(r, init_file, self.inboxes[r], self.outbox))
            for r in range(WORLD)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Any, args: dict[int, tuple]) -> dict[int, Any]:
        for r, a in args.items():
            self.inboxes[r].put((fn, a))
        return dict(self.outbox.get(timeout=TIMEOUT_S) for _ in args)

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=TIMEOUT_S)
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp:
        pool = Ranks(os.path.join(tmp, "store"))
        yield pool
        pool.close()


# ---------------------------------------------------------------------- tasks
def _loss_task(groups: dict, name: str, e: torch.Tensor, a: torch.Tensor, eps: float) -> tuple:
    x = a.clone().requires_grad_()
    loss = mono_loss_global(e, x, eps=eps, group=groups[name])
    loss.backward()
    return loss.detach(), x.grad


def _fallback_task(groups: dict, name: str, e: torch.Tensor, a: torch.Tensor) -> tuple:
    return _loss_task(groups, name, e, a, DEFAULT_EPS), _reference(e, a, DEFAULT_EPS)


class _Net(nn.Module):
    """Linear + ReLU (the MonoLoss activations) and a linear classifier head."""

    def __init__(self, d_in: int, m: int, classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(d_in, m)
        self.head = nn.Linear(m, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.body(x))
        return z, self.head(z)


def _ddp_task(groups: dict, name: str, state: dict, batch: tuple, lam: float) -> tuple:
    x, y, emb = batch
    group = groups[name]
    model = _Net(x.shape[1], state["body.weight"].shape[0], state["head.weight"].shape[0])
    model.double().load_state_dict(state)
    ddp = DistributedDataParallel(model, process_group=group)
    z, logits = ddp(x)
    ce = F.cross_entropy(logits, y)
    mono = mono_loss_global(emb, z, group=group)
    loss = ce + lam * mono_term_for_ddp(mono, dist.get_world_size(group))
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    return loss.detach(), ce.detach(), mono.detach(), grads


# -------------------------------------------------------------------- helpers
def _reference(e: torch.Tensor, a: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = a.clone().requires_grad_()
    loss = mono_loss(e, x, eps=eps)
    loss.backward()
    return loss.detach(), x.grad


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    atol = 1e-12 * max(1.0, float(ref.abs().max())) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=atol)


def _run_split(
    ranks: Ranks, name: str, e: torch.Tensor, a: torch.Tensor, sizes: list[int], eps: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(loss, local gradient)` of each member of the group, holding `sizes` rows in rank order."""
    members = GROUPS[name]
    assert len(sizes) == len(members) and sum(sizes) == a.shape[0]
    es, acts = e.split(sizes), a.split(sizes)
    got = ranks.run(_loss_task, {r: (name, es[i], acts[i], eps) for i, r in enumerate(members)})
    for r in members:
        assert not isinstance(got[r], str), got[r]
    return [got[r] for r in members]


def _check_global(
    ranks: Ranks, name: str, e: torch.Tensor, a: torch.Tensor, sizes: list[int], eps: float
) -> None:
    """Every rank gets the loss of the whole batch and its rows of the whole batch's gradient."""
    ref, ref_grad = _reference(e, a, eps)
    for (loss, grad), ref_rows in zip(
        _run_split(ranks, name, e, a, sizes, eps), ref_grad.split(sizes), strict=True
    ):
        assert loss.dtype == a.dtype
        _close(loss, ref)
        _close(grad, ref_rows)


# ---------------------------------------------------------------------- tests
@st.composite
def split_cases(draw: st.DrawFn) -> tuple[str, Case, list[int]]:
    name = draw(st.sampled_from(["pair", "world"]))
    world = len(GROUPS[name])
    case = draw(cases(min_n=world, max_n=14, zero_rows=True))
    n = case.activations.shape[0]
    cuts = st.lists(st.integers(1, n - 1), min_size=world - 1, max_size=world - 1, unique=True)
    bounds = [0, *sorted(draw(cuts)), n]
    return name, case, [hi - lo for lo, hi in itertools.pairwise(bounds)]


@given(split_cases(), st.sampled_from([DEFAULT_EPS, 0.0, 0.3]))
def test_value_and_gradient_equal_single_process(ranks, split, eps) -> None:
    name, case, sizes = split
    _check_global(ranks, name, case.embeddings, case.activations, sizes, eps)


def _named_columns(sizes: list[int], owner: int, g: torch.Generator) -> torch.Tensor:
    """Rank r holds `sizes[r]` rows. Columns: random; ReLU-like, firing on every second row
    and 0 on the first row of every rank (the minimum tied across all ranks); constant;
    firing only on the rows of rank `owner`; integers 0..2 with the maximum on the first
    and last row; all zeros.

    Only ties at the minimum are visible in the gradient: MonoScore is invariant to
    scaling ã, so dL/dmax is identically 0.
    """
    n = sum(sizes)
    first_rows = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    a = torch.zeros(n, 6, dtype=torch.float64)
    a[:, 0] = torch.randn(n, generator=g, dtype=torch.float64)
    a[1::2, 1] = torch.rand(n // 2, generator=g, dtype=torch.float64) + 0.1
    a[first_rows, 1] = 0.0
    a[:, 2] = 1.75
    lo, hi = int(first_rows[owner]), int(first_rows[owner]) + sizes[owner]
    a[lo:hi, 3] = torch.rand(hi - lo, generator=g, dtype=torch.float64) + 0.5
    a[:, 4] = torch.randint(0, 3, (n,), generator=g).to(torch.float64)
    a[0, 4] = a[-1, 4] = 2.0
    return a


@pytest.mark.parametrize(
    ("name", "sizes", "owner"),
    [
        ("pair", [4, 4], 1),
        ("pair", [1, 6], 0),
        ("world", [2, 5, 3], 1),
    ],
)
def test_named_cases(ranks, name, sizes, owner) -> None:
    g = torch.Generator().manual_seed(sum(sizes))
    e = torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64)
    a = _named_columns(sizes, owner, g)
    _check_global(ranks, name, e, a, sizes, DEFAULT_EPS)
    # float32 activations: float32 loss, float64 inside, equal up to float32 rounding
    a32 = a.to(torch.float32)
    ref, ref_grad = _reference(e, a32, DEFAULT_EPS)
    got = _run_split(ranks, name, e, a32, sizes, DEFAULT_EPS)
    for (loss, grad), ref_rows in zip(got, ref_grad.split(sizes), strict=True):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_rows, rtol=1e-6, atol=1e-6)


def test_world_size_one_is_exactly_mono_loss(ranks) -> None:
    g = torch.Generator().manual_seed(3)
    e = torch.randn(6, 4, generator=g, dtype=torch.float64)
    a = _named_columns([2, 4], 1, g)
    assert not dist.is_initialized()  # the test process itself: no process group
    for got, ref in [
        (_loss_task({"none": None}, "none", e, a, DEFAULT_EPS), _reference(e, a, DEFAULT_EPS)),
        ranks.run(_fallback_task, {2: ("solo", e, a)})[2],  # a group of one rank
    ]:
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_input_errors_raise_on_every_rank_without_hanging(ranks) -> None:
    e, a = torch.randn(3, 2, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    nan = a.clone()
    nan[2, 1] = float("nan")
    bad = "InputError: mono_loss_global: invalid input on rank 1 (raised there)"
    dense_only = "activations: mono_loss_global takes dense activations, got sparse"
    scenarios = [
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", e, torch.rand(3, 5, dtype=torch.float64), 1e-6)},
            {
                r: "InputError: activations: ranks disagree on the number of latents (4 to 5)"
                for r in (0, 1)
            },
        ),
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", torch.randn(3, 7), a, 1e-6)},
            {r: "InputError: embeddings: ranks disagree on the dimension (2 to 7)" for r in (0, 1)},
        ),
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", e, a, 0.5)},
            {r: "InputError: eps: ranks disagree (1e-06 to 0.5)" for r in (0, 1)},
        ),
        (
            {0: ("world", e, a, 1e-6), 1: ("world", e, nan, 1e-6), 2: ("world", e, a, 1e-6)},
            {0: bad, 1: "InputError: activations: contains NaN at row 2 on rank 1", 2: bad},
        ),
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", e[:2], a, 1e-6)},
            {0: bad, 1: "InputError: embeddings has 2 rows but activations has 3 on rank 1"},
        ),
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", e, a.to_sparse(), 1e-6)},
            {
                0: bad,
                1: f"InputError: {dense_only} on rank 1",
            },
        ),
        (
            {0: ("pair", e, a, 1e-6), 1: ("pair", e, a, float("nan"))},
            {0: bad, 1: "InputError: eps: must be a finite number >= 0, got nan on rank 1"},
        ),
        (
            {2: ("pair", e, a, 1e-6)},
            {2: "InputError: mono_loss_global: this rank is not a member of the process group"},
        ),
    ]
    for args, expected in scenarios:
        assert ranks.run(_loss_task, args) == expected
    # the group is still in step afterwards
    _check_global(ranks, "world", torch.cat([e, e]), torch.cat([a, a]), [2, 2, 2], DEFAULT_EPS)


def test_ddp_gradient_equals_single_process(ranks) -> None:
    torch.manual_seed(0)
    d_in, m, classes, n, lam = 6, 8, 3, 10, 0.5
    model = _Net(d_in, m, classes).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(n, d_in, dtype=torch.float64)
    y = torch.randint(0, classes, (n,))
    emb = torch.randn(n, 4, dtype=torch.float64)
    halves = [(x[i : i + 5], y[i : i + 5], emb[i : i + 5]) for i in (0, 5)]
    got = ranks.run(_ddp_task, {r: ("pair", state, halves[r], lam) for r in (0, 1)})

    def grads(weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        z, logits = model(x)
        mono = mono_loss(emb, z)
        (F.cross_entropy(logits, y) + weight * mono).backward()
        return mono.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_mono, ref = grads(lam)
    _, without_mono = grads(0.0)
    assert (ref["body.weight"] - without_mono["body.weight"]).abs().max() > 1e-3
    for r in (0, 1):
        assert not isinstance(got[r], str), got[r]
        loss, ce, mono, g = got[r]
        _close(mono, ref_mono)
        torch.testing.assert_close(loss, ce + lam * mono, rtol=0, atol=0)
        for k in ref:
            _close(g[k], ref[k])


def test_mono_term_for_ddp_keeps_value_and_scales_gradient() -> None:
    x = torch.tensor([0.3, -1.2], dtype=torch.float64, requires_grad=True)
    loss = (x * x).sum() / 3
    for world in (1, 2, 5):
        term = mono_term_for_ddp(loss, world)
        assert torch.equal(term.detach(), loss.detach())
        (g,) = torch.autograd.grad(term, x, retain_graph=True)
        _close(g, world * 2 * x.detach() / 3)
    with pytest.raises(InputError, match="world_size: must be >= 1, got 0"):
        mono_term_for_ddp(loss, 0)
