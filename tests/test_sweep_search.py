"""`MonorayOptunaSearch` on its own: a real Optuna RDB study (SQLite), no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from ray.tune.search import Searcher

from monoray.sweep.search import MonorayOptunaSearch, open_study, storage_for
from monoray.sweep.space import load_space
from monoray.trials.packed import OUTCOMES_KEY

DEMO = Path(__file__).parents[1] / "search_spaces" / "demo.yaml"


@pytest.mark.parametrize("pack", [1, 2])
def test_the_study_is_read_again_only_after_the_searcher_asked_or_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pack: int
) -> None:
    """Tune polls `suggest` every step while it may add a trial: at capacity the searcher
    answers from what the study said last, until it asks or tells Optuna itself."""
    sets = ["budget.num_samples=4", "budget.max_concurrent=1", f"resources.pack={pack}"]
    space = load_space(DEMO, sets)
    storage = storage_for(f"sqlite:///{tmp_path / 'optuna.db'}")
    open_study(space, "s", storage)
    search = MonorayOptunaSearch(space, "s", storage)
    reads: list[int] = []
    real = optuna.Study.get_trials
    monkeypatch.setattr(
        optuna.Study, "get_trials", lambda self, *a, **kw: reads.append(1) or real(self, *a, **kw)
    )
    assert isinstance(search.suggest("a"), dict)
    reads.clear()
    assert all(search.suggest("b") is None for _ in range(20))  # one Tune trial live: full
    assert len(reads) == 1
    result = {"r2": 0.5, "monoscore_mean": 0.5, "dead_fraction": 0.0}
    if pack > 1:  # the pack's last result: each member's outcome
        result = {OUTCOMES_KEY: json.dumps({"0": result, "1": result})}
    search.on_trial_complete("a", result)
    assert isinstance(search.suggest("b"), dict)  # told: a slot is free
    handed_out_all = pack > 1  # 2 packs of 2 hold the budget of 4; 2 single trials do not
    assert search.suggest("c") == (Searcher.FINISHED if handed_out_all else None)
