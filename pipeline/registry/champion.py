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

A champion that cannot be found or loaded is not an error here: the result says so, and
``register`` then replaces it (a registry with a broken champion must not block retraining).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


from pipeline.errors import ReportedError

log = logging.getLogger(__name__)

ALIAS = "champion"


@dataclass
class ChampionRun:
    version: str | None  # None: the model has no champion
    status: str  # "none" | "unloadable" | "scored"
    error: str = ""
    captions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"version": self.version, "status": self.status, "error": self.error,
                "failed_images": sum(1 for e in self.errors if e)}


def load_champion_model(model_name: str, alias: str = ALIAS):
    """(``name/version``, the loaded CaptionModel) of the version ``alias`` points at, in this
    process (for apps and tools that run today's code: photo search, alt text)."""
    import mlflow
    from mlflow import MlflowClient

    try:
        version = str(MlflowClient().get_model_version_by_alias(model_name, alias).version)
    except Exception as err:  # MlflowException: no such model or alias
        raise ChampionError(f"no model version holds {model_name}@{alias} in {mlflow.get_tracking_uri()} "
                            f"({str(err).splitlines()[0]}): run the pipeline (dvc repro) first") from None
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}").unwrap_python_model()
    except Exception as err:
        raise ChampionError(f"{model_name} v{version} cannot be loaded: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]}") from None
    return f"{model_name}/{version}", model


class ChampionError(ReportedError):
    """The champion cannot be found or loaded."""


def current_version(client, model_name: str) -> str | None:
    """Version number holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, ALIAS).version)
    except MlflowException:
        return None


# Run by ``python -I -c`` with the request on stdin (JSON): MLflow and the model only, never
# this work tree's ``pipeline``. Prints one JSON line: captions, errors, the code it ran.
_CHAMPION_PROCESS = r"""
import json, sys, tempfile
from pathlib import Path
request = json.load(sys.stdin)
import mlflow
import pandas as pd
mlflow.set_tracking_uri(request["tracking_uri"])
local = Path(mlflow.artifacts.download_artifacts(request["model_uri"], dst_path=tempfile.mkdtemp()))
model = mlflow.pyfunc.load_model(str(local))
code = Path(sys.modules["pipeline"].__file__).resolve()
if not code.is_relative_to(local.resolve()):
    raise SystemExit(f"the champion ran {code}, not the code packaged with it in {local}")
limits = model.unwrap_python_model().limits  # a dict in models registered before typed settings
chunk = max(1, min(request["chunk"], limits["max_rows"] if isinstance(limits, dict) else limits.max_rows))
images = request["images"]
captions, errors = [], []
for lo in range(0, len(images), chunk):
    batch = pd.DataFrame({"image": [Path(p).read_bytes() for p in images[lo:lo + chunk]]})
    out = model.predict(batch, params={"beam_size": request["beam_size"]})
    captions += out["caption"].fillna("").tolist()
    errors += out["error"].fillna("").tolist()
print(json.dumps({"captions": captions, "errors": errors, "code": str(code)}))
"""


def caption_with_champion(client, model_name: str, images: list[Path], beam_size: int,
                          chunk: int = 16, timeout_s: float = 3600) -> ChampionRun:
    """Caption ``images`` with the champion (``beam_size`` 1 = greedy), ``chunk`` images per
    call or fewer when the champion's own row limit is lower, in a process that runs only the
    champion's own code (module docstring)."""
    import json
    import subprocess
    import sys
    import tempfile

    import mlflow

    version = current_version(client, model_name)
    if version is None:
        return ChampionRun(None, "none")
    request = {"model_uri": f"models:/{model_name}/{version}", "tracking_uri": mlflow.get_tracking_uri(),
               "images": [str(Path(p).resolve()) for p in images], "beam_size": beam_size, "chunk": chunk}
    log.info("captioning %d images with champion v%s of %s in a process of its own", len(images), version,
             model_name)
    with tempfile.TemporaryDirectory() as cwd:  # nothing of the work tree on the child's path
        try:
            done = subprocess.run([sys.executable, "-I", "-c", _CHAMPION_PROCESS], input=json.dumps(request),
                                  capture_output=True, text=True, cwd=cwd, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            done = None
    if done is None or done.returncode != 0:
        lines = [ln for ln in (done.stderr if done else "").strip().splitlines() if ln.strip()]
        message = lines[-1][:300] if lines else f"no answer within {timeout_s:.0f} s"
        log.warning("champion v%s of %s cannot caption the test images (%s); it will be replaced", version,
                    model_name, message)
        return ChampionRun(version, "unloadable", message)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log.info("champion v%s captioned with its own code (%s)", version, result["code"])
    return ChampionRun(version, "scored", captions=result["captions"], errors=result["errors"])


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
        return "promoted", f"champion v{current} could not be loaded ({evaluated['error']}); replaced", None
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
