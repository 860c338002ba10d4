"""monoray: hyperparameter sweeps for monosemantic representations."""

__version__ = "0.1.0"
