"""Sweeps: Ray Tune + Optuna over a search space, tracked in MLflow."""
