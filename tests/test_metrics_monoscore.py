"""MonoScore: linear, accumulator, sparse and distributed paths equal the pairwise reference."""

from __future__ import annotations

import itertools
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from test_metrics_common import as_layout, cases

from monoray.errors import InputError
from monoray.metrics import (
    MonoScoreAccumulator,
    monoscore,
    monoscore_pairwise,
    monoscore_profile,
    monoscore_summary,
)

TOL = {"rtol": 1e-9, "atol": 1e-12}
R2 = 1 / math.sqrt(2)

# Hand example: h1=(1,0), h2=(0,1), h3=(1,1)/√2, h4=(-1,0).
HAND_E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
HAND_A = torch.tensor(
    [
        # pair(1,3)  pair(1,2)  const  one-sample  general  general shifted negative
        [1.0, 1.0, 3.0, 0.0, 2.0, -1.0],
        [0.0, 1.0, 3.0, 0.0, 1.0, -2.0],
        [1.0, 0.0, 3.0, 5.0, 2.0, -1.0],
        [0.0, 0.0, 3.0, 0.0, 3.0, 0.0],
    ],
    dtype=torch.float64,
)
# Column 4: ã = (1/2, 0, 1/2, 1); pairs (1,3): 1/4·s13, (1,4): 1/2·(-1), (3,4): 1/2·(-1/√2);
# num = 1/(4√2) - 1/2 - 1/(2√2), den = 1/4 + 1/2 + 1/2 = 5/4.
HAND_MS = torch.tensor([R2, 0.0, 0.0, 0.0, -0.4 - 0.2 * R2, -0.4 - 0.2 * R2], dtype=torch.float64)
HAND_ACTIVE = torch.tensor([True, True, False, False, True, True])


def test_hand_example_all_paths() -> None:
    for fn in (monoscore, monoscore_pairwise):
        torch.testing.assert_close(fn(HAND_E, HAND_A), HAND_MS, **TOL)
    torch.testing.assert_close(monoscore(HAND_E, HAND_A.to_sparse()), HAND_MS, **TOL)
    res = MonoScoreAccumulator(2, 6).update(HAND_E, HAND_A).result()
    assert torch.equal(res.active, HAND_ACTIVE)
    torch.testing.assert_close(res.denominator[4], torch.tensor(1.25, dtype=torch.float64), **TOL)


@given(cases(zero_rows=True), st.sampled_from(["dense", "coo", "coo_rows", "csr"]))
def test_linear_and_sparse_equal_pairwise(case, layout) -> None:
    ref = monoscore_pairwise(case.embeddings, case.activations)
    got = monoscore(case.embeddings, as_layout(case.activations, layout))
    torch.testing.assert_close(got, ref, **TOL)
    # the zero convention: constant, all-zero and single-sample latents score 0
    for k, kind in enumerate(case.kinds):
        if kind in ("constant", "zero", "single"):
            assert got[k] == 0.0


@given(cases(max_n=24, zero_rows=True), st.data())
def test_accumulator_any_split_any_merge_order(case, data) -> None:
    e, a = case.embeddings, case.activations
    n, d, m = a.shape[0], e.shape[1], a.shape[1]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=5, unique=True)))
    bounds = [0, *[c for c in cuts if c < n], n]
    n_shards = data.draw(st.integers(1, 3))
    shards = [
        MonoScoreAccumulator(d, m, chunk_rows=3, sparse_chunk_rows=2) for _ in range(n_shards)
    ]
    for lo, hi in itertools.pairwise(bounds):
        layout = data.draw(st.sampled_from(["dense", "coo", "coo_rows", "csr"]))
        shard = shards[data.draw(st.integers(0, n_shards - 1))]
        shard.update(e[lo:hi], as_layout(a[lo:hi], layout))
    order = data.draw(st.permutations(range(n_shards)))
    total = MonoScoreAccumulator(d, m)
    for i in order:
        total.merge(shards[i])
    assert total.n_samples == n
    torch.testing.assert_close(total.compute(), monoscore_pairwise(e, a), **TOL)


@settings(max_examples=20)
@given(cases(max_n=8, max_m=4))
def test_float32_activations_match_their_float64_values(case) -> None:
    a32 = case.activations.to(torch.float32)  # the 1/4 grid is exact in float32
    torch.testing.assert_close(
        monoscore(case.embeddings, a32), monoscore(case.embeddings, case.activations), **TOL
    )


def test_uncoalesced_coo_duplicates_are_summed() -> None:
    g = torch.Generator().manual_seed(1)
    e = torch.randn(12, 3, generator=g, dtype=torch.float64)
    a = (torch.randint(-2, 5, (12, 5), generator=g).to(torch.float64)).relu()
    idx = torch.nonzero(a)
    vals = a[idx[:, 0], idx[:, 1]]
    dup = idx[::3]  # split every third entry into two stored parts, rows kept in order
    parts = torch.cat([idx, dup])
    order = torch.sort(parts[:, 0], stable=True).indices
    v = torch.cat([vals, torch.full((dup.shape[0],), 0.25, dtype=torch.float64)])
    v[: idx.shape[0]][::3] -= 0.25
    coo = torch.sparse_coo_tensor(parts[order].T, v[order], a.shape)
    assert not coo.is_coalesced()
    ref = monoscore_pairwise(e, a)
    torch.testing.assert_close(monoscore(e, coo), ref, **TOL)
    acc = MonoScoreAccumulator(3, 5, sparse_chunk_rows=4).update(e, coo)
    torch.testing.assert_close(acc.compute(), ref, **TOL)


def test_n_equals_one_and_two() -> None:
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    # N=2: min-max maps every varying latent to (0, 1) or (1, 0): one non-zero -> 0
    assert torch.equal(monoscore(e, a), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(monoscore(e[:1], a[:1]), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(monoscore_pairwise(e, a), monoscore(e, a), **TOL)


def test_numpy_and_noncontiguous_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(30, 4, generator=g, dtype=torch.float64)
    a = torch.randn(5, 30, generator=g, dtype=torch.float64).relu()
    ref = monoscore_pairwise(e, a.T)
    torch.testing.assert_close(monoscore(e, a.T), ref, **TOL)
    torch.testing.assert_close(monoscore(e.numpy(), np.ascontiguousarray(a.T.numpy())), ref, **TOL)


def test_state_dict_round_trip_and_from_state_dict() -> None:
    acc = MonoScoreAccumulator(2, 6).update(HAND_E[:2], HAND_A[:2])
    clone = MonoScoreAccumulator.from_state_dict(
        {k: v.clone() for k, v in acc.state_dict().items()}
    )
    clone.update(HAND_E[2:], HAND_A[2:])
    torch.testing.assert_close(clone.compute(), HAND_MS, **TOL)
    with pytest.raises(InputError, match="expected keys"):
        acc.load_state_dict({"n": torch.tensor(1)})
    bad = dict(acc.state_dict(), p=torch.zeros(3, 3))
    with pytest.raises(InputError, match="p has shape"):
        acc.load_state_dict(bad)


def test_summary_and_profile() -> None:
    res = MonoScoreAccumulator(2, 6).update(HAND_E, HAND_A).result()
    s = monoscore_summary(res.scores, res.active)
    g = -0.4 - 0.2 * R2
    assert s.n_active == 4 and s.n_latents == 6
    assert s.mean_all == pytest.approx((R2 + 2 * g) / 6)
    assert s.mean_active == pytest.approx((R2 + 2 * g) / 4)
    assert s.median == pytest.approx(0.0)
    assert s.median_active == pytest.approx((g + 0.0) / 2)
    default = monoscore_summary(torch.tensor([0.5, 0.0, -0.25, 0.0, 0.0]))  # active: score != 0
    assert default.n_active == 2 and default.mean_active == pytest.approx(0.125)
    assert default.mean_all == pytest.approx(0.05) and default.median == 0.0
    assert set(s.as_dict()) >= {"monoscore_mean", "monoscore_mean_active"}
    x, y = monoscore_profile(res.scores)
    assert torch.equal(y, torch.sort(res.scores, descending=True).values)
    assert x[0] == 0.0 and x[-1] == 1.0
    x3, y3 = monoscore_profile(res.scores, points=3)
    assert x3.tolist() == [0.0, 0.4, 1.0] and y3[0] == y[0]


@pytest.mark.parametrize(
    ("e", "a", "match"),
    [
        (torch.randn(4, 2), torch.randn(5, 3), "embeddings has 4 rows but activations has 5"),
        (torch.randn(4, 2), torch.randn(4), "activations: expected a 2-D tensor"),
        (
            torch.randn(4, 2),
            torch.ones(4, 3, dtype=torch.int64),
            "activations: expected a floating",
        ),
        (torch.randn(0, 2), torch.randn(0, 3), "embeddings: empty"),
        (torch.randn(4, 2), torch.randn(4, 0), "activations: empty"),
        ("x", torch.randn(4, 3), "embeddings: expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(e, a, match) -> None:
    for fn in (monoscore, monoscore_pairwise):
        with pytest.raises(InputError, match=match):
            fn(e, a)


def test_nonfinite_is_reported_with_its_row_and_leaves_state_unchanged() -> None:
    e = torch.randn(6, 3, dtype=torch.float64)
    a = torch.rand(6, 4, dtype=torch.float64)
    acc = MonoScoreAccumulator(3, 4).update(e, a)
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    bad = a.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(InputError, match="activations: contains NaN at row 3"):
        acc.update(e, bad)
    bad[3, 1] = float("inf")
    with pytest.raises(InputError, match="activations: contains inf at row 3"):
        acc.update(e, bad.to_sparse())
    e_bad = e.clone()
    e_bad[2, 0] = float("nan")
    with pytest.raises(InputError, match="embeddings: contains NaN at row 2"):
        acc.update(e_bad, a)
    with pytest.raises(InputError, match="activations has 3 columns but n_latents=4"):
        acc.update(e, a[:, :3])
    with pytest.raises(InputError, match="embeddings has 2 columns but dim=3"):
        acc.update(e[:, :2], a)
    for k, v in acc.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(InputError, match="no samples"):
        MonoScoreAccumulator(3, 4).compute()
    assert isinstance(InputError("x"), ValueError)


# ------------------------------------------------------------ torch.distributed
def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        e, a = _dist_data()
        shard = slice(rank * 13, (rank + 1) * 13) if rank == 0 else slice(13, None)
        acc = MonoScoreAccumulator(e.shape[1], a.shape[1])
        acc.update(e[shard], a[shard].to_sparse() if rank else a[shard])
        red = MonoScoreAccumulator.from_state_dict(
            {k: v.clone() for k, v in acc.state_dict().items()}
        )
        acc.all_reduce()
        red.reduce(dst=0)
        torch.save(acc.compute(), os.path.join(out_dir, f"all_reduce_{rank}.pt"))
        if rank == 0:
            torch.save(red.compute(), os.path.join(out_dir, "reduce_0.pt"))
    finally:
        dist.destroy_process_group()


def _dist_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    e = torch.randn(40, 5, generator=g, dtype=torch.float64)
    a = (torch.randint(-2, 6, (40, 9), generator=g).to(torch.float64) / 2).relu()
    a[:, 0] = 1.5  # constant
    return e, a


def test_all_reduce_and_reduce_over_gloo_equal_single_process() -> None:
    e, a = _dist_data()
    expected = MonoScoreAccumulator(5, 9).update(e, a).compute()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_dist_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        for name in ("all_reduce_0.pt", "all_reduce_1.pt", "reduce_0.pt"):
            got = torch.load(os.path.join(tmp, name))
            torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(expected, monoscore_pairwise(e, a), **TOL)


def test_all_zero_embedding_row_has_similarity_zero_with_every_sample() -> None:
    # ã = (0, 1, 1): the only weighted pair is (row 1, zero row 2), similarity 0.
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[0.0], [1.0], [1.0]], dtype=torch.float64)
    for fn in (monoscore, monoscore_pairwise):
        assert fn(e, a).tolist() == [0.0]
    res = MonoScoreAccumulator(2, 1).update(e, a.to_sparse()).result()
    assert res.active.tolist() == [True]
    assert res.scores.tolist() == [0.0]
