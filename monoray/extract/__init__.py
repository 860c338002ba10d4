"""Feature extraction: frozen CLIP / SigLIP2 / ViT / DINOv2 encoders -> sharded feature stores.

Entry point: `extract(ExtractConfig(...), ray=None | RayOptions(...))`, and the
`monoray extract` subcommand (`monoray.extract.cli`). Sources: `digits`,
ImageFolder trees, CIFAR python directories, CSV/Parquet path lists.
"""

from monoray.extract.encoders import (
    CACHE,
    ENCODERS,
    RANDOM_INIT,
    Encoder,
    EncoderEntry,
    EncoderInfo,
    EncoderSpec,
    describe_encoder,
)
from monoray.extract.pipeline import ExtractConfig, ExtractResult, extract
from monoray.extract.report import BAD_IMAGES, read_bad_images
from monoray.extract.sources import Listing, Source, open_source

__all__ = [
    "BAD_IMAGES",
    "CACHE",
    "ENCODERS",
    "RANDOM_INIT",
    "Encoder",
    "EncoderEntry",
    "EncoderInfo",
    "EncoderSpec",
    "ExtractConfig",
    "ExtractResult",
    "Listing",
    "Source",
    "describe_encoder",
    "extract",
    "open_source",
    "read_bad_images",
]
