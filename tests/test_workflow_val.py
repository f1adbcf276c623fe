"""The validation split: seeded, carved from the training set, out of every shard, the kNN monitor's queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS

from mocosfl import workflow
from mocosfl.config import Config, ConfigError, load_config
from mocosfl.data.partition import load_shards, save_shards
from mocosfl.data.prepare import DataError
from mocosfl.seeding import Stream

# ----------------------------------------------------------------------------- split_validation (no data)


def test_split_is_seeded_disjoint_and_complete() -> None:
    pool = np.sort(np.random.default_rng(1).choice(1000, 300, replace=False))
    train, val = workflow.split_validation(pool, 40, seed=0)
    again_train, again_val = workflow.split_validation(pool, 40, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert len(val) == 40 and len(train) == 260
    assert not np.intersect1d(train, val).size
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), pool)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not np.array_equal(workflow.split_validation(pool, 40, seed=1)[1], val)


def test_split_has_its_own_stream() -> None:
    assert len({int(s) for s in Stream}) == len(Stream)
    # Earlier streams keep their values (recorded results depend on them).
    assert (Stream.TRAIN_SUBSET, Stream.KNN_QUERIES, Stream.BENCH_AUGMENT) == (11, 14, 99)
    assert (Stream.VAL_SPLIT, Stream.ATTACK_IMAGES, Stream.ATTACK_SPLIT, Stream.ATTACK) == (15, 21, 22, 23)
    experts = (Stream.EXPERT_TARGET, Stream.EXPERT_EPOCH, Stream.EXPERT_AUGMENT, Stream.EXPERT_DECODER)
    assert experts == (24, 25, 26, 27)


@pytest.mark.parametrize("size", [0, -3, 10, 11])
def test_split_impossible_sizes(size: int) -> None:
    with pytest.raises(DataError, match=r"data\.val_size=.*10 images") as e:
        workflow.split_validation(np.arange(10), size, seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "match"),
    [("data.val_size=-1", r"data\.val_size=-1 .*>= 1"), ("data.val_size=2200", r"data\.val_size=2200 .*train_limit")],
)
def test_config_rejects_val_size(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(PARAMS, "test", [override])


# ----------------------------------------------------------------------------- on the test profile's data


Data = tuple[Config, workflow.Dataset, list[np.ndarray]]


@pytest.fixture(scope="module")
def data(prepared: list[str]) -> Data:
    cfg = load_config(PARAMS, "test", prepared)
    ds = workflow.Dataset(cfg)
    return cfg, ds, workflow.load_partition(cfg, ds)


def test_shards_and_validation_partition_the_training_set(data: Data) -> None:
    cfg, ds, shards = data
    assert len(ds.val_idx) == cfg.data.val_size
    assert len(ds.train_idx) + len(ds.val_idx) == cfg.data.train_limit
    assert not np.intersect1d(ds.train_idx, ds.val_idx).size
    held = ds.train_idx[np.concatenate(shards)]  # prepared training-set indices the clients hold
    assert not np.intersect1d(held, ds.val_idx).size
    # The test profile's non-IID shards divide the remaining images evenly: shards + val = the training set.
    pool = workflow._subset(len(ds.prepared.train_y), cfg.data.train_limit, cfg.seed, Stream.TRAIN_SUBSET)
    np.testing.assert_array_equal(np.sort(np.concatenate([held, ds.val_idx])), pool)


def test_knn_monitor_queries_validation_images(data: Data) -> None:
    cfg, ds, shards = data
    knn = workflow.knn_data(cfg, ds, shards)
    assert len(knn.query_x) == min(cfg.pretrain.knn_query_size, cfg.data.val_size)
    val_x = ds.val_x()
    rows = {v.tobytes(): y for v, y in zip(val_x, ds.val_y, strict=True)}
    assert all(rows.get(x.tobytes()) == int(y) for x, y in zip(knn.query_x, knn.query_y, strict=True))
    train = {x.tobytes() for x in ds.train_x()}
    assert knn.bank_x is not None and all(x.tobytes() in train for x in knn.bank_x)
    # The bank: images some client holds (a distributed server gets it from them), given by index too.
    assert knn.bank_rows is not None and np.isin(knn.bank_rows, np.concatenate(shards)).all()
    np.testing.assert_array_equal(knn.bank_x, ds.train_x()[knn.bank_rows])
    assert workflow.knn_data(cfg, ds, shards, bank_pixels=False).bank_x is None


def test_shard_file_without_validation_split(data: Data, tmp_path: Path) -> None:
    cfg, _, _ = data
    cfg = cfg.replace(**{"partition.out_dir": str(tmp_path), "metrics_dir": str(tmp_path / "metrics")})
    workflow.partition(cfg)
    path = workflow.shards_path(cfg)
    shards, meta = load_shards(path)
    del meta["validation"]  # what a shard file of an older mocosfl holds
    save_shards(shards, path, meta)
    ds = workflow.Dataset(cfg)
    with pytest.raises(DataError, match="without a validation split") as e:
        workflow.load_partition(cfg, ds)
    assert "\n" not in str(e.value)
    _, again = workflow.ensure_partition(cfg)  # remade, since shards are a function of config and data
    assert "validation" in load_shards(path)[1]
    assert [s.tolist() for s in again] == [s.tolist() for s in shards]
