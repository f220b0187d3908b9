"""One DAG run on the native team stack (`python -m pipeline.ops.launchers team`) with 1 and with 2
Celery workers, on the synthetic default dataset (or --images N), triggered through the REST
API. Needs the local Postgres and Redis. Figures only: on 2 cores two workers share the same
CPU, so the point is that the same run is correct at scale, not faster.

    python benchmarks/bench_team.py [--images 500]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import append_report  # noqa: E402
from tests.helpers import free_port, git_project, missing_services, postgres_admin  # noqa: E402
from tests.ops.test_team import Api, Launcher, _free_redis_db  # noqa: E402

DAG = "caption_retraining"


def one_run(workers: int, images: int, root: Path) -> dict:
    project = git_project(root / f"project{workers}", **{"data.synthetic.n_images": images,
                                                       "features.shards": list(range(workers))})
    home = root / f"home{workers}"
    tag = uuid.uuid4().hex[:8]
    dbs = [f"captioner_bench_{tag}_airflow", f"captioner_bench_{tag}_mlflow"]
    redis_db = _free_redis_db()
    ports = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CAPTIONER_SCHEDULE": "",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CAPTIONER_AIRFLOW_DB": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbs[0]}",
           "CAPTIONER_MLFLOW_DB": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{dbs[1]}",
           "CAPTIONER_BROKER_URL": f"redis://127.0.0.1:6379/{redis_db}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    launcher = Launcher(project, home, env, *ports, workers=workers)
    try:
        launcher.wait_for(r"team: ready", 900)
        ready = time.monotonic() - started
        password = json.loads((home / "airflow/simple_auth_manager_passwords.json.generated").read_text())["admin"]
        api = Api(f"http://127.0.0.1:{ports[0]}", password)
        while True:
            try:
                api.call("GET", f"/api/v2/dags/{DAG}")
                break
            except Exception:
                time.sleep(2)
        api.call("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        t0 = time.monotonic()
        run = api.trigger()
        state = api.wait_for_run(run, 3600)
        seconds = time.monotonic() - t0
        per_worker: dict[str, int] = {}
        for task in api.tasks(run):
            folder = Path(api.xcom(run, task)["project"]).name
            per_worker[folder] = per_worker.get(folder, 0) + 1
        return {"state": state, "ready_s": ready, "run_s": seconds, "tasks_per_worker": per_worker}
    finally:
        launcher.proc.send_signal(signal.SIGINT)
        launcher.proc.wait(timeout=600)
        for name in dbs:
            postgres_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="synthetic images (default: 500, the default dataset)")
    args = parser.parse_args()
    if missing_services():
        sys.exit(f"bench_team needs {missing_services()}")
    with tempfile.TemporaryDirectory() as tmp:
        results = {n: one_run(n, args.images, Path(tmp)) for n in (1, 2)}
    print(json.dumps(results, indent=1))
    rows = []
    for n, r in results.items():
        rows.append((f"{n} worker(s), features.shards: {list(range(n))}: one DAG run",
                     f"{r['run_s']:.0f} s ({r['state']}), tasks per worker {r['tasks_per_worker']}"))
        rows.append((f"{n} worker(s): stack start-up to ready", f"{r['ready_s']:.0f} s"))
    rows.append(("2 workers / 1 worker, run time", f"{results[2]['run_s'] / results[1]['run_s']:.2f}"))
    append_report("Team stack, 1 vs 2 Celery workers (bench_team.py)", rows, [
        f"synthetic dataset, {args.images} images, default params otherwise; both stacks on this one "
        "machine, so two workers share its cores: the figures show overhead, not speed-up"])


if __name__ == "__main__":
    main()
