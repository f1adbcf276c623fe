"""Decode an image dataset once into compact uint8 ``.npy`` arrays (plus ``meta.json``).

Sources: a ``.tar.gz`` ImageFolder archive, an ImageFolder directory, or torchvision CIFAR pickle folders.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

# 2: meta.json records the source's signature and the arrays' content hash (folders of version 1 are
# decoded again once).
FORMAT_VERSION = 2
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
_PROGRESS_EVERY = 512  # callbacks per image would dominate the decode time of tiny images

Progress = Callable[[int, int], None]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """One-line, user-facing problem with input data (message names the file)."""


@dataclass(frozen=True)
class PreparedData:
    train_x: np.ndarray  # uint8 [N, H, W, 3], memory-mapped read-only
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    mean: tuple[float, float, float]  # per-channel mean of train_x / 255
    std: tuple[float, float, float]
    path: Path  # the folder holding the arrays
    content_hash: str = ""  # sha256 of the arrays' bytes, recorded by prepare: the data's identity


# The reference code's CIFAR-10 constants (its datasets.py). The std is smaller than the pixel std over the
# training set (0.247, 0.243, 0.261), as in many CIFAR codebases; used as is so inputs scale as in the reference.
REFERENCE_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
REFERENCE_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NORMALIZATIONS = ("auto", "dataset", "reference")


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std that inputs are normalized with, and where they come from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "reference" (the reference code's CIFAR-10 constants) or "dataset" (train-set statistics)


def is_cifar10(data: PreparedData) -> bool:
    """CIFAR-10 by its content: its 10 class names, 5000 train / 1000 test images per class, and a train-set
    mean within 0.01 of CIFAR-10's (a decoded or resized copy keeps it; another dataset with those names would not)."""
    if tuple(c.lower() for c in data.classes) != CIFAR10_CLASSES:
        return False
    train_counts = np.bincount(np.asarray(data.train_y), minlength=10)
    test_counts = np.bincount(np.asarray(data.test_y), minlength=10)
    if not ((train_counts == 5000).all() and (test_counts == 1000).all()):
        return False
    return bool(np.allclose(data.mean, REFERENCE_CIFAR10_MEAN, atol=0.01))


def normalization(data: PreparedData, choice: str = "auto") -> Normalization:
    """The normalization of ``data.normalization``: ``reference`` = the reference code's CIFAR-10 constants (on any
    data), ``dataset`` = the prepared training set's statistics, ``auto`` = reference when ``data`` is CIFAR-10."""
    if choice not in NORMALIZATIONS:
        raise ValueError(f"data.normalization={choice!r} is invalid: allowed {', '.join(map(repr, NORMALIZATIONS))}")
    if choice == "reference" or (choice == "auto" and is_cifar10(data)):
        return Normalization(REFERENCE_CIFAR10_MEAN, REFERENCE_CIFAR10_STD, "reference")
    return Normalization(data.mean, data.std, "dataset")


@dataclass
class _Plan:
    """What a source holds, known before any pixel is decoded."""

    kind: str
    classes: list[str]
    labels: dict[str, np.ndarray]  # split -> int64 labels in output order
    images: Iterator[tuple[str, int, np.ndarray]]  # (split, output index, HxWx3 uint8), any order


def prepared_path(source: str | Path, prepared_dir: str | Path, image_size: int) -> Path:
    """Folder keyed by the source AND size: f"{slug}-{image_size}px-{sha256(resolved source path)[:8]}"
    under prepared_dir, slug = sanitized file/dir name without .tar.gz/.tgz."""
    resolved = Path(source).expanduser().resolve()
    name = resolved.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:8]
    return Path(prepared_dir) / f"{slug}-{int(image_size)}px-{digest}"


def source_signature(src: Path) -> str:
    """The source as it is on disk now: a file's size and mtime (ns); for a folder, every file's path,
    size and mtime. A replaced archive or an edited folder at the same path gets a new signature."""
    h = hashlib.sha256()
    if src.is_dir():
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.relative_to(src).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = src.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _same_source(meta: dict, src: Path) -> bool:
    """Whether a prepared folder was decoded from ``src`` as it is now (True when src is gone: the
    prepared arrays are all there is, e.g. after `dvc pull` on a machine without the archive)."""
    if not src.exists():
        return True
    if "source_signature" in meta:
        return bool(meta["source_signature"] == source_signature(src))
    # Folders prepared before signatures were recorded: an archive's size and mtime still tell.
    st = src.stat()
    return src.is_file() and meta.get("source_size") == st.st_size and meta.get("source_mtime") == st.st_mtime


def prepare_dataset(
    source: str | Path,
    prepared_dir: str | Path,
    image_size: int,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Decode source into prepared_path(...); returns that folder. If it already exists complete
    (meta.json present) and not force: return it without re-decoding.

    ``progress(done, total)`` is called periodically with counts of decoded images.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    src = Path(source).expanduser()
    target = prepared_path(src, prepared_dir, image_size)
    meta = _read_meta(target)
    if not force and meta is not None:
        if _same_source(meta, src):
            return target
        log.info("%s changed since it was prepared into %s; decoding it again", src, target)
    if not src.exists():
        raise DataError(f"{src}: dataset source not found (no such file or directory)")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed run that had our pid
    try:
        tmp.mkdir()
        signature = source_signature(src)  # before reading: a change while decoding shows up next time
        plan = _plan(src, image_size)
        counts, mean, std = _write_arrays(src, tmp, plan, image_size, progress)
        stat = src.stat()
        meta = {
            "format_version": FORMAT_VERSION,
            "source": str(src.resolve()),
            "source_kind": plan.kind,
            "source_size": stat.st_size,
            "source_mtime": stat.st_mtime,
            "source_signature": signature,
            "content_hash": _content_hash(tmp),
            "image_size": image_size,
            "classes": plan.classes,
            "counts": counts,
            "mean": mean,
            "std": std,
        }
        # meta.json last: its presence is what marks a folder complete.
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_prepared(source: str | Path, prepared_dir: str | Path, image_size: int) -> PreparedData:
    """Open arrays written by prepare_dataset (np.load mmap_mode='r'); if missing raise DataError
    saying to run `mocosfl prepare` first."""
    target = prepared_path(source, prepared_dir, image_size)
    meta = _read_meta(target)
    if meta is None:
        raise DataError(f"{target}: no prepared data for {source} at {image_size}px; run `mocosfl prepare` first")
    arrays: dict[str, Any] = {}
    held = meta.get("held_rows")  # a host's share of the images (``export_held_rows``), else None
    for split in SPLITS:
        parts = ("x", "y", "rows") if held else ("x", "y")
        for part in parts:
            file = target / f"{split}_{part}.npy"
            try:
                arrays[f"{split}_{part}"] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(
                    f"{file}: cannot read prepared array ({_one_line(exc)}); "
                    f"delete {target} and run `mocosfl prepare` again"
                ) from None
        n = meta["counts"][split]
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        rows = len(arrays[f"{split}_rows"]) if held else n
        if x.shape != (rows, image_size, image_size, 3) or x.dtype != np.uint8 or y.shape != (n,):
            raise DataError(
                f"{target / (split + '_x.npy')}: arrays do not match meta.json; "
                f"delete {target} and run `mocosfl prepare` again"
            )
        if held:
            arrays[f"{split}_x"] = HeldRows(x, np.asarray(arrays.pop(f"{split}_rows")), n, str(target))
    return PreparedData(
        train_x=arrays["train_x"],
        train_y=arrays["train_y"],
        test_x=arrays["test_x"],
        test_y=arrays["test_y"],
        classes=list(meta["classes"]),
        mean=tuple(float(v) for v in meta["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in meta["std"]),  # type: ignore[arg-type]
        path=target,
        content_hash=str(meta.get("content_hash", "")),
    )


class HeldRows:
    """The images of a split a host holds, addressed by their index in the whole split.

    A client host of a distributed run holds only its clients' training images, the server only the
    validation images (``export_held_rows``); asking for any other image raises ``DataError``. ``shape``
    is the whole split's, so the data's identity (``workflow.Dataset.fingerprint``) is the same on every host.
    """

    def __init__(self, pixels: np.ndarray, rows: np.ndarray, total: int, where: str):
        self.pixels = pixels  # [len(rows), H, W, 3] uint8, in the order of ``rows`` (sorted)
        self.rows = rows
        self.slot = np.full(total, -1, dtype=np.int64)
        self.slot[rows] = np.arange(len(rows))
        self.shape = (total, *pixels.shape[1:])
        self.dtype = pixels.dtype
        self.where = where

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        wanted = np.arange(self.shape[0])[idx]  # any numpy index: ints, arrays, masks, slices
        slots = self.slot[wanted]
        if np.any(slots < 0):
            missing = int(np.asarray(wanted)[np.asarray(slots) < 0].flat[0])
            raise DataError(
                f"{self.where} holds {len(self.rows)} of {self.shape[0]} images of this split, not image {missing}: "
                "this host's data was exported for another role (`mocosfl host-data`)"
            )
        return np.asarray(self.pixels[slots])


def export_held_rows(data: PreparedData, out_dir: str | Path, rows: Mapping[str, np.ndarray]) -> Path:
    """Copy ``data`` into ``out_dir`` (same folder name) keeping only the images ``rows[split]`` (indices into
    each split; a split left out keeps none). Labels, classes, statistics and the content hash stay those of
    the whole set, so runs on the copy have the same identity as on the original. Returns the new folder."""
    meta = _read_meta(data.path)
    if meta is None:
        raise DataError(f"{data.path}: not a complete prepared folder")
    target = Path(out_dir) / data.path.name
    if target.resolve() == data.path.resolve():
        raise DataError(f"{out_dir}: exporting a host's share of the data over the whole set would delete the rest")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        held = {}
        for split in SPLITS:
            x = data.train_x if split == "train" else data.test_x
            y = data.train_y if split == "train" else data.test_y
            keep = np.unique(np.asarray(rows.get(split, np.empty(0)), dtype=np.int64))
            if len(keep) and (keep[0] < 0 or keep[-1] >= len(y)):
                raise DataError(f"image index out of range for the {len(y)} {split} images")
            np.save(tmp / f"{split}_x.npy", np.asarray(x[keep]).reshape(len(keep), *x.shape[1:]))
            np.save(tmp / f"{split}_y.npy", np.asarray(y))
            np.save(tmp / f"{split}_rows.npy", keep)
            held[split] = len(keep)
        (tmp / "meta.json").write_text(json.dumps(meta | {"held_rows": held}, indent=2) + "\n")
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------- output


def _read_meta(target: Path) -> dict | None:
    """meta.json of a complete folder in the current format, else None."""
    try:
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta


def _move_into_place(tmp: Path, target: Path) -> None:
    old = target.with_name(f"{target.name}.old-{os.getpid()}")
    if target.exists():
        # os.replace cannot overwrite a non-empty directory: move the stale one aside first.
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        if _read_meta(target) is None:
            raise
        # Another process finished the same folder first; its copy is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _write_arrays(
    src: Path, tmp: Path, plan: _Plan, image_size: int, progress: Progress | None
) -> tuple[dict[str, int], list[float], list[float]]:
    counts = {split: len(plan.labels[split]) for split in SPLITS}
    total = sum(counts.values())
    # Written through memmaps: decoding never needs the whole output array in memory.
    outs = {
        split: np.lib.format.open_memmap(
            tmp / f"{split}_x.npy", mode="w+", dtype=np.uint8, shape=(n, image_size, image_size, 3)
        )
        for split, n in counts.items()
    }
    seen = {split: np.zeros(n, dtype=bool) for split, n in counts.items()}
    if progress:
        progress(0, total)
    done = 0
    for split, index, image in plan.images:
        outs[split][index] = image
        if not seen[split][index]:
            seen[split][index] = True
            done += 1
            if progress and done % _PROGRESS_EVERY == 0:
                progress(done, total)
    if done != total:
        raise DataError(f"{src}: yielded {done} of {total} listed images; modified while reading?")
    if progress and total % _PROGRESS_EVERY:
        progress(total, total)
    for split in SPLITS:
        outs[split].flush()
        np.save(tmp / f"{split}_y.npy", plan.labels[split].astype(np.int64))
    mean, std = _channel_stats(outs["train"])
    del outs  # close the memmaps before the folder is renamed
    return counts, mean, std


def _content_hash(folder: Path) -> str:
    """sha256 over the arrays' files (headers included), streamed: what was decoded, machine-independent."""
    h = hashlib.sha256()
    for split in SPLITS:
        for part in ("x", "y"):
            with open(folder / f"{split}_{part}.npy", "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()[:16]


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std of x / 255 from a 256-bin histogram (no float copy of x)."""
    hist = np.zeros((3, 256), dtype=np.int64)
    chunk = max(1, (1 << 22) // max(1, x.shape[1] * x.shape[2]))
    for start in range(0, len(x), chunk):
        pixels = np.asarray(x[start : start + chunk]).reshape(-1, 3)
        for c in range(3):
            hist[c] += np.bincount(pixels[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = hist.sum(axis=1)
    mean = hist @ values / n
    var = np.maximum(hist @ values**2 / n - mean**2, 0.0)
    return [float(v) for v in mean], [float(v) for v in np.sqrt(var)]


# ---------------------------------------------------------------- sources


def _plan(src: Path, image_size: int) -> _Plan:
    if src.is_file():
        if src.name.lower().endswith(_ARCHIVE_SUFFIXES):
            return _tar_plan(src, image_size)
    elif src.is_dir():
        for dirname, plan in (("cifar-10-batches-py", _cifar10_plan), ("cifar-100-python", _cifar100_plan)):
            if src.name == dirname:
                return plan(src, image_size)
            if (src / dirname).is_dir():
                return plan(src / dirname, image_size)
        if any((src / split).is_dir() for split in SPLITS):
            return _folder_plan(src, image_size)
    raise DataError(
        f"{src}: unrecognized dataset source (expected a .tar.gz/.tgz ImageFolder archive, a folder "
        "with train/ and test/ class folders, or a cifar-10-batches-py / cifar-100-python folder)"
    )


def _decode(data: bytes | Path, image_size: int, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            rgb = img.convert("RGB")  # convert() forces the full decode, so truncation shows here
    except UnidentifiedImageError:
        raise DataError(f"{name}: cannot decode image (not a recognized image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: cannot decode image ({_one_line(exc)})") from None
    return _to_array(rgb, image_size)


def _to_array(img: Image.Image, image_size: int) -> np.ndarray:
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _is_hidden(name: str) -> bool:
    # Dotfiles and macOS "._x.jpg" / __MACOSX companions are metadata, not images.
    return name.startswith(".") or name == "__MACOSX"


def _is_image(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _index(
    tree: Mapping[str, Mapping[str, Collection[str]]], where: Callable[[str], str]
) -> tuple[list[str], dict[str, list[tuple[str, str, int]]]]:
    """Check an ImageFolder tree (split -> class -> image names) and order it by class, then name.

    Returns the classes and, per split, (class, name, label) in output order.
    """
    for split in SPLITS:
        if split not in tree:
            raise DataError(
                f"{where(split + '/')}: missing {split}/ split "
                "(expected train/<class>/ and test/<class>/ image folders)"
            )
        if not tree[split]:
            raise DataError(f"{where(split + '/')}: no class folders in {split}/")
        for cls, names in sorted(tree[split].items()):
            if not names:
                raise DataError(
                    f"{where(f'{split}/{cls}/')}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
    train, test = set(tree["train"]), set(tree["test"])
    if train != test:
        raise DataError(
            f"{where('')}: train/ and test/ class folders differ: "
            f"only in train/: {sorted(train - test)}; only in test/: {sorted(test - train)}"
        )
    classes = sorted(train)
    order = {
        split: [(cls, name, label) for label, cls in enumerate(classes) for name in sorted(tree[split][cls])]
        for split in SPLITS
    }
    return classes, order


def _labels(order: dict[str, list[tuple[str, str, int]]]) -> dict[str, np.ndarray]:
    return {split: np.array([item[2] for item in items], dtype=np.int64) for split, items in order.items()}


def _folder_plan(root: Path, image_size: int) -> _Plan:
    tree: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        tree[split] = {}
        for class_dir in split_dir.iterdir():
            if class_dir.is_dir() and not _is_hidden(class_dir.name):
                tree[split][class_dir.name] = [f.name for f in class_dir.iterdir() if _is_image(f.name) and f.is_file()]
    classes, order = _index(tree, lambda rel: str(root / rel))

    def images() -> Iterator[tuple[str, int, np.ndarray]]:
        for split in SPLITS:
            for index, (cls, name, _) in enumerate(order[split]):
                file = root / split / cls / name
                yield split, index, _decode(file, image_size, str(file))

    return _Plan("folder", classes, _labels(order), images())


def _tar_entries(archive: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[tarfile.TarInfo, bytes | None]]:
    """Stream (member, bytes if wanted(name) else None) from a .tar.gz, errors as DataError."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                data = None
                if member.isfile() and wanted(member.name):
                    fileobj = tar.extractfile(member)
                    data = fileobj.read() if fileobj else None
                yield member, data
            # tarfile stops at the end-of-archive block (and reads a damaged header as the end);
            # draining the gzip stream checks its CRC, so corruption anywhere still surfaces.
            while tar.fileobj is not None and tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"{archive}: corrupt or truncated .tar.gz archive ({_one_line(exc)})") from None


def _member_parts(name: str) -> tuple[str, ...]:
    # Drops "./" prefixes, doubled slashes and a leading "/", so equal paths compare equal.
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _split_member(parts: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(root prefix, parts below it) when parts lies at [<top>/]<split>/..., else None."""
    if parts and parts[0] in SPLITS:
        return "", parts
    if len(parts) > 1 and parts[1] in SPLITS:
        return parts[0] + "/", parts[1:]
    return None


def _tar_plan(archive: Path, image_size: int) -> _Plan:
    # Pass 1 reads only headers: it fixes the output order and total, and catches layout errors
    # before any decoding. Pass 2 decodes. Re-reading the gzip stream costs ~2 s for CIFAR-10.
    entries: list[tuple[str, tuple[str, ...], bool]] = []  # (root prefix, parts from split on, is_dir)
    for member, _ in _tar_entries(archive, lambda _name: False):
        parts = _member_parts(member.name)
        if any(_is_hidden(p) for p in parts) or (located := _split_member(parts)) is None:
            continue
        entries.append((*located, member.isdir()))

    # One dataset root: either the archive top or a single top-level folder.
    roots = {prefix for prefix, rel, is_dir in entries if len(rel) == 3 and not is_dir and _is_image(rel[2])}
    if len(roots) != 1:
        found = "no train/<class>/<image> files" if not roots else f"several dataset roots {sorted(roots)}"
        raise DataError(f"{archive}: {found}; expected [<folder>/]train/<class>/ and test/<class>/ images")
    (root,) = roots

    tree: dict[str, dict[str, set[str]]] = {}
    for prefix, rel, is_dir in entries:
        if prefix != root:
            continue
        split_classes = tree.setdefault(rel[0], {})
        if len(rel) == 2 and not is_dir:
            continue  # a stray file directly in train/ is not a class
        if len(rel) >= 2:
            names = split_classes.setdefault(rel[1], set())  # a set: a tar may hold a path twice
            if len(rel) == 3 and not is_dir and _is_image(rel[2]):
                names.add(rel[2])
    classes, order = _index(tree, lambda rel: f"{archive} (member {root}{rel})")
    position = {
        f"{root}{split}/{cls}/{name}": (split, index)
        for split in SPLITS
        for index, (cls, name, _) in enumerate(order[split])
    }

    def images() -> Iterator[tuple[str, int, np.ndarray]]:
        for member, data in _tar_entries(archive, lambda name: "/".join(_member_parts(name)) in position):
            if data is not None:
                split, index = position["/".join(_member_parts(member.name))]
                yield split, index, _decode(data, image_size, f"{archive} (member {member.name})")

    return _Plan("tar.gz", classes, _labels(order), images())


def _unpickle(file: Path) -> dict[str, object]:
    if not file.is_file():
        raise DataError(f"{file}: missing CIFAR batch file")
    try:
        with file.open("rb") as f:
            # latin1 is how torchvision reads these Python-2 pickles (numpy arrays inside).
            obj = pickle.load(f, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - unpickling damaged bytes can raise almost any type
        raise DataError(f"{file}: cannot read CIFAR batch ({_one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{file}: not a CIFAR batch (expected a dict, got {type(obj).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_batch(file: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(file)
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"{file}: not a CIFAR batch (bad or missing key {_one_line(exc)})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(f"{file}: not a CIFAR batch (data {data.shape}, {len(labels)} labels)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{file}: labels outside 0..{num_classes - 1}")
    # Pickles store planes (N, 3, 32, 32); the arrays we write are channels-last.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _cifar_names(file: Path, key: str) -> list[str]:
    names = _unpickle(file).get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{file}: no {key!r} list of class names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_plan(
    root: Path, kind: str, classes: list[str], label_key: str, batches: dict[str, list[str]], image_size: int
) -> _Plan:
    # Original CIFAR order is kept (it is already canonical: test index i is CIFAR test image i).
    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    for split, names in batches.items():
        parts = [_cifar_batch(root / name, label_key, len(classes)) for name in names]
        xs[split] = np.concatenate([x for x, _ in parts])
        ys[split] = np.concatenate([y for _, y in parts])

    def images() -> Iterator[tuple[str, int, np.ndarray]]:
        for split in SPLITS:
            for index, image in enumerate(xs[split]):
                if image_size != 32:
                    image = _to_array(Image.fromarray(image), image_size)
                yield split, index, image

    return _Plan(kind, classes, ys, images())


def _cifar10_plan(root: Path, image_size: int) -> _Plan:
    classes = _cifar_names(root / "batches.meta", "label_names")
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar_plan(root, "cifar10", classes, "labels", batches, image_size)


def _cifar100_plan(root: Path, image_size: int) -> _Plan:
    classes = _cifar_names(root / "meta", "fine_label_names")
    batches = {"train": ["train"], "test": ["test"]}
    return _cifar_plan(root, "cifar100", classes, "fine_labels", batches, image_size)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
