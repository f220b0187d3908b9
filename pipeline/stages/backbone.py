"""Stage ``backbone``: build the CNN once and save its exact weights.

Output ``data/features/<backbone>.weights.h5``. Every feature shard loads this file, so all
shards (on any machine) and the served model use the same CNN, and ImageNet weights are
fetched once, here, not once per shard.
"""

from __future__ import annotations

import logging

from .. import paths
from ..atomic import atomic_path
from ..backbone import BackboneError, BackboneSpec, build
from ..config import Settings
from ._cli import reported, stage_main

log = logging.getLogger("pipeline.backbone")


def save_backbone(spec: BackboneSpec, weights_out) -> dict:
    """Build the CNN of ``spec`` and write its weights to ``weights_out``; raises BackboneError."""
    model = build(spec)
    with atomic_path(weights_out) as tmp:
        model.save_weights(str(tmp))
    log.info("wrote %s (%s, weights %s, %d parameters)", weights_out, spec.name, spec.weights,
             model.count_params())
    return {"parameters": model.count_params()}


def run(settings: Settings) -> dict:
    spec = BackboneSpec.from_settings(settings.features)
    with reported(BackboneError, OSError):
        return save_backbone(spec, paths.backbone_weights_file(spec.name))


def main() -> None:
    stage_main("backbone", __doc__, run)


if __name__ == "__main__":
    main()
