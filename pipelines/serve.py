"""Serve the mocosfl deployments (pretrain, pipeline, attack, tune; tune-trials, results-run) from this process.

`make serve` starts the server and this; then, in another terminal:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run mocosfl/pretrain -p profile=smoke
"""

from __future__ import annotations

from pipelines.env import configure


def main() -> None:
    configure(server=True)
    from prefect import serve

    from pipelines.flows import mocosfl_flow, results_run_flow, tune_trials_flow

    deployments = [
        mocosfl_flow.to_deployment(
            name=job,
            parameters={"job": job, "profile": "cpu", "overrides": []},
            description=f"mocosfl {job} job; parameters: profile, overrides (KEY=VALUE list)",
        )
        for job in ("pretrain", "pipeline", "attack", "tune")
    ]
    # What tune.executor=pool and `mocosfl results --executor pool` submit (served here, they run beside them).
    deployments.append(
        tune_trials_flow.to_deployment(
            name="tune-trials", description="trials of a shared Optuna study (submitted by tune.executor=pool)"
        )
    )
    deployments.append(
        results_run_flow.to_deployment(
            name="results-run", description="one run of a results suite (submitted by mocosfl results --executor pool)"
        )
    )
    serve(*deployments)  # type: ignore[arg-type]  # sync context: RunnerDeployment, not a coroutine


if __name__ == "__main__":
    main()
