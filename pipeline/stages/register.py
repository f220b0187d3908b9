"""Stage ``register``: log the caption model to MLflow, register it, and move the
``champion`` alias to it only if it beats the current champion on ``register.metric``.

A tie or a worse score keeps the old champion; the new version then gets ``challenger``.
Decision, scores and versions go to ``reports/registry.json`` and to model-version tags.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
from pathlib import Path

from .. import paths
from ..atomic import write_json
from ..backbone import BackboneSpec
from ..config import Settings
from ..tracking import resume_run, tracking_uri
from ._cli import reported, require, stage_main

log = logging.getLogger("pipeline.register")
ARTIFACT_NAME = "caption_model"


def metric_value(metrics: dict, name: str) -> float:
    """``beam_bleu4`` -> metrics['beam']['bleu4']."""
    mode, _, key = name.partition("_")
    try:
        return float(metrics[mode][key])
    except KeyError:
        raise ValueError(f"register.metric {name!r} is not in {paths.EVAL_METRICS} "
                         f"(modes {[k for k in metrics if isinstance(metrics[k], dict)]})") from None


def champion_score(client, model_name: str, metric: str):
    """(version, score) of the current champion, or (None, None)."""
    from mlflow.exceptions import MlflowException

    try:
        champion = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None, None
    value = champion.tags.get(f"metric.{metric}")
    if value is None:
        value = client.get_run(champion.run_id).data.metrics.get(metric)
    return str(champion.version), (float(value) if value is not None else None)


def decide(new_score: float, old_score: float | None) -> str:
    """'promoted' when there is no champion or the new score is strictly better."""
    return "promoted" if old_score is None or new_score > old_score else "kept_champion"


def log_caption_model(settings: Settings, model_dir: Path):
    """Log the pyfunc model into the active run and register it; returns ModelInfo."""
    import mlflow

    from ..serving import CONFIG_NAME, CaptionModel, pip_requirements, signature_and_example
    from ..synthetic import make_scene

    spec = BackboneSpec.from_settings(settings.features)
    ev = settings.evaluate
    config = model_dir / CONFIG_NAME
    config.write_text(json.dumps({"backbone": spec.to_dict(), "decoding": {
        "beam_size": ev.beam_size, "length_penalty": ev.length_penalty,
        "no_repeat_ngram": ev.no_repeat_ngram},
        "max_image_pixels": settings.validation.max_image_pixels}))
    buf = io.BytesIO()
    make_scene(random.Random(0), 64)[0].save(buf, format="JPEG")
    signature, example = signature_and_example(buf.getvalue())
    return mlflow.pyfunc.log_model(
        name=ARTIFACT_NAME, python_model=CaptionModel(),
        artifacts={"config": str(config), "decoder": str(paths.DECODER), "vocab": str(paths.VOCAB),
                   "backbone_weights": str(paths.backbone_weights_file(spec.name))},
        signature=signature, input_example=example, pip_requirements=pip_requirements(),
        code_paths=[str(Path(__file__).resolve().parents[1])],
        registered_model_name=settings.registry.model_name)


def run(settings: Settings) -> dict:
    from mlflow import MlflowClient

    require(paths.EVAL_METRICS, paths.DECODER, paths.VOCAB,
            paths.backbone_weights_file(settings.features.backbone))
    reg = settings.registry
    with reported(ValueError):
        new_score = metric_value(json.loads(paths.EVAL_METRICS.read_text()), reg.metric)
    with resume_run(settings, paths.TRAIN_RUN, "register") as active, \
            tempfile.TemporaryDirectory() as tmp:
        info = log_caption_model(settings, Path(tmp))
        run_id = active.info.run_id
    client = MlflowClient()
    version = str(info.registered_model_version)
    old_version, old_score = champion_score(client, reg.model_name, reg.metric)
    decision = decide(new_score, old_score)
    alias = "champion" if decision == "promoted" else "challenger"
    client.set_registered_model_alias(reg.model_name, alias, version)
    tags = {f"metric.{reg.metric}": str(new_score), "decision": decision,
            "previous_champion": str(old_version), "previous_champion_score": str(old_score)}
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    client.set_tag(run_id, "registry.decision", decision)
    report = {"model_name": reg.model_name, "version": version, "run_id": run_id,
              "model_uri": f"models:/{reg.model_name}/{version}", "metric": reg.metric,
              "new_score": new_score, "old_champion": {"version": old_version, "score": old_score},
              "champion": version if decision == "promoted" else old_version, "alias": alias,
              "decision": decision, "tracking_uri": tracking_uri(settings)}
    write_json(paths.REGISTRY_REPORT, report)
    log.info("%s v%s %s=%.4f (champion before: v%s %s) -> %s", reg.model_name, version, reg.metric,
             new_score, old_version, old_score, decision)
    return report


def main() -> None:
    stage_main("register", __doc__, run)


if __name__ == "__main__":
    main()
