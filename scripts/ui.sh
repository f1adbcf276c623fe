#!/usr/bin/env bash
# `make ui`: the MLflow UI over the project's store, on 127.0.0.1, in the foreground; when a server already
# answers on the port (`make services`), it says so and starts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PORT=${MLFLOW_PORT:-5000}
URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
HOST=${SERVICES_HOST:-127.0.0.1}
# A tracking server already on the port (`make services`): use it instead of starting another.
if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
    "http://$HOST:$PORT/health" 2>/dev/null; then
  echo "MLflow is already running at http://$HOST:$PORT (make services): open it there; nothing started"
  exit 0
fi
echo "MLflow UI: http://127.0.0.1:$PORT  (store: $URI; Ctrl-C to stop)"
exec "$VENV/bin/mlflow" server --backend-store-uri "$URI" --host 127.0.0.1 --port "$PORT" --workers 1
