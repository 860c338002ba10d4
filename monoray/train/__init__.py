"""SAE training: one trainer for local runs, Ray Tune function trials and Ray Train workers.

    cfg = TrainConfig.from_dict({"arch": "batchtopk", "d_in": 64, "d_sae": 256, "k": 8})
    metrics = train_sae(cfg, load_features("digits"), out_dir=Path("runs/x"))

No Ray imports here: the sweep reports through `on_epoch`.
"""

from monoray.train.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from monoray.train.config import TrainConfig
from monoray.train.evaluate import VAL_KEYS, EvalResult, evaluate, normalize_inputs
from monoray.train.trainer import DivergedError, epoch_seed, resolve_device, train_sae

__all__ = [
    "VAL_KEYS",
    "Checkpoint",
    "DivergedError",
    "EvalResult",
    "TrainConfig",
    "epoch_seed",
    "evaluate",
    "load_checkpoint",
    "normalize_inputs",
    "resolve_device",
    "save_checkpoint",
    "train_sae",
]
