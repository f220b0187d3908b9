# The project image used by the Airflow services of docker-compose.yml (and the MLflow server).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2 \
    AIRFLOW_HOME=/opt/airflow CAPTIONER_PROJECT_DIR=/opt/captioner

# git for DVC, Java for METEOR (pycocoevalcap), curl for health checks
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openjdk-17-jre-headless curl make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/captioner
COPY docker/requirements-image.lock ./
RUN pip install -r requirements-image.lock

COPY . /opt/captioner
# DVC needs a git repository; the image carries the project as one commit.
RUN pip install --no-deps -e . \
    && git config --global user.email "captioner@localhost" && git config --global user.name "captioner" \
    && git config --global --add safe.directory /opt/captioner \
    && (test -d .git || (git init -q && git add -A && git commit -qm "captioner image")) \
    && mkdir -p "$AIRFLOW_HOME"

ENTRYPOINT ["/opt/captioner/docker/entrypoint.sh"]
CMD ["airflow", "version"]
