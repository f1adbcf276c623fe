"""The edge's commands for the `mocosfl` CLI: tune, report, results (entry-point group `mocosfl.commands`).

Loading this module imports nothing optional, so `mocosfl --help` lists these commands everywhere; each
checks for the `pipeline` extra when it runs and says how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import dataclass
from typing import Any

from mocosfl.cli import CommandError

EXTRA_PACKAGES = ("mlflow", "optuna", "prefect")
INSTALL = "pip install 'mocosfl[pipeline]' (from a checkout: pip install '.[pipeline]')"

log = logging.getLogger("mocosfl.pipelines")


def require_extra(command: str) -> None:
    """Raise a one-line CommandError naming the extra when one of its packages cannot be imported."""
    for name in EXTRA_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            raise CommandError(f"`mocosfl {command}` needs the pipeline extra ({name} is missing): {INSTALL}") from None


def _tune(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.pool import PoolError
    from pipelines.tune import run_study

    try:
        return run_study(cfg, log=log.info)
    except PoolError as e:  # no server, no deployment, a failed flow run: one line, not a traceback
        raise CommandError(str(e)) from e


def _report(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.report import make_report

    return make_report(cfg)


def _results(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mocosfl.experiments.rows import default_suite
    from pipelines.pool import PoolError
    from pipelines.results import run_suite

    try:
        return run_suite(
            cfg,
            args.suite or default_suite(cfg.profile),
            log=log.info,
            seeds=args.seeds,
            executor=args.executor,
            estimate=args.estimate,
        )
    except PoolError as e:
        raise CommandError(str(e)) from e


def _results_arguments(p: argparse.ArgumentParser) -> None:
    from mocosfl.experiments.suites import HEADLINE_SEEDS, ONE_SEED_PROFILES, SUITES

    p.add_argument(
        "--suite", choices=sorted(SUITES), help="suite of runs (default: paper on the paper profile, else main)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help=f"run every row at N seeds (seed, seed+1, ...), each its own cached run (default: the suite's: "
        f"{HEADLINE_SEEDS} on main's headline rows, 1 on the others; 1 everywhere on the "
        f"{'/'.join(ONE_SEED_PROFILES)} profiles)",
    )
    p.add_argument(
        "--executor",
        choices=["local", "pool"],
        default="local",
        help="local: run the missing runs here, one after another; pool: as flow runs on the Prefect work pool "
        "`mocosfl` (make services, make deploy, make worker on each host), then write the table here",
    )
    p.add_argument(
        "--no-estimate",
        dest="estimate",
        action="store_false",
        help="start the missing runs at once, without first timing a few steps of each for an estimate "
        "(the estimate takes ~20-40 s per missing run)",
    )


@dataclass(frozen=True)
class EdgeCommand:
    name: str
    help: str
    body: Any
    arguments: Any = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.arguments:
            self.arguments(parser)

    def run(self, cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
        require_extra(self.name)
        return self.body(cfg, args)  # type: ignore[no-any-return]


tune = EdgeCommand("tune", "Optuna study over sync period and queue size (writes metrics/tune.json)", _tune)
report = EdgeCommand("report", "write reports/report.md (+ .html, PNG plots) for this config's run", _report)
results = EdgeCommand(
    "results",
    "run a suite of MocoSFL runs, baselines and ablations; write reports/results-*.md/.csv",
    _results,
    _results_arguments,
)
