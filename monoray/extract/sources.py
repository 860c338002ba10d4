"""Image sources: a deterministic listing of (sample id, image reference, label).

Four kinds, chosen by `open_source(images)`:

- `digits`: scikit-learn's bundled 8x8 digits (ids = row numbers, as in
  `monoray.data.load_digits`), grey levels scaled to 0..255 and given as RGB;
  the encoder's own resize upsamples them.
- a CIFAR-10/100 "python version" directory (`data_batch_1`... / `train`,
  `test`): these files are pickles, parsed with a restricted unpickler that
  only rebuilds builtins and numpy arrays (anything else is refused).
- a `.csv` / `.parquet` table with a path column (`path`, `image`, `filepath`,
  `file` or `image_path`) and an optional `label` column (integers, or names
  mapped to indices in sorted order); relative paths resolve against the
  table's folder or `image_root`. Ids are row numbers.
- any other directory: an ImageFolder tree (`root/<class>/**/<image>`,
  classes and files sorted by name), or a flat folder of images (unlabelled).

A sample id is the position in the listing, so the same source always gives
the same ids; that is what makes a resumed extraction identical to an
uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from monoray.errors import InputError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) an ImageFolder or flat folder lists; other files are ignored."""
PATH_COLUMNS = ("path", "image", "filepath", "file", "image_path")
"""Column names accepted as the image path of a CSV/Parquet listing, first match wins."""
LABEL_COLUMN = "label"
"""Column name of the class label in a CSV/Parquet listing (optional)."""
CIFAR_SPLITS = ("train", "test")
"""The splits of a CIFAR python directory."""
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
"""CIFAR-10 training batch files, in id order."""


@dataclass(frozen=True, slots=True)
class Listing:
    """Every sample of a source, in id order (id = position)."""

    refs: Sequence[str]
    """Per sample, what `Source.load` takes: a path relative to the root, or "file#row"."""
    labels: np.ndarray | None
    """[N] int64 class labels, or None for an unlabelled source."""
    classes: tuple[str, ...] = ()
    """Class names by label index, when the source names them."""

    def __len__(self) -> int:
        return len(self.refs)

    def head(self, n: int | None) -> Listing:
        """The first `n` samples (all when `n` is None)."""
        if n is None or n >= len(self):
            return self
        labels = None if self.labels is None else self.labels[:n]
        return Listing(refs=self.refs[:n], labels=labels, classes=self.classes)

    def fingerprint(self) -> str:
        """SHA-256 over (ref, label) of every sample: the same listing gives the same hash."""
        h = hashlib.sha256()
        labels = self.labels
        for i, ref in enumerate(self.refs):
            label = -1 if labels is None else int(labels[i])
            h.update(f"{ref}\t{label}\n".encode())
        return h.hexdigest()


class Source(Protocol):
    """Where images come from; small and picklable (Ray tasks and loader workers get a copy)."""

    kind: str

    def listing(self) -> Listing:
        """All samples, in id order; `InputError` when the source is empty or malformed."""
        ...

    def load(self, ref: str) -> Any:
        """Decode one image as an RGB `PIL.Image`; raises whatever the decoder raises."""
        ...

    def location(self, ref: str) -> str:
        """Human-readable place of one sample (a path) for the bad-image report."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the store header."""
        ...


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")  # forces a full decode: truncated files fail here


@dataclass(frozen=True, slots=True)
class ImageFolderSource:
    """`root/<class>/**/<image>` (labels = sorted class index) or a flat folder of images."""

    root: Path
    """The folder; its subfolders are the classes."""
    kind: str = field(default="imagefolder", init=False)
    """Source kind, recorded in the store header."""

    def listing(self) -> Listing:
        root = self.root
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        refs: list[str] = []
        labels: list[int] = []
        if class_dirs:
            for label, d in enumerate(class_dirs):
                files = sorted(_image_files(d))
                refs += [f.relative_to(root).as_posix() for f in files]
                labels += [label] * len(files)
            classes = tuple(d.name for d in class_dirs)
            listing = Listing(refs=refs, labels=np.asarray(labels, np.int64), classes=classes)
        else:
            refs = [f.relative_to(root).as_posix() for f in sorted(_image_files(root))]
            listing = Listing(refs=refs, labels=None)
        if not refs:
            exts = ", ".join(IMG_EXTENSIONS)
            raise InputError(f"{root}/: no images found (looked for {exts})")
        return listing

    def load(self, ref: str) -> Any:
        return _open_rgb(self.root / ref)

    def location(self, ref: str) -> str:
        return str(self.root / ref)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.root)}


def _image_files(folder: Path) -> list[Path]:
    return [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]


@dataclass(frozen=True, slots=True)
class TableSource:
    """A CSV or Parquet list of image paths with an optional `label` column."""

    path: Path
    """The `.csv` or `.parquet` file."""
    image_root: Path
    """Folder that relative image paths are resolved against."""
    kind: str = field(default="table", init=False)
    """Source kind, recorded in the store header."""

    def listing(self) -> Listing:
        table = _read_table(self.path)
        where = str(self.path)
        names = list(table.column_names)
        col = next((c for c in PATH_COLUMNS if c in names), None)
        if col is None:
            raise InputError(
                f"{where}: no image path column (expected one of {', '.join(PATH_COLUMNS)}; "
                f"found {', '.join(names) or 'none'})"
            )
        paths = table.column(col).to_pylist()
        if not paths:
            raise InputError(f"{where}: the listing has no rows")
        for i, p in enumerate(paths):
            if not isinstance(p, str) or not p:
                raise InputError(f"{where}: row {i}: column {col!r} is empty or not a string")
        if LABEL_COLUMN not in names:
            return Listing(refs=paths, labels=None)
        raw = table.column(LABEL_COLUMN).to_pylist()
        bad = next((i for i, v in enumerate(raw) if v is None), None)
        if bad is not None:
            raise InputError(f"{where}: row {bad}: label is missing")
        if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
            labels = np.asarray(raw, np.int64)
            if labels.min() < 0:
                raise InputError(f"{where}: row {int(labels.argmin())}: negative label")
            return Listing(refs=paths, labels=labels)
        names_ = [str(v) for v in raw]
        classes = tuple(sorted(set(names_)))
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[v] for v in names_], np.int64)
        return Listing(refs=paths, labels=labels, classes=classes)

    def _resolve(self, ref: str) -> Path:
        p = Path(ref)
        return p if p.is_absolute() else self.image_root / p

    def load(self, ref: str) -> Any:
        return _open_rgb(self._resolve(ref))

    def location(self, ref: str) -> str:
        return str(self._resolve(ref))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "root": str(self.path), "image_root": str(self.image_root)}


def _read_table(path: Path) -> Any:
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pacsv

        return pacsv.read_csv(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as err:  # pyarrow.ArrowInvalid is a ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: cannot read the listing: {first}") from None


# --- CIFAR python format ------------------------------------------------------


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Rebuilds builtins (dict, list, bytes, int, str) and numpy arrays, nothing else."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # protocol-2 encoding of bytes written by Python 3
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar_file(path: Path) -> dict[str, Any]:
    """One CIFAR batch/meta file as a dict with str keys; `InputError` if unreadable or unsafe."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    try:
        obj = _ArraysOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # a hostile or damaged pickle can raise nearly anything
        raise InputError(f"{path}: not a CIFAR python file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not a CIFAR python file (top level is {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


@functools.lru_cache(maxsize=2)
def _cifar_pixels(path: str) -> np.ndarray:
    """[N, 32, 32, 3] uint8 images of one batch file (cached per process)."""
    data = np.asarray(load_cifar_file(Path(path))["data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@dataclass(frozen=True, slots=True)
class CifarSource:
    """A CIFAR-10 (`data_batch_*`, `test_batch`) or CIFAR-100 (`train`, `test`) directory.

    These are the user's local dataset files; they are pickles, read by a
    restricted unpickler that only rebuilds builtins and numpy arrays.
    """

    root: Path
    """The `cifar-10-batches-py` or `cifar-100-python` folder."""
    split: str = "train"
    """"train" or "test"."""
    kind: str = field(default="cifar", init=False)
    """Source kind, recorded in the store header."""

    @property
    def variant(self) -> str:
        """ "cifar10" or "cifar100"."""
        return "cifar100" if (self.root / "meta").is_file() else "cifar10"

    def files(self) -> tuple[str, ...]:
        """Batch files of the split, in id order."""
        if self.variant == "cifar100":
            return (self.split,)
        return CIFAR10_TRAIN if self.split == "train" else ("test_batch",)

    def listing(self) -> Listing:
        refs: list[str] = []
        labels: list[np.ndarray] = []
        key = "fine_labels" if self.variant == "cifar100" else "labels"
        for name in self.files():
            batch = load_cifar_file(self.root / name)
            if "data" not in batch or key not in batch:
                raise InputError(f"{self.root / name}: CIFAR file lacks 'data' or {key!r}")
            n = len(batch[key])
            if np.shape(batch["data"]) != (n, 3072):
                raise InputError(
                    f"{self.root / name}: 'data' has shape {np.shape(batch['data'])}, "
                    f"expected ({n}, 3072)"
                )
            refs += [f"{name}#{i}" for i in range(n)]
            labels.append(np.asarray(batch[key], np.int64))
        meta_name = "meta" if self.variant == "cifar100" else "batches.meta"
        classes: tuple[str, ...] = ()
        if (self.root / meta_name).is_file():
            meta = load_cifar_file(self.root / meta_name)
            names = meta.get("fine_label_names", meta.get("label_names", []))
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return Listing(refs=refs, labels=np.concatenate(labels), classes=classes)

    def load(self, ref: str) -> Any:
        from PIL import Image

        name, row = ref.rsplit("#", 1)
        return Image.fromarray(_cifar_pixels(str(self.root / name))[int(row)], mode="RGB")

    def location(self, ref: str) -> str:
        return str(self.root / ref)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.variant, "root": str(self.root), "split": self.split}


def _is_cifar(root: Path) -> bool:
    cifar10 = (root / "data_batch_1").is_file() or (root / "test_batch").is_file()
    cifar100 = (root / "meta").is_file() and (root / "train").is_file()
    return cifar10 or cifar100


# --- digits ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_pixels() -> np.ndarray:
    """[1797, 8, 8] uint8 grey levels (sklearn's 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    return np.round(images * (255.0 / 16.0)).astype(np.uint8)


@dataclass(frozen=True, slots=True)
class DigitsSource:
    """scikit-learn's bundled digits (offline), as 8x8 RGB images; ids = row numbers."""

    kind: str = field(default="digits", init=False)
    """Source kind, recorded in the store header."""

    def listing(self) -> Listing:
        from sklearn.datasets import load_digits

        target = load_digits().target.astype(np.int64)
        return Listing(
            refs=[str(i) for i in range(target.size)],
            labels=target,
            classes=tuple(str(c) for c in range(10)),
        )

    def load(self, ref: str) -> Any:
        from PIL import Image

        return Image.fromarray(_digits_pixels()[int(ref)], mode="L").convert("RGB")

    def location(self, ref: str) -> str:
        return f"digits#{ref}"

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


def open_source(
    images: str | Path, *, split: str | None = None, image_root: str | Path | None = None
) -> Source:
    """The source `images` names: "digits", a CIFAR directory, a CSV/Parquet file or a folder.

    `split` ("train" or "test") applies to CIFAR only; `image_root` to tables only.
    """
    if split not in (None, *CIFAR_SPLITS):
        raise InputError(f"--split must be 'train' or 'test', got {split!r}")
    if str(images) == "digits":
        if split is not None or image_root is not None:
            raise InputError("digits takes no --split or --image-root")
        return DigitsSource()
    path = Path(images).expanduser().resolve()
    if not path.exists():
        raise InputError(
            f"{images}: no such file or directory (expected 'digits', an image folder, "
            "a CIFAR python directory or a .csv/.parquet listing)"
        )
    if path.is_file():
        if path.suffix.lower() not in (".csv", ".parquet"):
            raise InputError(f"{images}: a listing file must end in .csv or .parquet")
        if split is not None:
            raise InputError("--split only applies to CIFAR directories")
        root = Path(image_root).expanduser().resolve() if image_root else path.parent
        return TableSource(path=path, image_root=root)
    if image_root is not None:
        raise InputError("--image-root only applies to a .csv/.parquet listing")
    if _is_cifar(path):
        return CifarSource(root=path, split=split or "train")
    if split is not None:
        raise InputError("--split only applies to CIFAR directories")
    return ImageFolderSource(root=path)
