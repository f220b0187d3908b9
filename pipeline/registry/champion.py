"""The registry's current champion, as a downstream app sees it: looked up by alias, loaded
from the registry, and asked to caption image files. Used by ``evaluate`` to score the champion
on exactly the test images the new model is scored on.

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


def current_version(client, model_name: str) -> str | None:
    """Version number holding the champion alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model_name, ALIAS).version)
    except MlflowException:
        return None


def caption_with_champion(client, model_name: str, images: list[Path], beam_size: int,
                          chunk: int = 16) -> ChampionRun:
    """Caption ``images`` with the champion (``beam_size`` 1 = greedy), ``chunk`` images per
    call or fewer when the champion's own row limit is lower."""
    import mlflow
    import pandas as pd

    version = current_version(client, model_name)
    if version is None:
        return ChampionRun(None, "none")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    except Exception as err:  # any failure to load is reported, never fatal
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("champion v%s of %s cannot be loaded (%s); it will be replaced", version,
                    model_name, message)
        return ChampionRun(version, "unloadable", message)
    run = ChampionRun(version, "scored")
    limits = model.unwrap_python_model().limits  # a dict in models registered before typed settings
    chunk = max(1, min(chunk, limits["max_rows"] if isinstance(limits, dict) else limits.max_rows))
    try:
        for lo in range(0, len(images), chunk):
            batch = pd.DataFrame({"image": [p.read_bytes() for p in images[lo:lo + chunk]]})
            out = model.predict(batch, params={"beam_size": beam_size})
            run.captions += out["caption"].fillna("").tolist()
            run.errors += out["error"].fillna("").tolist()
    except Exception as err:
        message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("champion v%s of %s failed to caption the test images (%s)", version,
                    model_name, message)
        return ChampionRun(version, "unloadable", message)
    return run


def judge(scores: "pd.DataFrame", evaluated: dict, current: str | None, metric: str, mode: str,
          key: str, min_improvement: float) -> tuple[str, str, dict | None]:
    """The paired decision (pure): (decision, why, comparison). ``scores`` are evaluate's per-image
    scores of the new model and the champion, ``evaluated`` is eval.json's champion entry,
    ``current`` the version holding the alias now. Promoted when there is no champion, when it
    could not be loaded, or when the 95% interval of the paired bootstrap lies above
    ``min_improvement``."""
    from pipeline.captioning.comparison import paired_bootstrap

    if current is None:
        return "promoted", "there was no champion", None
    if evaluated.get("version") != current:
        raise ValueError(
            f"the champion is v{current} but evaluate compared against "
            f"{'v' + str(evaluated.get('version')) if evaluated.get('version') else 'no champion'}; "
            "run `dvc repro -f -s evaluate register` to compare with the current one")
    if evaluated["status"] == "unloadable":
        return "promoted", f"champion v{current} could not be loaded ({evaluated['error']}); replaced", None
    both = scores[scores["mode"] == mode]
    candidate = both[both["model"] == "candidate"].set_index("image")
    champion = both[both["model"] == "champion"].set_index("image").loc[candidate.index]
    comparison = paired_bootstrap(candidate.reset_index(), champion.reset_index(), key)
    comparison["min_improvement"] = min_improvement
    if comparison["ci95_low"] > min_improvement:
        return "promoted", (f"{metric} +{comparison['difference']:.4f} on the same "
                            f"{comparison['images']} images, 95% interval [{comparison['ci95_low']:.4f}, "
                            f"{comparison['ci95_high']:.4f}] above {min_improvement}"), comparison
    return "kept_champion", (f"{metric} {comparison['difference']:+.4f} on the same "
                             f"{comparison['images']} images, 95% interval [{comparison['ci95_low']:.4f}, "
                             f"{comparison['ci95_high']:.4f}] does not clear {min_improvement}"), comparison
