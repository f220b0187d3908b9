"""The ops room: running the pipeline and its services.

Holds: process supervision (``processes``), the launchers of ``make airflow`` / ``make ui`` /
``make team`` (``launchers``), the native team stack (``team``), the DVC stage graph
(``dvc_graph``), what each Airflow task runs (``airflow_tasks``), the task runner that carries
``dvc.lock`` entries between workers (``task_runner``) and what ``make run`` prints at the end
(``run_summary``).

May import: ``pipeline.registry``, ``pipeline.captioning``, ``pipeline.data`` and the ground floor;
never ``pipeline.stages`` (stages run as processes through DVC) or ``pipeline.app``.
"""
