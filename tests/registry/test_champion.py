"""The champion captions with the code it was registered with, whatever the work tree holds now."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipeline import paths

NAME = "flickr8k-captioner"

CAPTION = """
import json, sys
from pathlib import Path
import mlflow
import pipeline
from pipeline.registry.champion import caption_with_champion
images = [Path(p) for p in sys.argv[1:]]
mode = sys.stdin.read().strip()
if mode == "isolated":
    run = caption_with_champion(mlflow.MlflowClient(), "NAME", images, beam_size=3)
    print(json.dumps({"pipeline": pipeline.__file__, "captions": run.captions, "status": run.status}))
else:  # what evaluate did before: load the champion in this process
    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    import pandas as pd
    out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}), params={"beam_size": 3})
    print(json.dumps({"pipeline": pipeline.__file__, "captions": out["caption"].tolist(), "status": "in-process"}))
""".replace("NAME", NAME)


def caption_from(work_tree: Path, store: Path, images: list[Path], mode: str) -> dict:
    """Caption ``images`` with the champion from a process whose ``pipeline`` is ``work_tree``'s."""
    env = {**os.environ, "PYTHONPATH": str(work_tree), "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
    done = subprocess.run([sys.executable, "-c", CAPTION, *map(str, images)], input=mode, cwd=work_tree,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_code_change_in_the_work_tree_does_not_change_the_champions_captions(registered, tmp_path):
    root, _, _ = registered
    test = pd.read_parquet(root / paths.TEST_CAPTIONS)["image"].tolist()[:4]  # the served limit
    images = [root / "data/raw/synthetic/Images" / name for name in test]
    # today's work tree, then one whose decoding never writes the most frequent word
    changed = tmp_path / "changed"
    shutil.copytree(Path(__file__).resolve().parents[2] / "pipeline", changed / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    decoding = changed / "pipeline/captioning/decoding.py"
    source = decoding.read_text()
    ban = "    lp[:, [vocab.pad_id, vocab.start_id, vocab.unk_id]] = NEG_INF\n"
    assert ban in source
    decoding.write_text(source.replace(ban, ban + "    lp[:, 4] = NEG_INF  # changed: the commonest word is gone\n"))
    word = json.loads((root / paths.VOCAB).read_text())["words"][4]

    before = caption_from(root, root, images, "isolated")
    after = caption_from(changed, root, images, "isolated")
    assert after["pipeline"].startswith(str(changed))  # that process imported the changed code...
    assert after["status"] == before["status"] == "scored"
    assert after["captions"] == before["captions"]  # ...yet the champion captioned as registered
    assert any(word in c.split() for c in before["captions"])
    # what loading the champion in that process does: the changed code runs for it
    in_process = caption_from(changed, root, images, "in-process")
    assert not any(word in c.split() for c in in_process["captions"])


def scores_of(sets: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """evaluate's per-image scores where, per image set, the candidate writes the reference on
    ``(wins, losses)`` images and a wrong sentence on the others, the champion the other way
    round; the remaining 6 images both get right."""
    import itertools

    from pipeline.captioning.comparison import per_image_scores

    sentences = [f"a {c} {s} at the {p}" for c, s, p in itertools.product(
        ("red", "blue", "green", "yellow"), ("circle", "square", "triangle"), ("top", "left", "bottom"))]
    wrong = "two dogs run through deep snow together"
    frames = []
    for image_set, (wins, losses) in sets.items():
        n = wins + losses + 6
        right = sentences[:n]
        refs = [[r.split()] for r in right]
        candidate = right[:wins] + [wrong] * losses + right[wins + losses:]
        champion = [wrong] * wins + right[wins:]
        for model, captions in (("candidate", candidate), ("champion", champion)):
            stats = per_image_scores(refs, [c.split() for c in captions])
            frames.append(stats.assign(image=[f"{image_set}{i}.jpg" for i in range(n)], model=model,
                                       mode="beam", set=image_set))
    return pd.concat(frames, ignore_index=True)


def test_promotion_needs_one_set_better_and_the_other_not_worse():
    from pipeline.registry.champion import judge

    champion = {"version": "4", "status": "scored"}

    def decide(sets):
        return judge(scores_of(sets), champion, "4", "beam_cider", "beam", "cider", 0.0)

    decision, why, comparison = decide({"test": (8, 0)})  # no corrections held out
    assert decision == "promoted" and "feedback" not in comparison
    decision, why, comparison = decide({"test": (8, 0), "feedback": (0, 0)})
    assert decision == "promoted" and comparison["feedback"]["difference"] == 0
    assert "held-out corrected photos" in why
    # better on what people corrected, the test images unchanged: promoted
    assert decide({"test": (0, 0), "feedback": (8, 0)})[0] == "promoted"
    # better on the corrections but clearly worse on the test images: kept
    decision, why, _ = decide({"test": (0, 12), "feedback": (8, 0)})
    assert decision == "kept_champion" and "without getting worse on the other" in why
    # better on the test images, clearly worse on the corrections: kept
    assert decide({"test": (8, 0), "feedback": (0, 12)})[0] == "kept_champion"
    # no difference anywhere: kept
    assert decide({"test": (0, 0), "feedback": (0, 0)})[0] == "kept_champion"
    assert judge(scores_of({"test": (0, 0)}), champion, None, "beam_cider", "beam", "cider", 0.0)[0] == "promoted"


# -- who is champion, and what "cannot be loaded" may mean ------------------------------------

# A models-from-code file that runs where it was logged and not where it is loaded (the
# environment variable stands for a package missing there).
BROKEN_CODE = """
import os
import mlflow
if os.environ.get("CHAMPION_PACKAGE_MISSING"):
    raise ImportError("this champion needs a package that is not installed here")
class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input
mlflow.models.set_model(Echo())
"""


def registry_with_champion(store: Path, source: str):
    """A store whose registry holds NAME v1 as champion, its files at ``source``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source=source, run_id=None)
    client.set_registered_model_alias(NAME, "champion", version.version)
    return client


def test_a_relative_tracking_uri_reaches_the_champions_own_process(tmp_path, monkeypatch):
    """The default sqlite:///mlflow.db: the scoring process runs in a temporary folder and must
    still open this store (it used to open a new, empty one there and crown any model)."""
    import mlflow

    from pipeline.registry.champion import caption_with_champion

    client = registry_with_champion(tmp_path / "mlflow.db", str(tmp_path / "gone"))
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    try:
        run = caption_with_champion(mlflow.MlflowClient(), NAME, [], beam_size=1)
    finally:
        mlflow.set_tracking_uri(None)
    # the registry answered (its v1 was found there); only the files were missing
    assert (run.version, run.status, run.cause) == ("1", "unloadable", "files"), run
    assert client.get_model_version_by_alias(NAME, "champion").version == 1


def test_a_registry_that_does_not_know_the_champion_refuses_to_crown_another(tmp_path, monkeypatch):
    import mlflow
    import pytest

    from pipeline.registry.champion import ChampionUnreachable, caption_with_champion

    client = registry_with_champion(tmp_path / "mlflow.db", str(tmp_path / "gone"))
    empty = tmp_path / "other" / "mlflow.db"
    empty.parent.mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{empty}")  # the scoring process is handed another store
    try:
        with pytest.raises(ChampionUnreachable) as caught:
            caption_with_champion(client, NAME, [], beam_size=1)
    finally:
        mlflow.set_tracking_uri(None)
    message = str(caught.value)
    assert str(empty) in message and "the champion stays" in message and "not found" in message


def test_an_unreachable_registry_is_not_read_as_no_champion(monkeypatch):
    import mlflow
    import pytest

    from pipeline.registry.champion import ChampionUnreachable, current_version
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ChampionUnreachable, match="did not answer which version is champion"):
        current_version(mlflow.MlflowClient(tracking_uri=url), NAME)
    # an empty store that answers: there is no champion yet
    assert current_version(mlflow.MlflowClient(tracking_uri="sqlite:///:memory:"), NAME) is None


def test_a_champion_whose_code_cannot_run_here_is_unloadable_not_unreachable(tmp_path, monkeypatch):
    import mlflow

    from pipeline.registry.champion import caption_with_champion

    code = tmp_path / "broken_model.py"
    code.write_text(BROKEN_CODE)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        mlflow.set_experiment("broken-champion")  # not the experiment another test left active
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="m", python_model=str(code), registered_model_name=NAME,
                                    pip_requirements=["mlflow"])
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(NAME, "champion", "1")
        monkeypatch.setenv("CHAMPION_PACKAGE_MISSING", "1")
        run = caption_with_champion(client, NAME, [], beam_size=1)
    finally:
        mlflow.set_tracking_uri(None)
    assert (run.status, run.cause) == ("unloadable", "code") and "not installed here" in run.error, run
