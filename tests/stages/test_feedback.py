"""The feedback stage: corrections from the store become a dataset in the project's own layout,
checked by the dataset's rules (bad ones quarantined with the reason), split by a stable hash of
the photo, exported byte for byte the same when nothing changed; then trained on, scored on the
held-out ones, and judged by register with both comparisons."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest

from pipeline import paths
from pipeline.feedback.export import held_out
from pipeline.feedback.store import LAST_EXPORT, FeedbackStore, sha256_of
from pipeline.stages import calibrate, download, evaluate, feedback, register, train, validate
from pipeline.stages._cli import StageError
from tests.helpers import run_features, synthetic_photos, tiny_settings


def folder_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def correct(store: FeedbackStore, photos: list[tuple[bytes, str]], model: str = "flickr8k-captioner/1",
            who: str = "tester") -> list[dict]:
    rows = []
    for i, (data, text) in enumerate(photos):
        caption_id = f"{who}-{i}-{sha256_of(data)[:8]}"
        store.served([{"id": caption_id, "model": model, "caption": "something else", "image_sha256": sha256_of(data),
                       "trace_id": None}])
        rows.append(store.add(caption_id, "wrong", text, who, data))
    return rows


def test_export_is_checked_split_by_photo_and_the_same_bytes_when_nothing_changed(workdir):
    settings = tiny_settings(**{"feedback.test_share": 0.5})
    download.run(settings)
    store = FeedbackStore("feedback.db")
    good = synthetic_photos(8, seed=1)
    rows = correct(store, good)
    long = correct(store, [(good[0][0], " ".join(["word"] * 60))], who="verbose")  # over validate.max_tokens
    correct(store, [(b"these bytes are no photo", "a red circle on the left")], who="prankster")
    taken_back = correct(store, [(synthetic_photos(1, seed=9)[0][0], "a photo taken back")], who="shy")[0]
    assert store.delete(taken_back["id"], None, operator=True) == "deleted"

    summary = feedback.run(settings)
    assert summary["corrections"] == 10 and summary["kept"] == 8 and summary["rejected"] == 2
    kept = pd.read_parquet(paths.FEEDBACK_CAPTIONS)
    assert sorted(kept["caption_raw"]) == sorted(text for _, text in good)
    assert "a photo taken back" not in set(kept["caption_raw"])
    expected = {f"{sha256_of(d)}.jpg": "feedback" if held_out(sha256_of(d), 0.5) else "train" for d, _ in good}
    assert dict(zip(kept["image"], kept["split"])) == expected
    assert set(expected.values()) == {"train", "feedback"}  # 8 photos at 50%: both sides
    rejects = pd.read_parquet(paths.FEEDBACK_REJECTS).set_index("caption_raw")
    assert "tokens" in rejects.loc[long[0]["correction"], "reason"]
    assert rejects.loc["a red circle on the left", "image"].endswith(".bin")
    assert rejects.loc["a red circle on the left", "reason"]  # the image's reason, not a crash
    first = folder_digest(paths.FEEDBACK_DIR)
    assert store.meta(LAST_EXPORT) is not None

    feedback.run(settings)  # nothing new: the same bytes, so DVC runs nothing after it
    assert folder_digest(paths.FEEDBACK_DIR) == first
    assert store.delete(rows[0]["id"], None, operator=True) == "deleted"
    feedback.run(settings)  # a correction taken back is gone from the next export
    assert len(pd.read_parquet(paths.FEEDBACK_CAPTIONS)) == 7

    # a database edited by hand: a photo key that is a path is never followed
    import sqlalchemy as sa

    from pipeline.feedback.store import feedback as feedback_table

    with store.engine.begin() as conn:
        conn.execute(sa.update(feedback_table).where(feedback_table.c.id == rows[1]["id"])
                     .values(image_sha256="../../../escaped"))
    feedback.run(settings)
    assert len(pd.read_parquet(paths.FEEDBACK_CAPTIONS)) == 6
    assert not list(workdir.parent.glob("escaped*")) and not list(workdir.glob("escaped*"))
    # quarantined with the reason, not only logged: nothing leaves the export silently
    quarantined = pd.read_parquet(paths.FEEDBACK_REJECTS)
    lost = quarantined[quarantined["image"] == "../../../escaped"]
    assert len(lost) == 1 and lost.iloc[0]["reason"] == "missing image file"
    assert lost.iloc[0]["caption_raw"] == rows[1]["correction"]

    broken = tiny_settings(**{"feedback.db": "mysql://nowhere/feedback"})
    with pytest.raises(StageError, match="SQLite or PostgreSQL"):
        feedback.run(broken)
    assert len(pd.read_parquet(paths.FEEDBACK_CAPTIONS)) == 6  # the last export is untouched


@pytest.mark.slow
def test_corrections_train_the_next_model_and_register_judges_both_sets(workdir, monkeypatch):
    """A champion, then corrections of 24 new photos; the retrained model writes captions
    closer to the corrections on the corrected photos it trained on, is scored on the held-out
    ones beside the test split, and register records both comparisons."""
    import mlflow

    from pipeline.captioning.metrics import nltk_bleu
    from pipeline.registry.champion import caption_with_champion

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/mlflow.db")
    settings = tiny_settings(**{"data.synthetic.n_images": 120, "train.epochs": 20, "train.units": 64,
                                "train.learning_rate": 0.003, "register.metric": "beam_cider"})
    download.run(settings)
    validate.run(settings)
    run_features(settings)
    train.run(settings)
    calibrate.run(settings)
    evaluate.run(settings)
    assert register.run(settings)["decision"] == "promoted"  # no champion yet

    photos = synthetic_photos(24, seed=3)
    correct(FeedbackStore("feedback.db"), photos)
    run_features(settings)  # feedback export, the corrected photos' shard, merge
    kept = pd.read_parquet(paths.FEEDBACK_CAPTIONS)
    trained_on = kept[kept["split"] == "train"]
    files = [paths.FEEDBACK_DIR / "Images" / name for name in trained_on["image"]]
    references = [[text.split()] for text in trained_on["caption"]]
    client = mlflow.MlflowClient()
    before = caption_with_champion(client, settings.registry.model_name, files, 3).captions
    train.run(settings)
    calibrate.run(settings)
    metrics = evaluate.run(settings)
    held = int((kept["split"] == "feedback").sum())
    assert metrics["feedback"]["n_images"] == held > 0
    assert metrics["feedback"]["champion"]["status"] == "scored"
    report = register.run(settings)
    print("register:", report["decision"], report["reason"])
    assert "feedback" in report["comparison"] and report["comparison"]["feedback"]["images"] == held
    assert "held-out corrected photos" in report["reason"]
    scores = pd.read_parquet(paths.TEST_SCORES)
    assert set(scores["set"]) == {"test", "feedback"}

    run = json.loads(paths.TRAIN_RUN.read_text())["run_id"]
    assert client.get_run(run).data.params["data.feedback_corrections"] == str(len(trained_on))

    # the new model captions the corrected photos it trained on closer to what people wrote
    client.set_registered_model_alias(settings.registry.model_name, "champion", report["version"])
    after = caption_with_champion(client, settings.registry.model_name, files, 3).captions
    bleu = [nltk_bleu(references, [c.split() for c in captions])["bleu4"] for captions in (before, after)]
    print(f"BLEU-4 against the corrections, v1 -> v{report['version']}: {bleu[0]:.3f} -> {bleu[1]:.3f}")
    assert bleu[1] > bleu[0]
