"""Run the retraining DAG once with dag.test() and print the outcome as JSON.

Executed in a subprocess by tests/dags/test_caption_retraining.py, so that AIRFLOW_HOME and the
other Airflow settings are in place before Airflow is imported, and nothing of Airflow's
global state leaks into the rest of the test session.
Usage: python tests/airflow_run.py <dags folder> [--parse-only]
"""

import json
import sys

from airflow.dag_processing.dagbag import DagBag
from airflow.utils import db


def asset_uris(condition) -> list[str]:
    """The URIs of the assets an asset condition (an Asset, or AssetAll/AssetAny of them) names."""
    if condition is None:
        return []
    if hasattr(condition, "uri"):
        return [condition.uri]
    return [uri for part in getattr(condition, "objects", []) for uri in asset_uris(part)]


def main() -> None:
    folder, parse_only = sys.argv[1], "--parse-only" in sys.argv
    bag = DagBag(dag_folder=folder)
    result = {"import_errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": list(bag.dag_ids)}
    dag = bag.dags.get("caption_retraining")
    if dag is not None:
        result["tasks"] = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
        result["schedule"] = str(dag.schedule)
        timetable = dag.timetable
        result["timetable"] = getattr(getattr(timetable, "timetable", timetable), "summary", str(timetable))
        result["schedule_assets"] = sorted(asset_uris(getattr(timetable, "asset_condition", None)))
        result["max_active_runs"] = dag.max_active_runs
        result["outlets"] = {t.task_id: [getattr(o, "uri", str(o)) for o in t.outlets] for t in dag.tasks}
    if dag is not None and not parse_only:
        db.resetdb()
        run = dag.test()
        result["state"] = str(run.state)
        result["task_states"] = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
