"""The registry's champion: its alias, the version holding it, captioning with it, and the
paired decision (``judge``) that moves the alias.

``evaluate`` scores the champion on exactly the test images the new model is scored on, with
the champion's own code: the registered model carries the ``pipeline`` package it was registered
with, but a process that has already imported today's ``pipeline`` would run today's code for
it (Python keeps the first ``pipeline`` it imported), so a code change would silently change how
the champion captions and the decision would compare the wrong thing. ``caption_with_champion``
therefore captions in a separate Python process (``python -I``: no working directory, no
PYTHONPATH) that imports only MLflow and the model, and checks that the ``pipeline`` it ran is
the one packaged with the model.

Two kinds of failure are told apart, because only one of them says anything about the champion:
- its files are gone or its packaged code cannot run here (the registry answered, the model did
  not): the result says so (``unloadable``, with the cause) and ``register`` replaces it, loudly (a
  registry with a broken champion must not block retraining);
- the registry could not be reached, does not know the model or answered an error: nothing is
  known about the champion, so nothing may replace it; ``ChampionUnreachable`` stops the stage.
The scoring process is handed absolute URIs (``current_tracking_uri``): it runs in a temporary
folder, where a relative ``sqlite:///mlflow.db`` would open a new, empty store.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


from pipeline.config import absolute_location, sqlite_file
from pipeline.errors import ReportedError, first_line
from pipeline.registry.tracking import current_tracking_uri

log = logging.getLogger(__name__)

ALIAS = "champion"


# Why a champion is ``unloadable`` (the registry answered; the model itself failed).
CAUSES = {"files": "its files cannot be fetched from the artifact store",
          "code": "its packaged code cannot run in this environment"}


@dataclass
class ChampionRun:
    version: str | None  # None: the model has no champion
    status: str  # "none" | "unloadable" | "scored"
    error: str = ""
    captions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cause: str = ""  # unloadable: a key of CAUSES

    def summary(self) -> dict:
        return {"version": self.version, "status": self.status, "error": self.error, "cause": self.cause,
                "failed_images": sum(1 for e in self.errors if e)}


class ChampionUnreachable(ReportedError):
    """The registry could not say what the champion is or hand it over: no model may replace it."""


def unreachable(uri: str, model_name: str, what: str, err: str) -> ChampionUnreachable:
    """One paragraph: the store, what failed, and the ways out; the champion stays."""
    return ChampionUnreachable(
        f"cannot compare with the champion of {model_name}: the registry at {uri} {what} ({err}). "
        "No new model is promoted while the champion cannot be judged; the champion stays. Check that "
        "mlflow.tracking_uri in params.yaml (or MLFLOW_TRACKING_URI) names the store that holds "
        f"{model_name} and that it is reachable, then rerun `dvc repro`. If the champion was removed from "
        f"the registry on purpose, delete its alias (MlflowClient().delete_registered_model_alias("
        f"'{model_name}', '{ALIAS}')) and the next model is promoted as the first one.")


def load_champion_model(model_name: str, alias: str = ALIAS):
    """(``name/version``, the loaded CaptionModel) of the version ``alias`` points at, in this
    process (for apps and tools that run today's code: photo search, alt text)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.registry.tracking import store_error

    try:
        version = str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except MlflowException as err:
        if not _nothing_there(err, alias):  # the store answered something else: say which store
            raise store_error(current_tracking_uri(), err) from None
        raise ChampionError(f"no model version holds {model_name}@{alias} in {mlflow.get_tracking_uri()} "
                            f"({str(err).splitlines()[0]}): run the pipeline (dvc repro) first") from None
    except Exception as err:  # a damaged database, a connection error
        raise store_error(current_tracking_uri(), err) from None
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").unwrap_python_model()
    except Exception as err:
        raise ChampionError(f"{model_name} v{version} cannot be loaded: "
                            f"{describe_load_error(MlflowClient(), model_name, version, err)}") from None
    return f"{model_name}/{version}", model


def describe_load_error(client, name: str, version, err: Exception) -> str:
    """Why a version did not load, in words: MLflow says ``No such artifact: ''`` when the
    version's files are gone; name them instead, and the likely cause when the store was copied."""
    number = getattr(version, "version", version)
    text = first_line(err)
    try:
        location = client.get_model_version_download_uri(name, number)
    except Exception:
        return text
    local = location.removeprefix("file://")
    if "://" not in local and not Path(local).exists():
        moved = ""
        store = current_tracking_uri()
        database = sqlite_file(store)
        if database is not None:
            home = database.parent
            if not Path(local).is_relative_to(home):
                moved = (f"; the store {store} names files outside its own folder {home}: if the project was "
                         "copied or moved, its mlflow.db still points at the old folder: put mlruns/ back there, "
                         "or register the current model in this store again (dvc repro -f -s register)")
        return (f"its files are missing: {local} does not exist (restore them or point @{ALIAS} at another "
                f"version){moved}")
    if "://" not in local and not (Path(local) / "MLmodel").is_file():
        return f"its files at {local} have no MLmodel: not a complete model ({text})"
    return f"{text} (files at {location})"


class ChampionError(ReportedError):
    """The champion cannot be found or loaded."""


def current_version(client, model_name: str) -> str | None:
    """Version number holding the champion alias; None when the registry answers that there is
    none (no such model yet, or no version holds the alias). ChampionUnreachable when it does not
    answer or answers another error: "no champion" would crown any model."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, ALIAS).version)
    except MlflowException as err:
        if _nothing_there(err, ALIAS):
            return None
        raise unreachable(client.tracking_uri, model_name, "did not answer which version is champion",
                          first_line(err)) from None
    except Exception as err:  # requests' connection errors, a damaged database
        raise unreachable(client.tracking_uri, model_name, "did not answer which version is champion",
                          first_line(err)) from None


def _nothing_there(err, alias: str) -> bool:
    """Did the registry answer "no such model" or "no version holds that alias"?"""
    return err.error_code == "RESOURCE_DOES_NOT_EXIST" or (
        err.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in str(err))


# Run by ``python -I -c`` with the request on stdin (JSON): MLflow and the model only, never
# this work tree's ``pipeline``. Prints one JSON line: captions, errors, the code it ran; or which
# step failed ("registry": the store did not answer; "files"/"code": the model did not) and why.
_CHAMPION_PROCESS = r"""
import json, sys, tempfile
from pathlib import Path
request = json.load(sys.stdin)

def fail(step, err):
    first = (str(err).strip().splitlines() or [""])[0][:300]
    print(json.dumps({"failed": step, "error": f"{type(err).__name__}: {first}"}))
    raise SystemExit(3)

import mlflow
import pandas as pd
mlflow.set_tracking_uri(request["tracking_uri"])
mlflow.set_registry_uri(request["registry_uri"])
client = mlflow.MlflowClient()
name, version = request["model_name"], request["version"]
try:
    client.get_model_version(name, version)
except Exception as err:
    fail("registry", err)
try:
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tempfile.mkdtemp()))
except Exception as err:
    try:  # the registry still answers: the model's files are what is missing
        client.get_model_version(name, version)
    except Exception as again:
        fail("registry", again)
    fail("files", err)
if not (local / "MLmodel").is_file():  # a missing folder downloads as an empty one
    fail("files", FileNotFoundError(f"no MLmodel among the files of {name} v{version}"))
try:
    model = mlflow.pyfunc.load_model(str(local))
    code = Path(sys.modules["pipeline"].__file__).resolve()
    if not code.is_relative_to(local.resolve()):
        raise RuntimeError(f"the champion ran {code}, not the code packaged with it in {local}")
    limits = model.unwrap_python_model().limits  # a dict in models registered before typed settings
    chunk = max(1, min(request["chunk"], limits["max_rows"] if isinstance(limits, dict) else limits.max_rows))
    images = request["images"]
    captions, errors = [], []
    for lo in range(0, len(images), chunk):
        batch = pd.DataFrame({"image": [Path(p).read_bytes() for p in images[lo:lo + chunk]]})
        out = model.predict(batch, params={"beam_size": request["beam_size"]})
        captions += out["caption"].fillna("").tolist()
        errors += out["error"].fillna("").tolist()
except Exception as err:
    fail("code", err)
print(json.dumps({"captions": captions, "errors": errors, "code": str(code)}))
"""


def caption_with_champion(client, model_name: str, images: list[Path], beam_size: int,
                          chunk: int = 16, timeout_s: float = 3600) -> ChampionRun:
    """Caption ``images`` with the champion (``beam_size`` 1 = greedy), ``chunk`` images per
    call or fewer when the champion's own row limit is lower, in a process that runs only the
    champion's own code (module docstring). ChampionUnreachable when the registry cannot say
    or hand over what the champion is."""
    import subprocess
    import sys
    import tempfile

    import mlflow

    version = current_version(client, model_name)
    if version is None:
        return ChampionRun(None, "none")
    uri = current_tracking_uri()
    request = {"model_name": model_name, "version": version, "tracking_uri": uri,
               "registry_uri": absolute_location(mlflow.get_registry_uri(), Path.cwd()),
               "images": [str(Path(p).resolve()) for p in images], "beam_size": beam_size, "chunk": chunk}
    log.info("captioning %d images with champion v%s of %s in a process of its own", len(images), version,
             model_name)
    with tempfile.TemporaryDirectory() as cwd:  # nothing of the work tree on the child's path
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _CHAMPION_PROCESS], input=json.dumps(request),
                                  capture_output=True, text=True, cwd=cwd, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            done = None
    answer = _last_json(done.stdout) if done else None
    if answer is not None and answer.get("failed") == "registry":
        raise unreachable(uri, model_name, f"could not hand over champion v{version}", answer["error"])
    if answer is None or "failed" in answer or done.returncode != 0:
        if answer is not None and "failed" in answer:
            cause, message = answer["failed"], answer["error"]
        else:  # killed, crashed or hung: it did not run here
            lines = [ln for ln in (done.stderr if done else "").strip().splitlines() if ln.strip()]
            cause, message = "code", lines[-1][:300] if lines else f"no answer within {timeout_s:.0f} s"
        log.warning("champion v%s of %s cannot caption the test images: %s (%s); it will be replaced "
                    "without a comparison", version, model_name, CAUSES[cause], message)
        return ChampionRun(version, "unloadable", message, cause=cause)
    log.info("champion v%s captioned with its own code (%s)", version, answer["code"])
    return ChampionRun(version, "scored", captions=answer["captions"], errors=answer["errors"])


def _last_json(stdout: str) -> dict | None:
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def _paired(scores: "pd.DataFrame", mode: str, key: str, image_set: str) -> dict | None:
    """Paired bootstrap of the new model against the champion on one image set (None: no rows)."""
    from pipeline.captioning.comparison import paired_bootstrap

    both = scores[(scores["mode"] == mode) & (scores["set"] == image_set)] if "set" in scores else (
        scores[scores["mode"] == mode] if image_set == "test" else scores.iloc[0:0])
    candidate = both[both["model"] == "candidate"].set_index("image")
    champion = both[both["model"] == "champion"].set_index("image")
    if candidate.empty or champion.empty:
        return None
    return paired_bootstrap(candidate.reset_index(), champion.loc[candidate.index].reset_index(), key)


def _interval(metric: str, c: dict, where: str) -> str:
    return (f"{metric} {c['difference']:+.4f} on {c['images']} {where}, 95% interval "
            f"[{c['ci95_low']:.4f}, {c['ci95_high']:.4f}]")


def judge(scores: "pd.DataFrame", evaluated: dict, current: str | None, metric: str, mode: str,
          key: str, min_improvement: float) -> tuple[str, str, dict | None]:
    """The paired decision (pure): (decision, why, comparison). ``scores`` are evaluate's per-image
    scores of the new model and the champion (column ``set``: ``test``, and ``feedback`` for the
    corrected photos held out from training), ``evaluated`` is eval.json's champion entry,
    ``current`` the version holding the alias now.

    Promoted when there is no champion, when it could not be loaded, or when on one image set the
    95% interval of the paired bootstrap lies above ``min_improvement`` ("better") while on the
    other it does not lie below 0 ("not worse"). The held-out corrections are photos people found
    the champion wrong on, so any challenger tends to look better there: that alone never promotes,
    the Flickr8k test images must not get worse; and a model better on the test images must not get
    worse on what people corrected."""
    if current is None:
        return "promoted", "there was no champion", None
    if evaluated.get("version") != current:
        raise ValueError(
            f"the champion is v{current} but evaluate compared against "
            f"{'v' + str(evaluated.get('version')) if evaluated.get('version') else 'no champion'}; "
            "run `dvc repro -f -s evaluate register` to compare with the current one")
    if evaluated["status"] == "unloadable":
        cause = CAUSES.get(evaluated.get("cause", ""), "it could not be loaded")
        return "promoted", (f"champion v{current} could not be loaded: {cause} ({evaluated['error']}); "
                            "replaced without a comparison"), None
    if evaluated["status"] != "scored":
        raise ValueError(f"evaluate did not score champion v{current} (status {evaluated['status']!r}); "
                         "run `dvc repro -f -s evaluate register` to compare with it")
    test = _paired(scores, mode, key, "test")
    feedback = _paired(scores, mode, key, "feedback")
    comparison = {**test, "min_improvement": min_improvement}
    if feedback is not None:
        comparison["feedback"] = feedback

    def better(c: dict | None) -> bool:
        return c is not None and c["ci95_low"] > min_improvement

    def not_worse(c: dict | None) -> bool:
        return c is None or c["ci95_high"] >= 0

    why = _interval(metric, test, "test images")
    if feedback is not None:
        why += "; " + _interval(metric, feedback, "held-out corrected photos, against the corrections")
    if better(test) and not_worse(feedback):
        return "promoted", f"{why}: better on the test images (above {min_improvement})" + (
            ", not worse on the corrections" if feedback else ""), comparison
    if better(feedback) and not_worse(test):
        return "promoted", f"{why}: better on the corrected photos, not worse on the test images", comparison
    return "kept_champion", f"{why}: does not clear {min_improvement} on one set without getting worse on the other", comparison
