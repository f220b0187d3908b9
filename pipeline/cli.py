"""``captioner``: caption images with a registered model, or serve the champion as a web app.

    captioner caption photo1.jpg photo2.jpg [--model models:/flickr8k-captioner@champion] [--beam 3]
    captioner app [--port 8000] [--poll-seconds 10]

Files are checked before the model is loaded (a load takes a while), so a typo, a folder or
an unreadable file is reported at once; the CLI reads each file itself and hands the model its
bytes (the caller owns this machine, so local paths are fine here).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_settings
from pipeline.errors import ReportedError
from pipeline.logs import setup_logging
from pipeline.registry.champion import ALIAS
from pipeline.registry.pyfunc_model import (
    MAX_BEAM,  # the served model's own bound: one rule in one place
)


def _model_name() -> str | None:
    """register.model_name from ./params.yaml; None outside the project."""
    try:
        return load_settings().registry.model_name
    except ConfigError:
        return None


def _use_tracking_uri(uri: str | None) -> None:
    """--tracking-uri, else the project's (MLFLOW_TRACKING_URI or params.yaml), else MLflow's own
    default; exits with status 2 and the reason when the store cannot be reached."""
    from pipeline.registry.tracking import tracking_uri, use_store

    try:
        settings = load_settings()
    except ConfigError:
        settings = None  # outside the project
    uri = uri or (tracking_uri(settings) if settings else os.environ.get("MLFLOW_TRACKING_URI"))
    if uri is None:
        return
    try:
        use_store(uri, settings.mlflow if settings else None)
    except ReportedError as err:
        print(f"captioner: {err}", file=sys.stderr)
        sys.exit(2)


def beam_size(text: str) -> int:
    """argparse type: an integer 1..MAX_BEAM."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_BEAM:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_BEAM} (1 = greedy), got {value}")
    return value


def read_inputs(names: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
    """(file name -> bytes) for the readable files, (file name -> error) for the others."""
    data, errors = {}, {}
    for name in names:
        path = Path(name).expanduser()
        if path.is_dir():
            errors[name] = "is a directory, not an image file"
        elif not path.exists():
            errors[name] = "no such file"
        else:
            try:
                data[name] = path.read_bytes()
            except OSError as err:
                errors[name] = f"cannot read: {err.strerror or err}"
    return data, errors


def caption(args: argparse.Namespace) -> int:
    data, errors = read_inputs(args.images)
    for name, error in errors.items():
        print(f"{name}\tERROR: {error}", file=sys.stderr)
    if not data:
        return 1
    import mlflow  # noqa: I001
    import pandas as pd

    from pipeline.captioning import quiet_tensorflow  # noqa: F401

    _use_tracking_uri(args.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except Exception as err:
        print(f"captioner: cannot load {args.model}: {err}", file=sys.stderr)
        return 2
    names = list(data)
    params = {"beam_size": args.beam} if args.beam else None
    result = model.predict(pd.DataFrame({"image": [data[n] for n in names]}), params=params)
    status = 1 if errors else 0
    for name, row in zip(names, result.itertuples()):
        if row.error:
            print(f"{name}\tERROR: {row.error}", file=sys.stderr)
            status = 1
        else:
            print(f"{name}\t{row.caption}")
    return status


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning with Flickr8k models.")
    sub = parser.add_subparsers(dest="command", required=True)
    cap = sub.add_parser("caption", help="print one caption per image",
                         description="Print '<file>\\t<caption>' per image; errors go to stderr "
                                     "and make the exit status 1 (2: the model cannot be loaded).")
    cap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    cap.add_argument("--model", default=None,
                     help="MLflow model URI (default: models:/<register.model_name>@champion)")
    cap.add_argument("--beam", type=beam_size, default=None,
                     help=f"beam size 1..{MAX_BEAM} (1 = greedy; default: the model's)")
    cap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    app = sub.add_parser("app", help="serve a caption web page and JSON API over the champion",
                         description="A web page (drop photos, get captions) and POST /api/caption, "
                                     "GET /api/model, GET /healthz over models:/<name>@<alias>; the "
                                     "alias is checked every --poll-seconds and a new version is "
                                     "swapped in without a restart.")
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    app.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    app.add_argument("--model-name", default=None, help="registered model (default: register.model_name)")
    app.add_argument("--alias", default=ALIAS, help=f"alias to follow (default: {ALIAS})")
    app.add_argument("--poll-seconds", type=float, default=10.0,
                     help="how often to check the alias (default: 10)")
    app.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from params.yaml)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.command == "app":
        setup_logging()
        if args.poll_seconds <= 0:
            parser.error("--poll-seconds must be positive")
        from pipeline.app.routes import serve
        from pipeline.captioning import quiet_tensorflow  # noqa: F401

        name = args.model_name or _model_name()
        if name is None:
            parser.error("no params.yaml here to read register.model_name from: run from the project root "
                         "or pass --model-name")
        _use_tracking_uri(args.tracking_uri)
        sys.exit(serve(name, args.alias, args.host, args.port, args.poll_seconds))
    setup_logging(level=logging.WARNING)
    if args.model is None:
        name = _model_name()
        if name is None:
            parser.error("no params.yaml here to read register.model_name from: run from the project root "
                         "or pass --model models:/<name>@champion")
        args.model = f"models:/{name}@{ALIAS}"
    sys.exit(caption(args))


if __name__ == "__main__":
    main()
