"""Seeds of a run: every epoch's randomness derives from (seed, epoch), so a resume is exact."""

from __future__ import annotations


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in epoch `epoch` (1-based) of a run seeded `seed`."""
    return (seed * 1_000_003 + epoch) % (2**63 - 1)
