"""SAE training: one trainer for local runs, Ray Tune function trials and Ray Train workers.

    cfg = TrainConfig.from_dict({"arch": "batchtopk", "d_in": 64, "d_sae": 256, "k": 8})
    metrics = train_sae(cfg, load_features("digits"), out_dir=Path("runs/x"))

No Ray imports here: the sweep reports through `on_epoch`. Checkpoints, seeding, devices
and the divergence error are the shared runs layer's (`monoray.runs`).
"""

from monoray.train.config import TrainConfig
from monoray.train.evaluate import VAL_KEYS, EvalResult, evaluate, normalize_inputs
from monoray.train.trainer import train_sae

__all__ = [
    "VAL_KEYS",
    "EvalResult",
    "TrainConfig",
    "evaluate",
    "normalize_inputs",
    "train_sae",
]
