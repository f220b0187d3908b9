#!/usr/bin/env bash
# Creates the databases of the stack (Airflow metadata, MLflow backend, feedback) on first start.
set -euo pipefail
for db in "$AIRFLOW_DB" "$MLFLOW_DB" "$FEEDBACK_DB"; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\";"
done
