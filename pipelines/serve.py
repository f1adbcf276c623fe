"""Serve the `mocosfl` flow's deployments (pretrain, pipeline, attack, tune) to a running Prefect server.

`make serve` starts the server and this; then, in another terminal:
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run mocosfl/pretrain -p profile=smoke
"""

from __future__ import annotations

from pipelines.env import configure


def main() -> None:
    configure(server=True)
    from prefect import serve

    from pipelines.flows import mocosfl_flow

    deployments = [
        mocosfl_flow.to_deployment(
            name=job,
            parameters={"job": job, "profile": "cpu", "overrides": []},
            description=f"mocosfl {job} job; parameters: profile, overrides (KEY=VALUE list)",
        )
        for job in ("pretrain", "pipeline", "attack", "tune")
    ]
    serve(*deployments)  # type: ignore[arg-type]  # sync context: RunnerDeployment, not a coroutine


if __name__ == "__main__":
    main()
