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
        ("sfl.sync_period=true", ["sfl.sync_period=true", "integer"]),
        ("moco.temperature=0", ["moco.temperature=0", "> 0"]),
        ("device=gpu", ["device='gpu'", "'auto', 'cpu', 'cuda'"]),
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
