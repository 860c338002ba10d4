"""The layering contracts in pyproject.toml hold: stage packages depend one way, no cycles."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_import_contracts_hold() -> None:
    # `lint-imports` reads [tool.importlinter] (layers + acyclic siblings, function-level
    # imports included) and exits non-zero naming each import that breaks a contract.
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_kind_is_registered_once() -> None:
    from monoray.sweep.space import load_space
    from monoray.trials import KINDS

    assert set(KINDS) == {"sae", "finetune"}
    for name, kind in KINDS.items():
        assert kind.name == name
        assert {m for m, _ in kind.objectives} <= set(kind.metrics)
    assert load_space(ROOT / "search_spaces" / "demo.yaml").trial_kind is KINDS["sae"]
