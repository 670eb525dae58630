#!/usr/bin/env bash
# A shared MLflow tracking server for the cluster: metadata in PostgreSQL, artifacts in S3.
#   MLFLOW_DB_URI=postgresql://mlflow:...@db:5432/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow infra/mlflow-server.sh
# Jobs then set MLFLOW_TRACKING_URI=http://<host>:5000 (the configs' tracking_uri: null picks it up).
set -euo pipefail
exec mlflow server \
  --backend-store-uri "${MLFLOW_DB_URI:?set MLFLOW_DB_URI (postgresql://... or sqlite:///path/mlflow.db)}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS (s3://bucket/prefix or a folder)}" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-4}"
