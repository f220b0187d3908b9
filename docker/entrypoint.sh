#!/usr/bin/env bash
# Container entry point: point DVC at the shared S3 remote (MinIO) when configured, then run
# the service's command. Settings come from the environment (.env via docker-compose.yml).
set -euo pipefail
cd "${CAPTIONER_PROJECT_DIR:-/opt/captioner}"
if [ -n "${DVC_REMOTE_URL:-}" ]; then
    dvc remote add --local --force --default shared "$DVC_REMOTE_URL" >/dev/null
    if [ -n "${DVC_REMOTE_ENDPOINT:-}" ]; then
        dvc remote modify --local shared endpointurl "$DVC_REMOTE_ENDPOINT"
    fi
fi
exec "$@"
