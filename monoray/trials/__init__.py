"""Trial kinds behind one registry: a space's `kind:` names one of `KINDS`.

A new kind is one module that builds a `TrialKind` (see `monoray/trials/kind.py`)
plus one entry here.
"""

from monoray.trials import finetune, sae
from monoray.trials.kind import TrialKind

KINDS: dict[str, TrialKind] = {k.name: k for k in (sae.KIND, finetune.KIND)}

__all__ = ["KINDS", "TrialKind"]
