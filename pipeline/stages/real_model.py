"""``captioner real-model --data DIR``: a champion trained on real Flickr8k features, offline.

``DIR`` is a folder in the layout of the shared ``flickr8k_real/`` (token file, train and dev
split lists, the int8 MobileNetV2 embeddings, and for ``train.decoder: attention`` their grids of
regions; ``dev_photos/`` optional): features computed elsewhere by the CNN vendored in
``vendor/mobilenet_v2/``, so no photo is needed to train. A grid is taken only when it is what
that CNN makes (its shape and quantisation), since the served model computes it again. The
command lays them out as the stages' files in a work folder (``--work``, default ``real/``) and
runs the stages' own code there, on the project's MLflow store:

1. ``data/prepared/captions.parquet``: the cleaned train and dev captions (validate's rules), the
   dev images once more as the ``test`` split, since the official test split is held out and dev
   is what may be scored; the embeddings as the one shard of ``data/features/shards/``;
   ``data/features/mobilenet_v2_int8.backbone/``: the .tflite and its spec (stage ``backbone``);
2. ``feedback``, ``features --shard feedback``, ``merge_features``: the corrections people made in
   the app (the project's feedback store), their photos embedded by the same CNN, join the data
   as in the pipeline (held-out corrected photos are scored for both models too);
3. ``train`` (dev drives early stopping), ``calibrate`` (how sure each caption is, fitted on dev),
   ``evaluate`` (metrics on every dev image; the champion
   compared on the dev photos the folder holds, captioning them itself), ``register`` (an ordinary
   model version whose backbone is the MobileNetV2 file, judged against the champion as any).

``--promote`` makes the new version champion whatever the judgement (the operator's call, tagged
as such); without it the version is promoted only as register decides (always when the store has
no champion). Returns register's report.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.atomic import write_json, write_parquet
from pipeline.captioning.backbone import FEATURE_DIM, MOBILENET, BackboneError, BackboneFolder
from pipeline.config import Settings
from pipeline.data.features_file import embedding_table, write_table
from pipeline.data.real_folder import (
    RealFolderError,
    dev_photos,
    read_captions,
    read_embeddings,
    stored_grid,
)
from pipeline.data.sources import FEEDBACK, image_files, prepared_captions
from pipeline.registry.champion import ALIAS
from pipeline.stages import calibrate, evaluate, features, feedback, merge_features, register, train
from pipeline.stages._cli import StageError, reported
from pipeline.stages.backbone import save_backbone

log = logging.getLogger("pipeline.real_model")
DEFAULT_WORK = Path("real")


def real_settings(settings: Settings, data: Path) -> Settings:
    """``settings`` for a model of ``data``: the data source is that folder (runs are named
    ``local-mobilenet_v2_int8-...``) and the backbone the int8 MobileNetV2: the params' own file
    when they already name it, else the vendored one (``weights: imagenet``)."""
    features = settings.features
    if features.backbone != MOBILENET:
        features = features.model_copy(update={"backbone": MOBILENET, "weights": "imagenet", "image_size": 224,
                                               "runtime": "tflite_int8", "precision": "auto"})
    # an attention decoder reads each photo's grid of regions: the folder's, and the served CNN's
    features = features.model_copy(update={"shards": [0], "grid": settings.train.decoder == "attention"})
    source = settings.data.model_copy(update={"source": "local", "local_path": str(data)})
    return settings.model_copy(update={"features": features, "data": source})


def lay_out(settings: Settings, data: Path) -> dict[str, Path]:
    """Write the stages' input files (in the working folder) from ``data``; returns the dev
    photos found there."""
    val = settings.validation
    captions, dropped = read_captions(data, val.min_tokens, val.max_tokens)
    images, features, _ = read_embeddings(data, FEATURE_DIM[MOBILENET])
    missing = sorted(set(captions["image"]) - set(images))
    if missing:
        raise RealFolderError(f"{len(missing)} captioned images have no embedding in {data}, e.g. {missing[:3]}")
    log.info("%d captions (%s dropped), %d embeddings from %s", len(captions), dropped, len(images), data)
    scored = captions[captions["split"] == "dev"].assign(split="test")
    prepared = pd.concat([captions, scored], ignore_index=True)
    paths.CAPTIONS.parent.mkdir(parents=True, exist_ok=True)
    write_parquet(prepared, paths.CAPTIONS)
    keep = set(captions["image"])
    rows = [i for i, name in enumerate(images) if name in keep]
    names = [images[i] for i in rows]
    save_backbone(settings.features, paths.backbone_dir(MOBILENET))
    backbone = BackboneFolder(paths.backbone_dir(MOBILENET))
    metadata = backbone.metadata()
    grid = None
    if settings.features.grid:
        metadata.update(backbone.grid_embedder().grid_metadata())
        grid = stored_grid(data, names, metadata)
    # the folder's features are the dataset's one shard, and the corrected photos' shard joins them:
    # both carry the backbone's provenance (the folder's vectors are what this CNN computes: a test
    # checks it bit for bit on the shared pictures)
    write_table(embedding_table(names, features[rows], grid).replace_schema_metadata(metadata),
                paths.feature_shard_file(MOBILENET, 0))
    return dev_photos(data, set(scored["image"]))


MARKER = ".captioner-real-model"  # a work folder this command made


def claim(work: Path) -> None:
    """Make ``work`` the command's folder: new, empty, or one it made before (its marker file).
    Anything else (the project itself, a folder of other files) is refused: the stages write
    ``data/``, ``models/``, ``reports/`` there and would replace what they find."""
    if work.exists() and not work.is_dir():
        raise StageError(f"--work {work} is a file, not a folder")
    if work.is_dir() and any(work.iterdir()) and not (work / MARKER).is_file():
        raise StageError(f"--work {work} holds other files (not a folder captioner real-model made): the stages "
                         "would write data/, models/ and reports/ into it; give an empty or new folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("files written by captioner real-model\n")


def run(settings: Settings, data: Path, work: Path = DEFAULT_WORK, promote: bool = False) -> dict:
    """Train, evaluate and register a decoder on ``data`` in ``work`` (see the module docstring)."""
    from mlflow import MlflowClient

    data = data.expanduser().resolve()
    settings = real_settings(settings, data)
    claim(work)
    with contextlib.chdir(work):  # the stages read and write their files relative to the working folder
        with reported(RealFolderError, BackboneError, OSError):
            photos = lay_out(settings, data)
        if not photos:
            raise StageError(f"{data / 'dev_photos'} holds no dev photo: the champion is compared with the new "
                             "model on photos it captions itself")
        # what people corrected in the app, embedded by the same CNN, trains it too (as in the pipeline)
        feedback.run(settings)
        features.run(settings, paths.FEEDBACK_SHARD)
        merge_features.run(settings)
        captions = prepared_captions()
        corrected = image_files(captions[captions["folder"] == FEEDBACK], settings.data.source)
        train.run(settings)
        calibrate.run(settings)
        evaluate.evaluate(settings, captions, {**photos, **corrected})
        report = register.run(settings)
        if promote and report["decision"] != "promoted":
            client, name, version = MlflowClient(), report["model_name"], report["version"]
            client.set_registered_model_alias(name, ALIAS, version)
            client.set_model_version_tag(name, version, "decision", "promoted by the operator (--promote)")
            report.update(decision="promoted", alias=ALIAS, champion=version,
                          reason=f"promoted by the operator (--promote); the judgement was: {report['reason']}")
            write_json(paths.REGISTRY_REPORT, report)
    return report
