"""Stage ``register``: log the caption model to MLflow, register it, and move the
``champion`` alias to it only if it beats the current champion on the same test images.

``evaluate`` scored the new model and the champion image by image
(``reports/test_scores.parquet``). A seeded paired bootstrap over those images (1,000
resamples, ``pipeline/captioning/comparison.py``) gives the difference in ``register.metric`` with a 95%
interval, on the test images and, when people's corrections hold photos out, on those against
the corrections. The new model is promoted when the interval's lower bound is above
``register.min_improvement`` on one set and its upper bound is not below 0 on the other
(better on one, not worse on the other; the rule and why: ``judge`` in
``pipeline/registry/champion.py``), or when there is no champion, or when the champion could
not be loaded (it is then reported and replaced). Otherwise the new version gets ``challenger``.
Decision, both scores, the interval and versions go to ``reports/registry.json``, to
model-version tags and to the MLflow run.

The model is logged as models-from-code (``pipeline/registry/pyfunc_model_code.py``): nothing pickled.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import random
import tempfile
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.atomic import write_json
from pipeline.captioning.backbone import BackboneFolder
from pipeline.captioning.decoder import load_decoder, require_feature_dim
from pipeline.config import Settings
from pipeline.registry.champion import ALIAS, CAUSES, current_version, judge
from pipeline.registry.tracking import fail_pending_models, resume_run, tracking_uri
from pipeline.stages._cli import reported, require, stage_main

log = logging.getLogger("pipeline.register")
ARTIFACT_NAME = "caption_model"


def metric_value(metrics: dict, mode: str, key: str) -> float:
    """metrics[mode][key], e.g. ('beam', 'bleu4') for register.metric beam_bleu4."""
    try:
        return float(metrics[mode][key])
    except KeyError:
        raise ValueError(f"register.metric {mode}_{key} is not in {paths.EVAL_METRICS} "
                         f"(modes {[k for k in metrics if isinstance(metrics[k], dict)]})") from None


def comparison_values(comparison: dict, keys: tuple[str, ...] | None = None) -> dict:
    """``vs_champion.<key>`` of the test images and ``vs_champion_feedback.<key>`` of the held-out
    corrections, for MLflow metrics and tags."""
    sets = {"vs_champion": comparison, "vs_champion_feedback": comparison.get("feedback") or {}}
    return {f"{prefix}.{k}": v for prefix, values in sets.items() for k, v in values.items()
            if k != "feedback" and (keys is None or k in keys)}


def log_caption_model(settings: Settings, model_dir: Path):
    """Log the pyfunc model (models-from-code) into the active run and register it."""
    import mlflow

    from pipeline.data.synthetic import make_scene
    from pipeline.registry.pyfunc_model import (
        CONFIG_NAME,
        MODEL_CODE,
        PACKAGE_DIR,
        pip_requirements,
        signature_and_example,
    )

    backbone = BackboneFolder(paths.backbone_dir(settings.features.backbone))
    spec = backbone.spec()
    config = model_dir / CONFIG_NAME
    config.write_text(json.dumps({
        "backbone": spec.to_dict(),
        "decoding": settings.decoding.model_dump(),
        "limits": settings.serving.model_dump()}))
    buf = io.BytesIO()
    make_scene(random.Random(0), 64)[0].save(buf, format="JPEG")
    signature, example = signature_and_example(buf.getvalue())
    return mlflow.pyfunc.log_model(
        name=ARTIFACT_NAME, python_model=str(MODEL_CODE),
        artifacts={"config": str(config), "decoder": str(paths.DECODER), "vocab": str(paths.VOCAB),
                   "backbone": str(backbone.path),
                   # the served model reranks its beam as evaluate did, and measures a photo's novelty
                   "neighbours": str(paths.NEIGHBOURS),
                   # how sure each caption is, and when to abstain (stage calibrate)
                   "confidence": str(paths.CONFIDENCE)},
        signature=signature, input_example=example, pip_requirements=pip_requirements(),
        code_paths=[str(PACKAGE_DIR)],
        registered_model_name=settings.registry.model_name)


def model_description(name: str, weights: str) -> str:
    """The registered model's description (Markdown in the UI): what it does and how to use it."""
    cnn = {"imagenet": "an Xception CNN with ImageNet weights",
           "none": "an Xception CNN with random weights (the offline default)"}.get(weights, "an Xception CNN")
    return (
        f"Writes one English sentence about a photo: {cnn} turns the image into "
        "a 2048-d vector and an LSTM decoder writes the caption (beam search). Trained and "
        "promoted by the captioner pipeline (`dvc repro` / the Airflow DAG `caption_retraining`); "
        "the version holding the alias `champion` is the one to use.\n\n"
        "**Input**: a DataFrame with a column `image` (base64 image data, JPEG/PNG), optional "
        "param `beam_size` (1 = greedy). **Output**: columns `caption` and `error` (one per row; "
        "a bad image fills `error` and leaves the other rows alone).\n\n"
        "```python\nimport base64, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model(\"models:/{name}@{ALIAS}\")\n"
        "image = base64.b64encode(open(\"photo.jpg\", \"rb\").read()).decode()\n"
        "print(model.predict(pd.DataFrame({\"image\": [image]}))[\"caption\"][0])\n```\n\n"
        "More: the project README, sections \"Using the model\" and \"Comparing models in MLflow\".")


def replacement_warning(champion: dict, old_version: str | None, decision: str) -> str:
    """What to say loudly when a champion that could not be loaded is replaced unjudged ("" otherwise)."""
    if decision != "promoted" or champion.get("status") != "unloadable":
        return ""
    cause = CAUSES.get(champion.get("cause", ""), "it could not be loaded")
    return (f"WARNING: champion v{old_version} was replaced WITHOUT a comparison: {cause} "
            f"({champion.get('error', '')}). This version was never judged against it; compare them by hand "
            "(reports/test_scores.parquet, the MLflow runs) if that champion mattered.")


def version_description(run_tags: dict, metrics: dict, decision: str, why: str, old_version: str | None,
                        warning: str = "") -> str:
    """One version's description: its data, its scores, and how it compared with the champion."""
    beam = metrics.get("beam", {})
    scores = ", ".join(f"{label} {beam[key]:.3f}" for key, label in (
        ("bleu4", "BLEU-4"), ("meteor", "METEOR"), ("rouge_l", "ROUGE-L"), ("cider", "CIDEr")) if key in beam)
    against = f"champion v{old_version}" if old_version else "no champion (first model)"
    return ((f"**{warning}**\n\n" if warning else "") + f"Data: {run_tags.get('data.source', '?')} captions (DVC md5 "
            f"{run_tags.get('dvc.captions_md5', '?')}), features (DVC md5 {run_tags.get('dvc.features_md5', '?')}), "
            f"code {run_tags.get('git.commit', '?')}.\n\n"
            f"Test scores ({metrics.get('n_images', '?')} images, beam {metrics.get('beam_size', '?')}): {scores}.\n\n"
            f"Against {against}: {decision.replace('_', ' ')}: {why}.")


def run(settings: Settings) -> dict:
    import mlflow
    from mlflow import MlflowClient

    require(paths.EVAL_METRICS, paths.TEST_SCORES, paths.DECODER, paths.VOCAB, paths.NEIGHBOURS, paths.CONFIDENCE,
            BackboneFolder(paths.backbone_dir(settings.features.backbone)).spec_file)
    reg = settings.registry
    spec = BackboneFolder(paths.backbone_dir(settings.features.backbone)).spec()
    with reported(ValueError):
        require_feature_dim(load_decoder(paths.DECODER), spec.feature_dim, spec.name, paths.DECODER)
    metrics = json.loads(paths.EVAL_METRICS.read_text())
    scores = pd.read_parquet(paths.TEST_SCORES)
    with resume_run(settings, paths.TRAIN_RUN, "register") as active:
        client = MlflowClient()
        old_version = current_version(client, reg.model_name)
        with reported(ValueError):
            new_score = metric_value(metrics, reg.mode, reg.metric_key)
            decision, why, comparison = judge(scores, metrics.get("champion", {}), old_version,
                                              reg.metric, reg.mode, reg.metric_key,
                                              reg.min_improvement)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                info = log_caption_model(settings, Path(tmp))
        except BaseException:  # failed or stopped mid-upload (SIGTERM): no PENDING model left behind
            fail_pending_models(client, active.info.experiment_id, active.info.run_id)
            raise
        if comparison:
            mlflow.log_metrics(comparison_values(comparison, ("candidate", "champion", "difference",
                                                              "ci95_low", "ci95_high")))
        run_id = active.info.run_id
    version = str(info.registered_model_version)
    alias = ALIAS if decision == "promoted" else "challenger"
    client.set_registered_model_alias(reg.model_name, alias, version)
    tags = {f"metric.{reg.metric}": str(new_score), "decision": decision, "decision_reason": why,
            "previous_champion": str(old_version)}
    if comparison:
        tags.update({k: str(v) for k, v in comparison_values(comparison).items()})
    if decision == "promoted":  # apps show since when a champion serves
        tags["promoted_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    client.update_registered_model(reg.model_name, description=model_description(reg.model_name, settings.features.weights))
    client.update_model_version(reg.model_name, version, description=version_description(
        client.get_run(run_id).data.tags, metrics, decision, why, old_version,
        replacement_warning(metrics.get("champion", {}), old_version, decision)))
    client.set_tag(run_id, "registry.decision", decision)
    warning = replacement_warning(metrics.get("champion", {}), old_version, decision)
    if warning:
        client.set_model_version_tag(reg.model_name, version, "warning", warning)
        log.warning(warning)
    report = {"model_name": reg.model_name, "version": version, "run_id": run_id,
              "model_uri": f"models:/{reg.model_name}/{version}", "metric": reg.metric,
              "new_score": new_score,
              "old_champion": {"version": old_version, **metrics.get("champion", {})},
              "comparison": comparison, "reason": why,
              "champion": version if decision == "promoted" else old_version, "alias": alias,
              "decision": decision, "tracking_uri": tracking_uri(settings),
              **({"warning": warning} if warning else {})}
    write_json(paths.REGISTRY_REPORT, report)
    log.info("%s v%s -> %s: %s", reg.model_name, version, decision, why)
    return report


def main() -> None:
    stage_main("register", __doc__, run)


if __name__ == "__main__":
    main()
