"""Class purity: hand example, a naive per-latent loop, streaming and sparse inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_metrics_common import as_layout

from monoray.errors import InputError
from monoray.metrics import ClassPurityAccumulator, class_purity


def naive_purity(a: torch.Tensor, y: torch.Tensor, n_classes: int) -> tuple[float, float]:
    binary, weighted = [], []
    for k in range(a.shape[1]):
        on = a[:, k] > 0
        if not on.any():
            continue
        counts = [int((on & (y == c)).sum()) for c in range(n_classes)]
        best = max(range(n_classes), key=lambda c: (counts[c], -c))
        binary.append(counts[best] / int(on.sum()))
        mass = a[on, k]
        weighted.append(float(mass[y[on] == best].sum() / mass.sum()))
    if not binary:
        return 0.0, 0.0
    return sum(binary) / len(binary), sum(weighted) / len(weighted)


@st.composite
def labelled(draw):
    n = draw(st.integers(1, 25))
    m = draw(st.integers(1, 6))
    c = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    a = torch.randint(-3, 5, (n, m), generator=g).to(torch.float64) / 2
    y = torch.randint(0, c, (n,), generator=g)
    return a, y, c


def test_hand_example() -> None:
    a = torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    # latent 0 fires on samples 0,1 (class 0) and 3 (class 1): c*=0, binary 2/3, weighted 3/7
    # latent 1 fires on 1 (class 0) and 2 (class 1): tie -> class 0: binary 1/2, weighted 1/4
    # latent 2 never fires (negative only): excluded
    binary, weighted = class_purity(a, y)
    assert binary == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert weighted == pytest.approx((3 / 7 + 1 / 4) / 2)
    assert class_purity(torch.zeros(2, 3), torch.tensor([0, 1])) == (0.0, 0.0)


@given(labelled(), st.sampled_from(["dense", "coo", "csr"]), st.data())
def test_equals_naive_loop_streaming_and_sparse(case, layout, data) -> None:
    a, y, c = case
    expected = naive_purity(a, y, c)
    got = class_purity(as_layout(a, layout), y, n_classes=c)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    cut = data.draw(st.integers(0, a.shape[0]))
    left = ClassPurityAccumulator(a.shape[1], c).update(a[:cut], y[:cut]) if cut else None
    right = ClassPurityAccumulator(a.shape[1], c)
    if cut < a.shape[0]:
        right.update(as_layout(a[cut:], layout), y[cut:])
    if left is not None:
        right.merge(left)
    assert right.compute() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    restored = ClassPurityAccumulator(a.shape[1], c).load_state_dict(right.state_dict())
    assert restored.compute() == right.compute()


def test_bad_inputs() -> None:
    a = torch.rand(4, 3)
    with pytest.raises(InputError, match="activations has 4 rows but labels has 3"):
        class_purity(a, torch.tensor([0, 1, 0]))
    with pytest.raises(InputError, match="labels: expected an integer dtype"):
        class_purity(a, torch.rand(4))
    with pytest.raises(InputError, match="labels: label 5 >= n_classes=3"):
        class_purity(a, torch.tensor([0, 1, 5, 0]), n_classes=3)
    with pytest.raises(InputError, match="labels: negative label"):
        class_purity(a, torch.tensor([0, -1, 2, 0]))
    acc = ClassPurityAccumulator(3, 2)
    bad = a.clone()
    bad[2, 2] = float("nan")
    with pytest.raises(InputError, match="activations: contains NaN at row 2"):
        acc.update(bad, torch.tensor([0, 1, 1, 0]))
    assert acc.counts.sum() == 0
