"""Tests for mocosfl.data.prepare: decoding image datasets once into uint8 arrays.

Synthetic ImageFolder trees, .tar.gz archives and CIFAR pickles are built in tmp_path with PIL.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mocosfl.data import prepare as prep
from mocosfl.data.prepare import DataError, load_prepared, prepare_dataset, prepared_path

CLASSES = ["bird", "cat", "dog"]
TRAIN_PER_CLASS = 4
TEST_PER_CLASS = 2
REAL_ARCHIVE = Path(__file__).parents[1] / "../shared/data/cifar10-jpeg.tar.gz"


def color(split: str, label: int, i: int) -> tuple[int, int, int]:
    """A distinct solid colour per image, so output order can be read back from the pixels."""
    return (20 * label + i, 100 + (split == "test") * 50 + i, 250 - 30 * label)


def make_tree(root: Path, size: int = 40, classes: list[str] = CLASSES) -> Path:
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), color(split, label, i)).save(folder / f"{i:03d}.png")
    return root


def make_tar(tree: Path, archive: Path, top: str | None = "mini") -> Path:
    """Pack tree into archive, members in reverse-sorted order so the output must sort them."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(tree.rglob("*"), reverse=True):
            rel = path.relative_to(tree).as_posix()
            tar.add(path, arcname=f"{top}/{rel}" if top else rel, recursive=False)
    return archive


def add_member(archive: Path, name: str, data: bytes | None) -> None:
    """Rewrite archive with one extra file member (or directory member when data is None)."""
    with tarfile.open(archive, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    info = tarfile.TarInfo(name)
    if data is None:
        info.type = tarfile.DIRTYPE
    else:
        info.size = len(data)
    with tarfile.open(archive, "w:gz") as tar:
        for member, content in [*members, (info, data)]:
            tar.addfile(member, io.BytesIO(content) if content is not None else None)


def expected_pixels(split: str) -> np.ndarray:
    n = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
    return np.array([color(split, label, i) for label in range(len(CLASSES)) for i in range(n)], np.uint8)


def assert_clean(prepared_dir: Path) -> None:
    """Nothing half-written: neither the target nor a temp folder remains."""
    assert not prepared_dir.exists() or list(prepared_dir.iterdir()) == []


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "mini")


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    return make_tar(make_tree(tmp_path / "src"), tmp_path / "mini.tar.gz")


def check_mini(data: prep.PreparedData, size: int = 32) -> None:
    assert data.classes == CLASSES
    for split, x, y in (("train", data.train_x, data.train_y), ("test", data.test_x, data.test_y)):
        n = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
        assert x.shape == (n * len(CLASSES), size, size, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64
        assert y.tolist() == [label for label in range(len(CLASSES)) for _ in range(n)]
        # Solid colours survive the bicubic resize, so each image's centre identifies it.
        np.testing.assert_allclose(x[:, size // 2, size // 2].astype(int), expected_pixels(split), atol=1)
    pixels = np.asarray(data.train_x, dtype=np.float64) / 255
    np.testing.assert_allclose(data.mean, pixels.mean(axis=(0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(data.std, pixels.std(axis=(0, 1, 2)), atol=1e-9)


# ---------------------------------------------------------------- sources


def test_folder_source(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    path = prepare_dataset(tree, out, 32)
    assert path == prepared_path(tree, out, 32)
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "test_x.npy",
        "test_y.npy",
        "train_x.npy",
        "train_y.npy",
    ]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["counts"] == {"train": 12, "test": 6} and meta["image_size"] == 32
    assert meta["source"] == str(tree.resolve()) and meta["classes"] == CLASSES
    data = load_prepared(tree, out, 32)
    check_mini(data)
    assert data.path == path
    assert isinstance(data.train_x, np.memmap) and not data.train_x.flags.writeable


@pytest.mark.parametrize("top", ["mini", None])
def test_tar_source_matches_folder(tree: Path, tmp_path: Path, top: str | None) -> None:
    archive = make_tar(tree, tmp_path / "mini.tgz", top=top)
    out = tmp_path / "prepared"
    prepare_dataset(archive, out, 32)
    prepare_dataset(tree, out, 32)
    from_tar, from_folder = load_prepared(archive, out, 32), load_prepared(tree, out, 32)
    check_mini(from_tar)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(from_tar, name), getattr(from_folder, name))


def test_resize_and_rgb_conversion(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "mini", size=24)
    Image.new("L", (24, 24), 77).save(tree / "train" / "cat" / "gray.png")  # sorts after 003.png
    out = tmp_path / "prepared"
    prepare_dataset(tree, out, 16)
    data = load_prepared(tree, out, 16)
    assert data.train_x.shape == (13, 16, 16, 3) and data.test_x.shape == (6, 16, 16, 3)
    assert (data.train_x[TRAIN_PER_CLASS * 2] == 77).all()
    assert data.train_y[TRAIN_PER_CLASS * 2] == 1


def test_hidden_and_non_image_files_are_ignored(archive: Path, tree: Path, tmp_path: Path) -> None:
    (tree / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    add_member(archive, "mini/train/cat/._000.png", b"AppleDouble junk")
    add_member(archive, "__MACOSX/mini/train/cat/._000.png", b"junk")
    out = tmp_path / "prepared"
    for source in (tree, archive):
        prepare_dataset(source, out, 32)
        check_mini(load_prepared(source, out, 32))


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def fake_cifar10(root: Path) -> tuple[list[np.ndarray], list[int]]:
    """cifar-10-batches-py with 2 images per batch, keys as bytes like the Python-2 originals."""
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(10)]
    write_pickle(root / "batches.meta", {b"label_names": [n.encode() for n in names]})
    images, labels = [], []
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
        batch_labels = [(2 * k) % 10, (2 * k + 7) % 10]
        rows = batch.transpose(0, 3, 1, 2).reshape(2, -1)  # CIFAR stores channel planes
        write_pickle(root / name, {b"data": rows, b"labels": batch_labels, b"batch_label": name.encode()})
        images.append(batch)
        labels += batch_labels
    return images, labels


def test_cifar10_pickles(tmp_path: Path) -> None:
    images, labels = fake_cifar10(tmp_path / "cifar" / "cifar-10-batches-py")
    out = tmp_path / "prepared"
    for source in (tmp_path / "cifar", tmp_path / "cifar" / "cifar-10-batches-py"):
        prepare_dataset(source, out, 32)
        data = load_prepared(source, out, 32)
        assert data.classes == [f"class{i}" for i in range(10)]
        np.testing.assert_array_equal(data.train_x, np.concatenate(images[:5]))
        np.testing.assert_array_equal(data.test_x, images[5])
        assert data.train_y.tolist() == labels[:10] and data.test_y.tolist() == labels[10:]
    prepare_dataset(tmp_path / "cifar", out, 40)
    assert load_prepared(tmp_path / "cifar", out, 40).train_x.shape == (10, 40, 40, 3)


def test_cifar100_pickles_use_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    fine = [f"fine{i:02d}" for i in range(100)]
    write_pickle(root / "meta", {"fine_label_names": fine, "coarse_label_names": ["c"] * 20})
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("test", 3)):
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        write_pickle(root / split, {"data": rows, "fine_labels": [99 - i for i in range(n)], "coarse_labels": [0] * n})
    out = tmp_path / "prepared"
    prepare_dataset(root, out, 32)
    data = load_prepared(root, out, 32)
    assert data.classes == fine
    assert data.train_y.tolist() == [99, 98, 97, 96, 95] and data.test_y.tolist() == [99, 98, 97]
    assert data.train_x.shape == (5, 32, 32, 3)


# ---------------------------------------------------------------- caching and keys


def test_second_call_does_not_redecode(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "prepared"
    calls: list[tuple[int, int]] = []
    path = prepare_dataset(tree, out, 32, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 18) and calls[-1] == (18, 18)
    stamp = (path / "meta.json").stat().st_mtime_ns

    def no_decoding(*_args: object) -> None:
        raise AssertionError("re-decoded a prepared dataset")

    with monkeypatch.context() as m:
        m.setattr(prep, "_plan", no_decoding)
        again: list[tuple[int, int]] = []
        assert prepare_dataset(tree, out, 32, progress=lambda d, t: again.append((d, t))) == path
        assert again == []
    assert (path / "meta.json").stat().st_mtime_ns == stamp

    time.sleep(0.01)
    assert prepare_dataset(tree, out, 32, force=True) == path
    assert (path / "meta.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # the replaced copy is gone
    check_mini(load_prepared(tree, out, 32))


def test_keys_separate_sources_and_sizes(
    tree: Path, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prepared"
    assert re.fullmatch(r"mini-32px-[0-9a-f]{8}", prepared_path(archive, out, 32).name)
    assert re.fullmatch(r"mini-32px-[0-9a-f]{8}", prepared_path(tree, out, 32).name)
    keys = {prepared_path(s, out, n) for s in (tree, archive) for n in (32, 64)}
    assert len(keys) == 4
    monkeypatch.chdir(tmp_path)
    assert prepared_path("mini", out, 32) == prepared_path(tree, out, 32)
    assert prepared_path("weird name!.TGZ", out, 8).name.startswith("weird-name-8px-")
    paths = {prepare_dataset(s, out, 32) for s in (tree, archive)}
    assert len(paths) == 2 and paths == {p for p in out.iterdir()}


def test_load_missing_says_to_prepare(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="run `mocosfl prepare` first"):
        load_prepared(tree, tmp_path / "prepared", 32)


def test_load_damaged_arrays(tree: Path, tmp_path: Path) -> None:
    path = prepare_dataset(tree, tmp_path / "prepared", 32)
    (path / "test_x.npy").write_bytes((path / "test_x.npy").read_bytes()[:200])
    with pytest.raises(DataError, match="test_x.npy"):
        load_prepared(tree, tmp_path / "prepared", 32)


def test_failure_mid_write_leaves_nothing(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(_x: np.ndarray) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(prep, "_channel_stats", boom)
    out = tmp_path / "prepared"
    with pytest.raises(RuntimeError):
        prepare_dataset(tree, out, 32)
    assert_clean(out)


def test_failed_force_keeps_previous_copy(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    path = prepare_dataset(tree, out, 32)
    (tree / "train" / "cat" / "001.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="001.png"):
        prepare_dataset(tree, out, 32, force=True)
    assert sorted(p.name for p in out.iterdir()) == [path.name]
    check_mini(load_prepared(tree, out, 32))


# ---------------------------------------------------------------- input errors


def expect_error(source: Path, tmp_path: Path, *fragments: str) -> str:
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as info:
        prepare_dataset(source, out, 32)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert_clean(out)
    return message


def test_missing_source(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.tar.gz", tmp_path, "nope.tar.gz", "not found")


def test_truncated_archive(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src")
    for png in tree.rglob("*.png"):  # noise does not compress, so half the file is half the data
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)).save(png)
    archive = make_tar(tree, tmp_path / "mini.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    expect_error(archive, tmp_path, str(archive), "truncated")


def test_not_a_gzip_archive(tmp_path: Path) -> None:
    archive = tmp_path / "mini.tar.gz"
    archive.write_bytes(b"this is not gzip data" * 10)
    expect_error(archive, tmp_path, str(archive), "corrupt")


def test_corrupted_archive_bytes(archive: Path, tmp_path: Path) -> None:
    data = bytearray(archive.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    archive.write_bytes(bytes(data))
    expect_error(archive, tmp_path, str(archive), "corrupt")


def test_undecodable_image_in_folder(tree: Path, tmp_path: Path) -> None:
    (tree / "train" / "dog" / "002.png").write_bytes(b"definitely not a png")
    expect_error(tree, tmp_path, str(tree / "train" / "dog" / "002.png"), "cannot decode")


def test_truncated_image_in_folder(tree: Path, tmp_path: Path) -> None:
    jpeg = tree / "test" / "cat" / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:600])
    expect_error(tree, tmp_path, str(jpeg), "cannot decode")


def test_undecodable_image_in_archive(archive: Path, tmp_path: Path) -> None:
    add_member(archive, "mini/train/cat/bad.jpg", b"\xff\xd8 broken jpeg")
    expect_error(archive, tmp_path, str(archive), "mini/train/cat/bad.jpg", "not a recognized image")


def test_empty_class_folder(tree: Path, tmp_path: Path) -> None:
    (tree / "train" / "emu").mkdir()
    Image.new("RGB", (8, 8)).save(tree / "train" / "emu" / "0.png")
    (tree / "test" / "emu").mkdir()
    (tree / "test" / "emu" / "readme.txt").write_text("no images here")
    expect_error(tree, tmp_path, str(tree / "test" / "emu"), "no images")


def test_empty_class_folder_in_archive(archive: Path, tmp_path: Path) -> None:
    add_member(archive, "mini/train/emu", None)
    expect_error(archive, tmp_path, str(archive), "mini/train/emu/", "no images")


def test_class_sets_differ(tree: Path, tmp_path: Path) -> None:
    (tree / "test" / "dog").rename(tree / "test" / "fox")
    message = expect_error(tree, tmp_path, str(tree))
    assert "only in train/: ['dog']" in message and "only in test/: ['fox']" in message


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_split(tree: Path, tmp_path: Path, split: str) -> None:
    shutil.rmtree(tree / split)
    expect_error(tree, tmp_path, str(tree / split), f"missing {split}/ split")


def test_missing_split_in_archive(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src")
    shutil.rmtree(tree / "test")
    archive = make_tar(tree, tmp_path / "mini.tar.gz")
    expect_error(archive, tmp_path, str(archive), "missing test/ split")


def test_unrecognized_sources(tmp_path: Path) -> None:
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    expect_error(folder, tmp_path, str(folder), "unrecognized")
    zipped = tmp_path / "data.zip"
    zipped.write_bytes(b"PK\x03\x04")
    expect_error(zipped, tmp_path, str(zipped), "unrecognized")


def test_archive_without_imagefolder_layout(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.png")
    archive = make_tar(src, tmp_path / "flat.tar.gz", top=None)
    expect_error(archive, tmp_path, str(archive), "train/<class>/")


def test_missing_cifar_batch(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    fake_cifar10(root)
    (root / "data_batch_3").unlink()
    expect_error(root, tmp_path, str(root / "data_batch_3"), "missing")


def test_corrupt_cifar_batch(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    fake_cifar10(root)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": b"x"})[:-3])
    expect_error(root, tmp_path, str(root / "test_batch"))
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    expect_error(root, tmp_path, str(root / "test_batch"), "not a CIFAR batch")


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_cifar10_archive(tmp_path: Path) -> None:
    if not REAL_ARCHIVE.is_file():
        pytest.skip(f"{REAL_ARCHIVE} not available")
    prepare_dataset(REAL_ARCHIVE, tmp_path, 32)
    data = load_prepared(REAL_ARCHIVE, tmp_path, 32)
    assert data.train_x.shape == (50000, 32, 32, 3) and data.test_x.shape == (10000, 32, 32, 3)
    assert data.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert np.bincount(data.train_y).tolist() == [5000] * 10
    assert np.bincount(data.test_y).tolist() == [1000] * 10
    # Known CIFAR-10 channel means; JPEG re-encoding moves them only slightly.
    np.testing.assert_allclose(data.mean, (0.4914, 0.4822, 0.4465), atol=0.005)


def test_a_hosts_share_holds_only_its_images_and_keeps_the_datas_identity(tree: Path, tmp_path: Path) -> None:
    """`mocosfl host-data`'s copy: the chosen training images, no test images, everything else as the whole set."""
    whole = load_prepared(tree, prepare_dataset(tree, tmp_path / "p", 8).parent, 8)
    share = prep.export_held_rows(whole, tmp_path / "host", {"train": np.array([3, 0])})
    held = load_prepared(tree, share.parent, 8)
    assert share.name == whole.path.name and held.content_hash == whole.content_hash
    assert held.train_x.shape == whole.train_x.shape and np.array_equal(held.train_y, whole.train_y)
    assert np.array_equal(held.train_x[np.array([0, 3])], whole.train_x[[0, 3]])
    with pytest.raises(DataError, match="holds 2 of .* images of this split, not image 1"):
        held.train_x[np.array([0, 1])]
    with pytest.raises(DataError, match="not image 0"):
        held.test_x[np.array([0])]
    mask = np.zeros(len(whole.train_y), dtype=bool)
    mask[[0, 2]] = True
    with pytest.raises(DataError, match="not image 2"):  # masks and slices are indices too
        held.train_x[mask]
    with pytest.raises(DataError, match="not image 1"):
        held.train_x[0:2]
    assert held.train_x[3].shape == whole.train_x[3].shape
    with pytest.raises(DataError, match="would delete the rest"):
        prep.export_held_rows(whole, whole.path.parent, {"train": np.array([0])})
    with pytest.raises(DataError, match="out of range"):
        prep.export_held_rows(whole, tmp_path / "other", {"train": np.array([10**6])})
