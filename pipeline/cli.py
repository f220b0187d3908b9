"""``captioner``: caption images with a registered model.

    captioner caption photo1.jpg photo2.jpg [--model models:/flickr8k-captioner@champion] [--beam 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_settings


def _default_model() -> str:
    try:
        name = load_settings().registry.model_name
    except ConfigError:
        name = "flickr8k-captioner"
    return f"models:/{name}@champion"


def caption(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow
    import pandas as pd

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    else:
        try:
            from .tracking import tracking_uri

            mlflow.set_tracking_uri(tracking_uri(load_settings()))
        except ConfigError:
            pass  # outside the project: MLflow's own default / MLFLOW_TRACKING_URI
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as err:
        print(f"captioner: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    images = [os.path.abspath(p) for p in args.images]
    params = {"beam_size": args.beam} if args.beam else None
    result = model.predict(pd.DataFrame({"image": images}), params=params)
    status = 0
    for path, row in zip(args.images, result.itertuples()):
        if row.error:
            print(f"{path}\tERROR: {row.error}", file=sys.stderr)
            status = 1
        else:
            print(f"{path}\t{row.caption}")
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning with Flickr8k models.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="print one caption per image")
    cap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    cap.add_argument("--model", default=None,
                     help="MLflow model URI (default: models:/<register.model_name>@champion)")
    cap.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy; default: the model's)")
    cap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.model = args.model or _default_model()
    sys.exit(caption(args))


if __name__ == "__main__":
    main()
