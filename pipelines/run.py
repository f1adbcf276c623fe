"""`make pipeline`: run the Prefect flow in-process (ephemeral API, no server needed).

python -m pipelines.run [--job pipeline|pretrain|tune] [--profile NAME] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys

from pipelines.env import configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.run", description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="pipeline", choices=["pipeline", "pretrain", "tune"])
    parser.add_argument("--profile", help="profile (default: params.yaml's `profile:`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    configure()
    from mocosfl.cli import user_errors
    from mocosfl.config import load_config
    from pipelines import flows, tracking

    profile = args.profile or flows.params_profile()
    try:
        cfg = load_config(flows.PARAMS, profile, args.overrides)
        results = flows.mocosfl_flow(profile=profile, overrides=args.overrides, job=args.job)
    except user_errors() as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted; run it again to resume from the last checkpoint", file=sys.stderr)
        return 130
    print()
    if "evaluate" in results:
        ev = results["evaluate"]
        print(f"kNN top-1 {ev['knn_top1']:.2f}%  linear probe top-1 {ev['linear_probe_top1']:.2f}%")
    if "report" in results:
        print(f"report: {results['report'].get('report', cfg.report.out_dir + '/report.md')}")
    if "tune" in results:
        print(f"tuning: best {results['tune'].get('best_params')} -> {cfg.metrics_dir}/tune.json")
    if tracking.enabled(cfg):
        print(
            f"MLflow runs are in {tracking.tracking_uri(cfg)}; browse them with `make ui` "
            f"and open {cfg.report.mlflow_ui}"
        )
        encoder = tracking.registered_encoder(cfg) if "pretrain" in results else None
        if encoder:
            print(f"encoder: {encoder}; load it with mlflow.pytorch.load_model (see README, Model Registry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
