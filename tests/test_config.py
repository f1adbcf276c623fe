"""Tests for mocosfl.config (profiles, overrides, validation, paths, hashing) and the trainer's plan rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mocosfl.config import Config, ConfigError, config_hash, load_config, parse_override
from mocosfl.sfl.trainer import auto_client_batch_size, auto_clients_per_round, resolve_plan

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


# ---------------------------------------------------------------- the project's params.yaml


@pytest.mark.parametrize("profile", ["test", "smoke", "cpu", "paper"])
def test_every_profile_loads(profile: str) -> None:
    cfg = load_config(PARAMS, profile)
    assert isinstance(cfg, Config)
    assert cfg.profile == profile
    assert cfg.model.cut_layers in (1, 3, 5)


def test_profile_values_are_applied_over_the_base() -> None:
    test = load_config(PARAMS, "test")
    assert (test.model.width, test.partition.num_clients, test.sfl.client_batch_size) == (8, 20, 2)
    assert test.pretrain.steps == 8 and test.moco.queue_size == 128
    assert test.pretrain.lr == 0.06  # untouched base value
    paper = load_config(PARAMS, "paper")
    assert (paper.model.width, paper.partition.num_clients, paper.moco.queue_size) == (64, 1000, 6000)
    assert paper.sfl.clients_per_round == "auto" and paper.pretrain.steps is None


def test_default_profile_is_the_one_named_in_the_file() -> None:
    assert load_config(PARAMS).profile == "cpu"
    assert load_config(PARAMS).model.width == 16


def test_unknown_profile() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        load_config(PARAMS, "nope")


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "params.yaml")


# ---------------------------------------------------------------- --set overrides


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(
        PARAMS,
        "test",
        [
            "sfl.sync_period=10",
            "sfl.sync_targets=false",
            "pretrain.steps=null",
            "sfl.client_batch_size=auto",
            "moco.temperature=0.2",
            "model.cut_layers=3",
            "partition.method=iid",
        ],
    )
    assert cfg.sfl.sync_period == 10 and isinstance(cfg.sfl.sync_period, int)
    assert cfg.sfl.sync_targets is False
    assert cfg.pretrain.steps is None
    assert cfg.sfl.client_batch_size == "auto"
    assert cfg.moco.temperature == 0.2
    assert cfg.model.cut_layers == 3
    assert cfg.partition.method == "iid"


def test_overrides_win_over_the_profile() -> None:
    assert load_config(PARAMS, "test", ["model.width=4"]).model.width == 4


def test_integer_accepted_for_a_float_key() -> None:
    cfg = load_config(PARAMS, "test", ["pretrain.lr=1"])
    assert cfg.pretrain.lr == 1.0 and isinstance(cfg.pretrain.lr, float)


def test_scientific_notation_is_a_number(tmp_path: Path) -> None:
    # PyYAML follows YAML 1.1, where '1e-3' (no dot) is a string, not a float.
    assert load_config(PARAMS, "test", ["evaluate.linear_lr=1e-3"]).evaluate.linear_lr == 1e-3
    assert load_config(_write(tmp_path, "pretrain:\n  weight_decay: 5e-4\n")).pretrain.weight_decay == 5e-4


def test_parse_override() -> None:
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override(" a.b = yes") == ("a.b", True)
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("a.b")


@pytest.mark.parametrize("override,name", [("sfl.nope=1", "sfl.nope"), ("nope.x=1", "nope"), ("seeds=1", "seeds")])
def test_unknown_key_names_it(override: str, name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{name}'"):
        load_config(PARAMS, "test", [override])


@pytest.mark.parametrize(
    "override,needles",
    [
        # [key=value as the message shows it, what is allowed]
        ("model.cut_layers=2", ["model.cut_layers=2", "1, 3, 5"]),
        ("partition.method=foo", ["partition.method='foo'", "'noniid-shards', 'dirichlet', 'iid'"]),
        ("sfl.clients_per_round=abc", ["sfl.clients_per_round='abc'", "int or 'auto'"]),
        ("moco.ema=1.5", ["moco.ema=1.5", "[0, 1)"]),
        ("sfl.sync_targets=3", ["sfl.sync_targets=3", "true or false"]),
        ("model.width=0", ["model.width=0", ">= 1"]),
        ("model.width=8.5", ["model.width=8.5", "integer"]),
        ("sfl.sync_period=true", ["sfl.sync_period=true", "int"]),
        ("moco.temperature=0", ["moco.temperature=0", "> 0"]),
        ("device=gpu", ["device='gpu'", "'auto', 'cpu', 'cuda'"]),
        ("tracking.model_alias=latest", ["tracking.model_alias='latest'", "neither 'latest'"]),
        ("tracking.model_alias=v3", ["tracking.model_alias='v3'", "a version like 'v3'"]),
        ("tracking.model_alias=a b", ["tracking.model_alias='a b'", "letters, digits, '_' and '-'"]),
        ("tracking.registered_model=a/b", ["tracking.registered_model='a/b'", "no '/' or ':'"]),
        ("tracking.system_metrics=often", ["tracking.system_metrics='often'", "true or false"]),
    ],
)
def test_bad_value_names_key_value_and_allowed(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, "test", [override])
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not in {message!r}"


# ---------------------------------------------------------------- files and paths


def _write(tmp_path: Path, text: str) -> Path:
    sub = tmp_path / "proj"
    sub.mkdir()
    p = sub / "params.yaml"
    p.write_text(text)
    return p


def test_relative_paths_resolved_against_params_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(
        tmp_path,
        "data:\n  source: ../raw/cifar\n  prepared_dir: prep\nmetrics_dir: m\npretrain:\n  runs_dir: /abs/runs\n",
    )
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config(p)
    root = p.parent.resolve()
    assert cfg.profile == "default"
    assert cfg.data.source == str((tmp_path / "raw" / "cifar").resolve())
    assert cfg.data.prepared_dir == str(root / "prep")
    assert cfg.metrics_dir == str(root / "m")
    assert cfg.partition.out_dir == str(root / "data" / "partitions")  # default, also resolved
    assert cfg.pretrain.runs_dir == "/abs/runs"


def test_profiles_in_a_small_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "profile: a\nseed: 3\nprofiles:\n  a: {seed: 4, model: {width: 8}}\n  b: {seed: 5}\n")
    assert (load_config(p).seed, load_config(p).model.width) == (4, 8)
    assert load_config(p, "b").seed == 5
    with pytest.raises(ConfigError, match="known: a, b"):
        load_config(p, "c")


@pytest.mark.parametrize(
    "text,match",
    [
        ("model:\n  widht: 8\n", "model.widht"),
        ("profiles:\n  x: {sfl: {period: 1}}\nprofile: x\n", "sfl.period"),
        ("model: [1, 2]\n", r"model\b.* must be a mapping"),
        ("- a\n- b\n", "params.yaml must hold a mapping"),
        ("model: {width: [\n", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text))


# ---------------------------------------------------------------- replace and hash


def test_replace_validates_and_copies() -> None:
    cfg = load_config(PARAMS, "test")
    new = cfg.replace(**{"sfl.sync_period": 7, "model__width": 4})
    assert (new.sfl.sync_period, new.model.width) == (7, 4)
    assert (cfg.sfl.sync_period, cfg.model.width) == (3, 8)
    assert new.data == cfg.data
    with pytest.raises(ConfigError, match="sfl.nope"):
        cfg.replace(**{"sfl.nope": 1})
    with pytest.raises(ConfigError, match="moco.ema"):
        cfg.replace(**{"moco.ema": 1.0})


def test_config_hash_ignores_paths_but_not_knobs() -> None:
    cfg = load_config(PARAMS, "test")
    sections = ("data", "partition", "model", "sfl", "moco", "pretrain")
    h = config_hash(cfg, sections)
    moved = cfg.replace(
        **{
            "data.source": "/elsewhere",
            "pretrain.runs_dir": "/r",
            "pretrain.checkpoint_every": 5,
            "data.prepared_dir": "/p",
            "partition.out_dir": "/o",
        }
    )
    assert config_hash(moved, sections) == h
    assert config_hash(cfg.replace(**{"sfl.sync_period": 4}), sections) != h
    assert config_hash(cfg.replace(**{"moco.queue_size": 64}), sections) != h
    assert config_hash(cfg, sections, extra="x") != h
    # Only the named sections count.
    assert config_hash(cfg.replace(**{"sfl.sync_period": 4}), ("model",)) == config_hash(cfg, ("model",))
    assert len(h) == 12


# ---------------------------------------------------------------- plan (auto rules)


def _plan(n: int, shard: int = 50, **over):
    cfg = load_config(PARAMS, "paper").replace(**{"partition.num_clients": n, **over})
    return resolve_plan(cfg, np.full(n, shard))


@pytest.mark.parametrize(
    "n,m,b",
    [
        (1000, 100, 1),
        (20, 20, 5),
        (250, 125, 1),
        (150, 150, 1),
        (200, 100, 1),
        (199, 199, 1),
        (999, 111, 1),
        (5, 5, 20),
        (50, 50, 2),
        (51, 51, 1),
    ],
)
def test_auto_rules(n: int, m: int, b: int) -> None:
    plan = _plan(n)
    assert (plan.num_clients, plan.clients_per_round, plan.client_batch_size) == (n, m, b)
    assert plan.batch_size == m * b
    assert auto_clients_per_round(n) == m and auto_client_batch_size(n) == b


def test_plan_paper_numbers() -> None:
    plan = _plan(1000, shard=50)
    assert plan.batch_size == 100
    assert plan.steps_per_epoch == 500  # 50,000 images / 100 per step
    assert plan.total_steps == 200 * 500
    assert plan.sync_period == 50


@pytest.mark.parametrize("n", [20, 100, 200, 1000])
def test_auto_periods_follow_the_reference(n: int) -> None:
    """Re-sampling once per pass over a shard; 1000 // (b*N) syncs per pass: every 50 steps on 50,000 images."""
    plan = _plan(n, shard=50_000 // n)
    assert plan.sample_period == 50_000 // n // plan.client_batch_size
    assert plan.sync_period == 50
    assert _plan(n, shard=45_000 // n).sync_period == 45  # the training set less the validation split
    assert _plan(n, **{"sfl.sync_period": "never"}).sync_period is None


def test_plan_steps_override_epochs() -> None:
    assert _plan(20, **{"pretrain.steps": 17}).total_steps == 17
    plan = _plan(20, shard=7, **{"pretrain.epochs": 3, "sfl.client_batch_size": 2})
    assert plan.steps_per_epoch == int(np.ceil(20 * 7 / 40)) and plan.total_steps == 3 * plan.steps_per_epoch


def test_plan_explicit_values() -> None:
    plan = _plan(30, **{"sfl.clients_per_round": 7, "sfl.client_batch_size": 3})
    assert (plan.clients_per_round, plan.client_batch_size, plan.batch_size) == (7, 3, 21)


def test_plan_errors() -> None:
    with pytest.raises(ConfigError, match="sfl.clients_per_round=21"):
        _plan(20, **{"sfl.clients_per_round": 21})
    cfg = load_config(PARAMS, "paper").replace(**{"partition.num_clients": 4, "sfl.client_batch_size": 4})
    with pytest.raises(ConfigError, match=r"sfl.client_batch_size=4 .*smallest client shard \(3 images\)"):
        resolve_plan(cfg, np.array([10, 3, 8, 9]))
    # auto batch (100 // 4 = 25) is checked as well
    with pytest.raises(ConfigError, match="client_batch_size=25"):
        resolve_plan(cfg.replace(**{"sfl.client_batch_size": "auto"}), np.array([30, 24, 30, 30]))
    with pytest.raises(ConfigError, match="empty"):
        resolve_plan(cfg.replace(**{"sfl.client_batch_size": 1}), np.array([3, 0, 3, 3]))
    with pytest.raises(ConfigError, match="partition.num_clients=4"):
        resolve_plan(cfg, np.full(5, 10))


def test_on_off_literals_survive_yaml_booleans() -> None:
    from mocosfl.config import Config

    assert Config().replace(**{"pretrain.compile": False}).pretrain.compile == "off"
    assert Config().replace(**{"pretrain.compile": True}).pretrain.compile == "on"


@pytest.mark.parametrize("copy", ["standalone/tmp1a2b", "tmp1a2b"])
def test_paths_in_a_dvc_experiment_copy(copy: str) -> None:
    """In `dvc exp run`'s copy, paths leaving the copy and the shared stores resolve from the workspace."""
    from mocosfl.config import _resolve_relative

    ws = Path("/work/proj")
    root = ws / ".dvc/tmp/exps" / copy
    assert _resolve_relative(root, "runs") == str(root / "runs")  # the experiment's own outputs
    assert _resolve_relative(root, "../shared/data/a.tar.gz") == "/work/shared/data/a.tar.gz"
    assert _resolve_relative(root, "mlflow.db", shared=True) == str(ws / "mlflow.db")
    assert _resolve_relative(ws, "mlflow.db", shared=True) == str(ws / "mlflow.db")  # the workspace itself
    assert _resolve_relative(ws, "../shared/x") == "/work/shared/x"


# ---------------------------------------------------------------- the reference recipe (model, augment, normalization)


def test_mocosfl_config_prints_the_reference_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from mocosfl.cli import main

    assert main(["config", "--params", str(PARAMS), "--profile", "paper"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["augment"] == {"crop_scale": [0.08, 1.0], "blur_sigma": [0.1, 2.0]}
    assert printed["model"]["gn_channels_per_group"] == 4 and "gn_groups" not in printed["model"]
    assert printed["data"]["normalization"] == "auto"
    # The dataclass defaults say the same as params.yaml.
    assert Config().augment.crop_scale == (0.08, 1.0) and Config().augment.blur_sigma == (0.1, 2.0)
    assert Config().model.gn_channels_per_group == 4 and Config().data.normalization == "auto"


def test_augment_ranges_are_tuples_and_overridable() -> None:
    cfg = load_config(PARAMS, "test", ["augment.crop_scale=[0.2, 1]", "augment.blur_sigma=[0.5, 1.5]"])
    assert cfg.augment.crop_scale == (0.2, 1.0) and isinstance(cfg.augment.crop_scale[1], float)
    assert cfg.augment.blur_sigma == (0.5, 1.5)
    # Survives replace() (a dict round trip) and changes the hash of the augment section.
    assert cfg.replace(**{"seed": 1}).augment == cfg.augment
    assert config_hash(cfg, ("augment",)) != config_hash(load_config(PARAMS, "test"), ("augment",))


@pytest.mark.parametrize(
    "override,needles",
    [
        ("augment.crop_scale=[0.5, 0.2]", ["augment.crop_scale=[0.5, 0.2]", "0 < low <= high <= 1"]),
        ("augment.crop_scale=[0, 1]", ["augment.crop_scale=[0.0, 1.0]", "0 < low <= high <= 1"]),
        ("augment.crop_scale=[0.5, 1.5]", ["augment.crop_scale=[0.5, 1.5]", "0 < low <= high <= 1"]),
        ("augment.crop_scale=0.5", ["augment.crop_scale=0.5", "a list [float, float]"]),
        ("augment.crop_scale=[0.1, 0.5, 1]", ["augment.crop_scale=[0.1, 0.5, 1]", "a list [float, float]"]),
        ("augment.blur_sigma=[a, 2]", ["augment.blur_sigma=['a', 2]", "a list [float, float]"]),
        ("augment.blur_sigma=[0, 2]", ["augment.blur_sigma=[0.0, 2.0]", "0 < low <= high"]),
        ("augment.blur_sigma=[2, 1]", ["augment.blur_sigma=[2.0, 1.0]", "0 < low <= high"]),
        ("model.gn_channels_per_group=0", ["model.gn_channels_per_group=0", ">= 1"]),
        ("model.gn_channels_per_group=3", ["model.gn_channels_per_group=3", "divide model.width=8"]),
        ("data.normalization=imagenet", ["data.normalization='imagenet'", "'auto', 'dataset', 'reference'"]),
    ],
)
def test_bad_recipe_values_name_the_key(override: str, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, "test", [override])
    message = str(err.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_gn_channels_per_group_must_divide_every_profile_width() -> None:
    for profile in ("test", "smoke", "cpu", "paper"):
        cfg = load_config(PARAMS, profile)
        assert cfg.model.width % cfg.model.gn_channels_per_group == 0
    assert load_config(PARAMS, "test", ["model.width=4"]).model.gn_channels_per_group == 4
    with pytest.raises(ConfigError, match="model.gn_channels_per_group=4 is invalid: must divide model.width=6"):
        load_config(PARAMS, "test", ["model.width=6"])


def test_old_gn_groups_key_is_unknown() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'model.gn_groups'"):
        load_config(PARAMS, "test", ["model.gn_groups=32"])


def _prepared(classes: list[str], train_per_class: int, test_per_class: int, mean: tuple[float, float, float]):
    from mocosfl.data.prepare import PreparedData

    k = len(classes)
    empty = np.zeros((0, 32, 32, 3), dtype=np.uint8)  # pixels are not looked at, only labels and stats
    return PreparedData(
        train_x=empty,
        train_y=np.repeat(np.arange(k), train_per_class),
        test_x=empty,
        test_y=np.repeat(np.arange(k), test_per_class),
        classes=classes,
        mean=mean,
        std=(0.247, 0.243, 0.261),
        path=Path("/nowhere"),
    )


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4919, 0.4827, 0.4472)  # the JPEG archive's own statistics


def test_normalization_auto_uses_the_reference_constants_on_cifar10_only() -> None:
    from mocosfl.data.prepare import REFERENCE_CIFAR10_MEAN, REFERENCE_CIFAR10_STD, is_cifar10, normalization

    assert REFERENCE_CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and REFERENCE_CIFAR10_STD == (0.2023, 0.1994, 0.2010)
    cifar = _prepared(CIFAR10, 5000, 1000, CIFAR10_MEAN)
    assert is_cifar10(cifar)
    auto = normalization(cifar, "auto")
    assert (auto.mean, auto.std, auto.source) == (REFERENCE_CIFAR10_MEAN, REFERENCE_CIFAR10_STD, "reference")
    dataset = normalization(cifar, "dataset")
    assert (dataset.mean, dataset.std, dataset.source) == (cifar.mean, cifar.std, "dataset")
    # Not CIFAR-10: other class names, sizes, or pixels -> auto falls back to the data's own statistics.
    others = [
        _prepared(CIFAR10[:9] + ["lorry"], 5000, 1000, CIFAR10_MEAN),
        _prepared(CIFAR10, 500, 100, CIFAR10_MEAN),  # a 10% subset prepared as its own dataset
        _prepared(CIFAR10, 5000, 1000, (0.45, 0.45, 0.45)),  # same names and sizes, other images
        _prepared(["a", "b"], 10, 5, CIFAR10_MEAN),
    ]
    for data in others:
        assert not is_cifar10(data)
        assert normalization(data, "auto").source == "dataset"
        assert normalization(data, "auto").mean == data.mean
        # reference forces the constants on any data
        assert normalization(data, "reference").mean == REFERENCE_CIFAR10_MEAN
    with pytest.raises(ValueError, match="data.normalization='imagenet' is invalid"):
        normalization(cifar, "imagenet")


def test_normalization_on_the_real_archive(prepared: list[str]) -> None:
    from mocosfl.data.prepare import REFERENCE_CIFAR10_MEAN, REFERENCE_CIFAR10_STD
    from mocosfl.workflow import Dataset

    cfg = load_config(PARAMS, "test", prepared)
    ds = Dataset(cfg)
    assert ds.normalization.source == "reference"
    assert (ds.normalization.mean, ds.normalization.std) == (REFERENCE_CIFAR10_MEAN, REFERENCE_CIFAR10_STD)
    own = Dataset(cfg.replace(**{"data.normalization": "dataset"})).normalization
    assert own.source == "dataset" and own.mean == ds.prepared.mean
