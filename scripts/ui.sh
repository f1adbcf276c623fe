#!/usr/bin/env bash
# `make ui`: the MLflow UI over the project's store, on 127.0.0.1, in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${MLFLOW_PORT:-5000}
URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
echo "MLflow UI: http://127.0.0.1:$PORT  (store: $URI; Ctrl-C to stop)"
exec "$VENV/bin/mlflow" server --backend-store-uri "$URI" --host 127.0.0.1 --port "$PORT" --workers 1
