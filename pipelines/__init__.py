"""MLOps edge of mocosfl: MLflow tracking, Prefect flows, Optuna tuning and the report."""
