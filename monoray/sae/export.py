"""An SAE artifact in other tools' formats: SAELens (`SAE.load_from_disk`) and plain `.npz`.

SAELens (6.x layout, `cfg.json` + `sae_weights.safetensors`; W_enc [d_in, d_sae],
W_dec [d_sae, d_in]): topk -> `topk`, vanilla -> `standard`, jumprelu -> `jumprelu`
(threshold = exp(log θ)), and BatchTopK / Matryoshka -> `jumprelu` with every latent's
threshold the learned inference threshold, as SAELens stores its own BatchTopK SAEs.
Its `normalize_activations` is "none": an SAE trained with monoray's `normalize: unit`
expects each input row scaled to unit L2 norm first (`input_note` says so; `cfg.json`'s
metadata records it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from monoray.data.store import atomic_write_bytes
from monoray.errors import InputError
from monoray.sae.io import SAEArtifact

Format = Literal["saelens", "npz"]
FORMATS: tuple[str, ...] = ("saelens", "npz")
SAELENS_ARCH = {
    "topk": "topk",
    "vanilla": "standard",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
}
"""monoray architecture -> the SAELens architecture that encodes and decodes alike."""
SAELENS_LAYOUT_VERSION = "6.0.0"
"""`metadata.sae_lens_version`: the cfg.json layout written (SAELens reads a cfg.json
without one as pre-6.0 and renames its keys)."""
SAELENS_FILES = ("cfg.json", "sae_weights.safetensors")
NPZ_FILES = ("sae.npz", "sae.json")
ACTIVATION = {
    "topk": "a = ReLU of the k largest entries of pre in each row, 0 elsewhere",
    "vanilla": "a = ReLU(pre)",
    "jumprelu": "a = pre where pre > threshold, else 0",
    "batchtopk": "a = pre where pre > threshold, else 0",
    "matryoshka": "a = pre where pre > threshold, else 0",
}
"""How each architecture's latents follow from pre = (x - b_dec) @ W_enc + b_enc."""


def inference_arrays(art: SAEArtifact) -> dict[str, Tensor]:
    """What encode/decode use, float32 on CPU: W_enc [d_in, d_sae], W_dec [d_sae, d_in],
    b_enc, b_dec and (JumpReLU, BatchTopK, Matryoshka) threshold [d_sae]."""
    sae = art.sae
    out = {
        "W_enc": sae.W_enc.detach().t(),
        "W_dec": sae.W_dec.detach(),
        "b_enc": sae.b_enc.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    if sae.cfg.arch == "jumprelu":
        out["threshold"] = sae.log_threshold.detach().exp()
    elif sae.cfg.arch in ("batchtopk", "matryoshka"):
        out["threshold"] = sae.threshold.detach().clamp_min(0).expand(sae.cfg.d_sae)
    return {k: v.to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def input_note(art: SAEArtifact) -> str | None:
    """One line on what to do to inputs before encoding, or None when nothing."""
    if art.normalisation.applied == "none":
        return None
    return (
        "note: scale each input row to unit L2 norm (x / ||x||) before encode: this SAE was "
        "trained on unit-norm rows (normalize_activations is 'none')"
    )


def saelens_config(art: SAEArtifact) -> dict[str, Any]:
    """The SAELens `cfg.json` of an artifact."""
    cfg = art.sae.cfg
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT_VERSION,
            "sae_lens_training_version": SAELENS_LAYOUT_VERSION,
            "monoray_version": art.monoray_version,
            "monoray_architecture": cfg.arch,
            "monoray_input_normalisation": art.normalisation.applied,
            "monoray_features_normalisation": art.normalisation.features,
            "monoray_encoder": art.normalisation.encoder,
        },
        "architecture": SAELENS_ARCH[cfg.arch],
    }
    if cfg.arch == "topk":
        out |= {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    return out


def export_sae(art: SAEArtifact, out: str | Path, fmt: Format) -> Path:
    """Write `art` as `fmt` into directory `out` (created; a directory holding other files
    than the format's is refused)."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    names = SAELENS_FILES if fmt == "saelens" else NPZ_FILES
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    others = sorted(p.name for p in out.iterdir() if p.name not in names) if out.is_dir() else []
    if others:
        raise InputError(f"{out}/: holds other files ({others[0]}, ...); choose an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    arrays = inference_arrays(art)
    if fmt == "saelens":
        tmp = out / f".{SAELENS_FILES[1]}.tmp"
        save_file(arrays, str(tmp))
        tmp.replace(out / SAELENS_FILES[1])
        atomic_write_bytes(
            out / SAELENS_FILES[0], json.dumps(saelens_config(art), indent=1).encode()
        )
        return out
    with open(out / f".{NPZ_FILES[0]}.tmp", "wb") as f:
        np.savez(f, **{k: v.numpy() for k, v in arrays.items()})
    (out / f".{NPZ_FILES[0]}.tmp").replace(out / NPZ_FILES[0])
    cfg = art.sae.cfg
    record = {
        "format": "monoray-sae-npz",
        "monoray_version": art.monoray_version,
        "architecture": cfg.arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k if cfg.arch == "topk" else None,
        "encode": f"pre = (x - b_dec) @ W_enc + b_enc; {ACTIVATION[cfg.arch]}",
        "decode": "x_hat = a @ W_dec + b_dec",
        "normalisation": dataclasses.asdict(art.normalisation),
        "arrays": {k: list(v.shape) for k, v in arrays.items()},
    }
    atomic_write_bytes(out / NPZ_FILES[1], json.dumps(record, indent=1).encode())
    return out
