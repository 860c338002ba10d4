"""Frozen image encoders: a small registry of name -> (library, architecture, tag).

Each entry builds the image tower of an open_clip or timm model, with the
preprocessing of its pretrained tag (mean/std, resize mode, QuickGELU), so a
local weight file gets exactly the preprocessing it was trained with.

Weights are one of:

- a local file (`.safetensors`, `.bin`/`.pt`/`.pth` state dict, or big_vision
  `.npz` for open_clip): loaded only through safe loaders (safetensors, or
  `torch.load(weights_only=True)` inside open_clip/timm; never a full unpickle);
- `"cache"`: the entry's tag from an existing Hugging Face cache, looked up
  offline (`huggingface_hub.try_to_load_from_cache`), never downloaded;
- `"random-init"`: random weights from `seed` (tests, smoke runs); must be asked
  for explicitly.

Preprocessing is split in two: the PIL part (resize, crop) runs on CPU in the
loader workers and yields uint8 [H, W, 3]; scaling to [0, 1] and mean/std
normalisation run batched on the encoder's device, the same ops as
`ToTensor` + `Normalize`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, assert_never

import numpy as np

from monoray.errors import InputError
from monoray.runs.device import check_device
from monoray.runs.files import sha256_file

Library = Literal["open_clip", "timm"]
RANDOM_INIT = "random-init"
"""`weights` value for randomly initialised encoders (from `EncoderSpec.seed`)."""
CACHE = "cache"
"""`weights` value for the entry's pretrained tag from a local Hugging Face cache (offline)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
"""Weight file types accepted for `weights=PATH`."""
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
"""Compute precisions; "auto" is float16 on CUDA and float32 on CPU."""
NORMALISATIONS = ("unit", "none")
"""Feature normalisations: "unit" L2-normalises every feature vector."""


@dataclass(frozen=True, slots=True)
class EncoderEntry:
    """One registered encoder."""

    name: str
    """Registry name, as given to `--encoder` and written to the store header."""
    library: Library
    """Which library builds it."""
    arch: str
    """open_clip model name or timm architecture."""
    tag: str
    """Pretrained tag whose preprocessing (and cached weights) the entry uses."""
    description: str
    """One line for `--help`."""


ENCODERS: dict[str, EncoderEntry] = {
    e.name: e
    for e in (
        EncoderEntry("clip-vit-b32", "open_clip", "ViT-B-32", "openai", "CLIP ViT-B/32 (OpenAI)"),
        EncoderEntry(
            "clip-vit-b32-laion2b",
            "open_clip",
            "ViT-B-32",
            "laion2b_s34b_b79k",
            "OpenCLIP ViT-B/32 (LAION-2B)",
        ),
        EncoderEntry("clip-vit-l14", "open_clip", "ViT-L-14", "openai", "CLIP ViT-L/14 (OpenAI)"),
        EncoderEntry(
            "siglip2-vit-b16", "open_clip", "ViT-B-16-SigLIP2", "webli", "SigLIP2 ViT-B/16"
        ),
        EncoderEntry(
            "siglip2-so400m14",
            "open_clip",
            "ViT-SO400M-14-SigLIP2",
            "webli",
            "SigLIP2 SO400M/14",
        ),
        EncoderEntry(
            "siglip2-vit-b16-timm",
            "timm",
            "vit_base_patch16_siglip_224",
            "v2_webli",
            "SigLIP2 ViT-B/16 (timm)",
        ),
        EncoderEntry(
            "vit-l16",
            "timm",
            "vit_large_patch16_224",
            "augreg_in21k_ft_in1k",
            "supervised ViT-L/16 (ImageNet-21k -> 1k)",
        ),
        EncoderEntry(
            "vit-ti16",
            "timm",
            "vit_tiny_patch16_224",
            "augreg_in21k_ft_in1k",
            "supervised ViT-Ti/16 (small: laptops, smoke runs, tests)",
        ),
        EncoderEntry(
            "dinov2-vit-b14", "timm", "vit_base_patch14_dinov2", "lvd142m", "DINOv2 ViT-B/14"
        ),
        EncoderEntry(
            "dinov2-vit-l14", "timm", "vit_large_patch14_dinov2", "lvd142m", "DINOv2 ViT-L/14"
        ),
    )
}


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """Which encoder to build and how to run it."""

    name: str
    """Registry name (a key of `ENCODERS`)."""
    weights: str
    """A local weight file, "cache" (offline Hugging Face cache) or "random-init"."""
    image_size: int | None = None
    """Input resolution override in pixels (square); None keeps the model's own."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"."""
    precision: str = "auto"
    """Compute dtype: "auto" (float16 on CUDA, float32 on CPU), "float32", "float16", "bfloat16"."""
    normalize: str = "unit"
    """"unit": L2-normalise each feature vector (recorded in the header); "none": raw."""
    seed: int = 0
    """Seed of the random initialisation (random-init only)."""

    def entry(self) -> EncoderEntry:
        """The registry entry; `InputError` for an unknown name."""
        try:
            return ENCODERS[self.name]
        except KeyError:
            raise InputError(
                f"unknown encoder {self.name!r}; choose one of {', '.join(ENCODERS)}"
            ) from None


@dataclass(frozen=True, slots=True)
class Preprocess:
    """The CPU half of a model's preprocessing, plus the constants of the device half."""

    pil: Callable[[Any], Any]
    """PIL transforms (resize, crop, mode) from the model's own eval transform."""
    size: tuple[int, int]
    """Output (height, width) of `pil`."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, ...]
    """Per-channel std divided by after subtracting the mean."""

    def __call__(self, image: Any) -> np.ndarray:
        """An RGB `PIL.Image` -> uint8 [H, W, 3]."""
        out = np.asarray(self.pil(image.convert("RGB")), dtype=np.uint8)
        if out.shape != (*self.size, 3):
            raise ValueError(
                f"preprocessed image has shape {out.shape}, expected {(*self.size, 3)}"
            )
        return out


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """What the driver needs to know about an encoder without loading its weights."""

    entry: EncoderEntry
    """The registry entry."""
    dim: int
    """Feature width."""
    preprocess: Preprocess
    """CPU preprocessing for the loader workers."""
    weights_file: Path | None
    """Resolved local weight file (None for random init)."""
    weights_id: str
    """"random-init seed=S" or "sha256:<hex> <file name>": recorded in the store header."""


def describe_encoder(spec: EncoderSpec) -> EncoderInfo:
    """Dim, preprocessing and weights identity of `spec` (the model is built on the meta device)."""
    entry = spec.entry()
    _check_spec(spec)
    weights_file = resolve_weights(spec)
    weights_id = (
        f"{RANDOM_INIT} seed={spec.seed}"
        if weights_file is None
        else f"sha256:{sha256_file(weights_file)} {weights_file.name}"
    )
    import torch

    with torch.device("meta"):
        model, transform = build_tower(entry, None, spec.image_size, device="meta")
        preprocess = split_preprocess(transform)
        dim = int(model(torch.empty(1, 3, *preprocess.size)).shape[-1])
    return EncoderInfo(entry, dim, preprocess, weights_file, weights_id)


def resolve_weights(spec: EncoderSpec) -> Path | None:
    """The local weight file `spec.weights` stands for (None for random init); `InputError` if none."""
    entry = spec.entry()
    if spec.weights == RANDOM_INIT:
        return None
    if spec.weights == CACHE:
        return _from_hf_cache(entry)
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise InputError(
            f"{spec.weights}: weight file not found (pass a local file, '{CACHE}' for the "
            f"offline Hugging Face cache, or --random-init)"
        )
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InputError(f"{path}: weight files must end in {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix.lower() == ".npz" and entry.library != "open_clip":
        raise InputError(f"{path}: .npz (big_vision) weights are only read for open_clip models")
    return path.resolve()


def _from_hf_cache(entry: EncoderEntry) -> Path:
    from huggingface_hub import try_to_load_from_cache

    if entry.library == "open_clip":
        import open_clip

        hub = open_clip.get_pretrained_cfg(entry.arch, entry.tag).get("hf_hub", "")
        repo, _, fname = _split_hub(hub)
        names = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    elif entry.library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(f"{entry.arch}.{entry.tag}")
        repo = (cfg.hf_hub_id or "") if cfg is not None else ""
        fname = (cfg.hf_hub_filename or "") if cfg is not None else ""
        names = [fname] if fname else ["model.safetensors", "pytorch_model.bin"]
    else:
        assert_never(entry.library)
    if repo:
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return Path(found)
    where = f"{repo}" if repo else f"{entry.arch}.{entry.tag}"
    raise InputError(
        f"weights of {entry.name} ({where}) are not in the local Hugging Face cache "
        "(monoray never downloads); pass --weights PATH or --random-init"
    )


def _split_hub(hub: str) -> tuple[str, str, str]:
    """open_clip's "org/repo/filename" (filename optional) -> (repo, "/", filename)."""
    parts = hub.strip("/").split("/")
    return "/".join(parts[:2]), "/", "/".join(parts[2:])


def split_preprocess(transform: Any) -> Preprocess:
    """Split a torchvision eval `Compose` at `ToTensor`: PIL part | Normalize constants."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(getattr(transform, "transforms", [transform]))
    cut = next((i for i, t in enumerate(steps) if isinstance(t, ToTensor)), None)
    tail = steps[cut + 1 :] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], Normalize):
        raise RuntimeError(
            f"unexpected preprocessing pipeline (want PIL ops, ToTensor, Normalize): {steps}"
        )
    norm = tail[0]
    mean = tuple(float(v) for v in np.asarray(norm.mean, dtype=np.float64).ravel())
    std = tuple(float(v) for v in np.asarray(norm.std, dtype=np.float64).ravel())
    pil = Compose(steps[:cut])
    from PIL import Image

    probe = np.asarray(pil(Image.new("RGB", (301, 203))))
    return Preprocess(pil=pil, size=(int(probe.shape[0]), int(probe.shape[1])), mean=mean, std=std)


def resolve_device(device: str) -> Any:
    """A `torch.device` for "auto" / "cpu" / "cuda[:N]"; `InputError` if CUDA is asked for but absent."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device: unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_precision(precision: str, device_type: str) -> str:
    """ "auto" -> "float16" on CUDA, "float32" elsewhere; other values pass through."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "float16" if device_type == "cuda" else "float32"
    return precision


def _check_spec(spec: EncoderSpec) -> None:
    if spec.normalize not in NORMALISATIONS:
        raise InputError(f"--normalize must be one of {', '.join(NORMALISATIONS)}")
    check_device(spec.device)
    if spec.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}")
    if spec.image_size is not None and spec.image_size < 8:
        raise InputError(f"--image-size must be >= 8 pixels, got {spec.image_size}")


class Encoder:
    """A frozen image tower on one device: uint8 pixels [B, H, W, 3] -> float32 features [B, d]."""

    def __init__(self, spec: EncoderSpec, info: EncoderInfo | None = None) -> None:
        import torch

        self.spec = spec
        self.info = info or describe_encoder(spec)
        self.device = resolve_device(spec.device)
        self.precision = resolve_precision(spec.precision, self.device.type)
        torch.manual_seed(spec.seed)  # random-init weights depend only on the seed
        model, _ = build_tower(self.info.entry, self.info.weights_file, spec.image_size, "cpu")
        self.model = model.eval().requires_grad_(False).to(self.device)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.info.preprocess.mean, device=self.device).view(shape)
        self._std = torch.tensor(self.info.preprocess.std, device=self.device).view(shape)
        self.calls = 0
        """Batches encoded so far (tests use it to check that resume skips work)."""

    @property
    def dim(self) -> int:
        """Feature width."""
        return self.info.dim

    def encode(self, pixels: Any) -> np.ndarray:
        """uint8 [B, H, W, 3] (numpy or torch, pinned for async copies) -> float32 [B, d]."""
        import torch

        x = torch.as_tensor(pixels)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"expected uint8 [B, H, W, 3] pixels, got {tuple(x.shape)} {x.dtype}")
        self.calls += 1
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        x = x.float().div(255)
        x = x.sub(self._mean).div(self._std)
        dtype = getattr(torch, self.precision)
        autocast = (
            torch.autocast(self.device.type, dtype=dtype)
            if dtype != torch.float32
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            y = self.model(x)
        y = y.float()
        if self.spec.normalize == "unit":
            y = torch.nn.functional.normalize(y, dim=-1)
        return y.cpu().numpy()


def build_tower(
    entry: EncoderEntry, weights: Path | None, image_size: int | None, device: str
) -> tuple[Any, Any]:
    """(image tower, its full eval transform) of `entry`, with weights loaded when given.

    Randomly initialised from the global torch RNG when `weights` is None.
    """
    if entry.library == "open_clip":
        import open_clip

        pcfg = open_clip.get_pretrained_cfg(entry.arch, entry.tag)
        try:
            with _quiet():  # open_clip warns (root logger) that random init is random
                model, _, transform = open_clip.create_model_and_transforms(
                    entry.arch,
                    pretrained=None if weights is None else str(weights),
                    device=device,
                    force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
                    force_image_size=image_size,
                    image_mean=pcfg.get("mean"),
                    image_std=pcfg.get("std"),
                    image_interpolation=pcfg.get("interpolation"),
                    image_resize_mode=pcfg.get("resize_mode"),
                    weights_only=True,
                )
        except Exception as err:
            if weights is None:
                raise
            raise _weights_error(entry, weights, err) from None
        return model.visual, transform
    if entry.library == "timm":
        import timm
        import torch

        kwargs: dict[str, Any] = {"num_classes": 0}
        if image_size is not None:
            kwargs["img_size"] = image_size
        name = f"{entry.arch}.{entry.tag}"
        try:
            if weights is None:
                model = timm.create_model(name, pretrained=False, **kwargs)
            else:
                overlay = {"file": str(weights)}
                model = timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
                )
        except Exception as err:
            if weights is None:
                raise
            raise _weights_error(entry, weights, err) from None
        data_cfg = timm.data.resolve_model_data_config(model)
        if image_size is not None:
            data_cfg["input_size"] = (3, image_size, image_size)
        with torch.device("cpu"):  # its Normalize holds tensors; not on the meta device
            transform = timm.data.create_transform(**data_cfg, is_training=False)
        return model, transform
    assert_never(entry.library)


def _weights_error(entry: EncoderEntry, weights: Path, err: Exception) -> InputError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return InputError(f"{weights}: cannot load weights for {entry.name}: {first[:300]}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence open_clip's root-logger warning that random init is random (we asked for it)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def with_weights_file(spec: EncoderSpec, info: EncoderInfo) -> EncoderSpec:
    """`spec` with "cache" replaced by the resolved file (what remote workers should load)."""
    if info.weights_file is None:
        return spec
    return dataclasses.replace(spec, weights=str(info.weights_file))
