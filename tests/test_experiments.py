"""The experiment suites as data, and the rules that make a row a run: resolved configs on the test
profile, seeds per row, the cache key (config with its seed, data and training code), queue text and
client costs."""

from __future__ import annotations

import pytest
from conftest import PARAMS

from mocosfl import identity
from mocosfl.config import load_config
from mocosfl.costs import client_cost
from mocosfl.experiments import rows
from mocosfl.experiments.suites import HEADLINE_SEEDS, MAIN, NEVER, PAPER, SUITES
from mocosfl.models.resnet import build_split_model, count_params
from mocosfl.sfl.trainer import Plan

METHODS = {"mocosfl", "central", "flmoco", "random"}


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_rows_are_distinct_and_valid(name: str) -> None:
    """Labels name rows in the table, plots and MLflow, so they are unique; overrides are real config keys."""
    suite = SUITES[name]
    labels = [r.label for r in suite]
    assert len(labels) == len(set(labels)), labels
    for profile in ("test", "cpu", "paper"):
        cfg = load_config(PARAMS, profile)
        for row in suite:
            assert row.method in METHODS, row
            assert row.fl_clients is None or row.method == "flmoco", row
            cfg.replace(**row.overrides)  # raises on a bad key or value


def test_paper_suite_is_table_3() -> None:
    table3 = [r for r in PAPER if r.group.startswith("table 3")]
    assert {
        (r.overrides["model.cut_layers"], r.overrides["partition.method"], r.overrides["partition.num_clients"])
        for r in table3
    } == {(c, p, n) for n in (100, 200, 1000) for c, p in ((1, "iid"), (1, "noniid-shards"), (3, "noniid-shards"))}


def test_every_row_resolves_on_the_test_profile(prepared) -> None:
    """Each row of every suite becomes a config and plan at the test profile's budget, with the suite rules."""
    base = load_config(PARAMS, "test", prepared)
    steps = base.pretrain.steps
    for name, suite in SUITES.items():
        for row in suite:
            r = rows.resolve(base, row, name)
            assert r.cfg.metrics_dir.startswith(str(rows.results_dir(base) / name)), r.cfg.metrics_dir
            for key, value in row.overrides.items():
                if key != "sfl.sync_period":
                    section, field = key.split(".")
                    assert getattr(getattr(r.cfg, section), field) == value, (row.label, key)
            if row.method == "random":
                assert r.plan is None and r.cfg.evaluate.encoder == "random"
                continue
            assert r.plan is not None
            assert r.plan.total_steps == row.overrides.get("pretrain.steps", steps)
            # A sync period at or beyond the last step means only the final FedAvg: the same run as "never".
            if r.plan.sync_period is None:
                assert r.cfg.sfl.sync_period == NEVER
            else:
                assert r.plan.sync_period < steps
            if row.fl_clients is not None:
                plain = rows.resolve(base, SUITES["main"][0], name).plan
                assert plain is not None
                assert r.plan.clients_per_round == row.fl_clients
                assert r.plan.batch_size == plain.batch_size  # same images per step as MocoSFL


def test_cache_key_covers_method_data_config_and_training_code(monkeypatch) -> None:
    cfg = load_config(PARAMS, "test")
    key = rows.cache_key(cfg, "mocosfl", "data-a")
    assert key == rows.cache_key(cfg, "mocosfl", "data-a")
    assert key != rows.cache_key(cfg, "central", "data-a")
    assert key != rows.cache_key(cfg, "mocosfl", "data-b")
    assert key != rows.cache_key(cfg.replace(**{"evaluate.linear_epochs": 1}), "mocosfl", "data-a")
    assert key != rows.cache_key(cfg.replace(seed=cfg.seed + 1), "mocosfl", "data-a")
    assert key == rows.cache_key(cfg.replace(metrics_dir="elsewhere"), "mocosfl", "data-a")  # location only
    monkeypatch.setattr(identity, "code_hash", lambda: "edited-code")
    assert key != rows.cache_key(cfg, "mocosfl", "data-a")


def test_headline_rows_run_three_seeds_except_on_quick_profiles() -> None:
    headline = {"MocoSFL", "centralized MoCo", "FL-MoCo", "random init", "MocoSFL, no feature sharing", "MocoSFL, IID"}
    headline.add("FL-MoCo, MocoSFL's clients and batch")  # the vector-concatenation claim
    assert {r.label for r in MAIN if r.seeds == HEADLINE_SEEDS == 3} == headline
    assert all(r.seeds == 1 for r in MAIN if r.label not in headline)
    first, ablation = MAIN[0], next(r for r in MAIN if r.label == "MocoSFL, sync every step")
    assert (rows.seed_count(first, "cpu"), rows.seed_count(ablation, "cpu")) == (3, 1)
    assert rows.seed_count(first, "smoke") == rows.seed_count(first, "test") == 1  # `make results PROFILE=smoke`
    assert rows.seed_count(ablation, "smoke", 2) == rows.seed_count(first, "cpu", 2) == 2  # --seeds N


def test_each_seed_is_its_own_run(prepared) -> None:
    """Seed offset i runs at seed + i with its own key and metrics folder; the seed, not the offset, names it."""
    base = load_config(PARAMS, "test", prepared)
    for row in (MAIN[0], next(r for r in MAIN if r.method == "random")):
        first, second = (rows.resolve(base, row, "main", i) for i in (0, 1))
        assert (first.cfg.seed, second.cfg.seed) == (base.seed, base.seed + 1)
        assert first.key != second.key and first.cfg.metrics_dir != second.cfg.metrics_dir
        assert rows.resolve(base.replace(seed=base.seed + 1), row, "main").key == second.key


def _plan(clients_per_round: int, client_batch_size: int = 2) -> Plan:
    return Plan(
        num_clients=20,
        clients_per_round=clients_per_round,
        client_batch_size=client_batch_size,
        batch_size=clients_per_round * client_batch_size,
        steps_per_epoch=50,
        total_steps=8,
        sample_period=3,
        sync_period=3,
    )


def test_queue_text_per_method() -> None:
    cfg = load_config(PARAMS, "test")  # K = 128
    unshared = cfg.replace(**{"moco.feature_sharing": False})
    assert rows.queue_text("mocosfl", cfg, _plan(20)) == "128 shared"
    assert rows.queue_text("mocosfl", unshared, _plan(20)) == "6 per client"
    assert rows.queue_text("flmoco", cfg, _plan(10)) == "12 per client (local)"
    assert rows.queue_text("flmoco", cfg, _plan(200)) == "1 per client (local)"  # at least one key
    assert rows.queue_text("central", cfg, _plan(20)) == "128"
    assert rows.queue_text("random", cfg, None) == ""


def test_client_cost_per_method() -> None:
    cfg = load_config(PARAMS, "test")
    m = cfg.model
    client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_channels_per_group)
    assert client_cost("central", cfg, _plan(20)) == (None, None)
    assert client_cost("mocosfl", cfg, None) == (None, None)
    params, flops = client_cost("mocosfl", cfg, _plan(20))
    # Cut 1 at width 8 on 32 px: online forward, target forward and online backward of a 3x3 conv, 3 -> 8.
    assert params == count_params(client) and flops == 3 * 2 * 27 * 8 * 32 * 32
    fl_params, fl_flops = client_cost("flmoco", cfg, _plan(10, 4))
    assert fl_params == count_params(client) + count_params(server)
    assert fl_flops is not None and flops is not None and fl_flops > 50 * flops
    with pytest.raises(ValueError, match="unknown method"):
        client_cost("nope", cfg, _plan(20))
