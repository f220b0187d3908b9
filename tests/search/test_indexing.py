"""`captioner index` and `captioner search` over a folder of synthetic photos, with the session's
registered champion: the right photos first, every change to the folder handled as it should,
a new champion that reuses the stored embeddings, and queries a careless user or a hostile
caller would type."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline import paths
from pipeline.search.indexing import index_folder
from pipeline.search.photo_index import PhotoIndex, PhotoIndexError
from pipeline.search.ranking import Searcher

NAME = "flickr8k-captioner"


@pytest.fixture(scope="module")
def champion(registered):
    """The session's champion, loaded in this process as `captioner index` loads it."""
    import mlflow

    from pipeline.registry.champion import load_champion_model

    root, _, _ = registered
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    identity, model = load_champion_model(NAME)
    return root, identity, model


def references(root: Path) -> dict[str, list[str]]:
    """What people wrote for each synthetic image (the token file the dataset came with)."""
    table = pd.read_csv(root / "data/raw/synthetic" / paths.TOKEN_FILE, sep="\t", header=None, names=["key", "text"])
    table["image"] = table["key"].str.split("#").str[0]
    return table.groupby("image")["text"].apply(list).to_dict()


@pytest.fixture
def photos(champion, tmp_path):
    """Sixteen of the synthetic test-split photos in a folder with a subfolder, as a user keeps them."""
    root, _, _ = champion
    captions = pd.read_parquet(root / paths.CAPTIONS)
    names = sorted(captions["image"].unique())[:16]
    folder = tmp_path / "Photos"
    (folder / "2026" / "summer").mkdir(parents=True)
    for i, name in enumerate(names):
        target = folder / ("2026/summer" if i % 2 else "") / name
        shutil.copy(root / "data/raw/synthetic/Images" / name, target)
    return folder, names


def test_a_photo_is_found_by_what_people_wrote_about_it(champion, photos, tmp_path):
    root, identity, model = champion
    folder, names = photos
    store = PhotoIndex(tmp_path / "index.db")
    report = index_folder(folder, store, model, identity, batch_size=5, progress=False)
    assert (report.new, report.embedded, report.errors) == (16, 16, [])
    assert store.counts() == {"ok": 16}
    refs = references(root)
    searcher = Searcher(store, model)
    ranks = []
    for name in names:
        query = refs[name][0]  # what a person wrote, e.g. "A red circle on the left on a blue background ."
        hits = [Path(h.photo.path).name for h in searcher.search(query, 16, "likelihood").hits]
        ranks.append(hits.index(name) + 1)
    # a barely trained decoder on a random-init CNN (colour and background carry most queries):
    # measured R@3 0.6; by chance it would be 3 in 16
    assert sum(r <= 3 for r in ranks) >= 8, ranks
    # the caption the model wrote for a photo finds that photo first (or one it wrote the same for)
    firsts = 0
    for photo in store.all(False):
        top = searcher.search(photo.caption, 1, "likelihood").hits[0].photo
        firsts += top.path == photo.path or top.caption == photo.caption
    assert firsts >= 9, f"{firsts} of 16"  # measured 11; by chance, 1
    photo = store.by_path(next(p for p in (p.path for p in store.all(False)) if "summer" in p))
    assert photo.caption and photo.candidates[0]["caption"] == photo.caption
    assert photo.model == identity and photo.backbone == model.backbone_digest
    assert photo.embedding.shape == (2048,) and len(photo.sha256) == 64


def test_reindexing_does_only_what_changed(champion, photos, tmp_path):
    _, identity, model = champion
    folder, names = photos
    store = PhotoIndex(tmp_path / "index.db")
    index_folder(folder, store, model, identity, batch_size=8, progress=False)
    before = {p.path: p for p in store.all()}
    moved_from = folder / names[0]
    moved_to = folder / "2026" / "renamed.jpg"
    moved_from.rename(moved_to)  # moved: the same content elsewhere
    (folder / "2026/summer" / names[1]).unlink()  # deleted
    shutil.copy(folder / names[2], folder / "2026" / "copy-of-a-photo.jpg")  # added (a copy: content of a live one)
    (folder / names[4]).write_bytes(b"\xff\xd8 this JPEG was cut short")  # corrupted
    (folder / "notes.txt").write_text("not a photo")  # ignored: not a photo suffix
    report = index_folder(folder, store, model, identity, batch_size=8, progress=False)
    assert (report.moved, report.removed, report.new, report.changed) == (1, 1, 1, 1)
    assert report.embedded == 1 and report.unchanged == 13  # the new copy; the corrupt file is an error
    assert [path for path, _ in report.errors] == [names[4]]
    assert report.errors[0][1].startswith("corrupt image: cannot decode")
    after = {p.path: p for p in store.all()}
    assert "2026/renamed.jpg" in after and names[0] not in after
    assert after["2026/renamed.jpg"].embedding.tobytes() == before[names[0]].embedding.tobytes()  # not recomputed
    assert after["2026/renamed.jpg"].indexed_at == before[names[0]].indexed_at
    assert after[names[4]].status == "error" and f"2026/summer/{names[1]}" not in after
    again = index_folder(folder, store, model, identity, batch_size=8, progress=False)
    assert (again.unchanged, again.embedded, again.errors) == (16, 0, [])  # the broken file stays recorded


def test_a_new_champion_with_the_same_cnn_reuses_the_embeddings(champion, photos, tmp_path, monkeypatch):
    _, identity, model = champion
    folder, _ = photos
    store = PhotoIndex(tmp_path / "index.db")
    index_folder(folder, store, model, identity, batch_size=8, progress=False)
    stored = {p.path: p.embedding.tobytes() for p in store.all()}
    calls = []
    monkeypatch.setattr(model, "embed", lambda pixels: calls.append(len(pixels)))  # the CNN must not run
    report = index_folder(folder, store, model, f"{NAME}/2", batch_size=8, progress=False)
    assert (report.recaptioned, report.embedded, calls) == (16, 0, [])
    after = store.all()
    assert {p.path: p.embedding.tobytes() for p in after} == stored
    assert {p.model for p in after} == {f"{NAME}/2"}


def test_queries_a_careless_user_or_a_hostile_caller_would_type(champion, photos, tmp_path):
    _, identity, model = champion
    folder, _ = photos
    store = PhotoIndex(tmp_path / "index.db")
    index_folder(folder, store, model, identity, batch_size=16, progress=False)
    searcher = Searcher(store, model)
    for ranking in ("likelihood", "bm25", "blend"):
        empty = searcher.search("   ", 5, ranking)
        assert empty.hits == [] and empty.notes == ["the query has no words to search for"]
        for query in ('"red', "red*", "red NEAR blue", "a'; DROP TABLE photos; --", "()^:-", "red AND OR NOT"):
            searcher.search(query, 5, ranking)  # answered, whatever the engines' syntax would make of it
        long = searcher.search("red circle " * 1000, 5, ranking)  # 10,000 characters
        assert len(long.hits) == 5
    unknown = searcher.search("zebra giraffe", 5, "likelihood")
    assert "words the model does not know, left out: giraffe, zebra" in unknown.notes
    assert unknown.ranking == "bm25" and unknown.hits == []
    cut = searcher.search("red circle " * 1000, 5, "likelihood")
    assert f"the query was cut to its first {model.vocab.max_length} words" in cut.notes
    assert store.counts() == {"ok": 16}  # nothing was dropped


def test_an_index_belongs_to_one_folder(champion, photos, tmp_path):
    _, identity, model = champion
    folder, _ = photos
    store = PhotoIndex(tmp_path / "index.db")
    index_folder(folder, store, model, identity, batch_size=16, progress=False)
    other = tmp_path / "Other"
    other.mkdir()
    with pytest.raises(PhotoIndexError, match=r"indexes .*Photos, not .*Other: give another --db"):
        index_folder(other, store, model, identity, batch_size=16, progress=False)


def test_links_out_of_the_folder_are_not_followed(champion, photos, tmp_path):
    _, identity, model = champion
    folder, names = photos
    outside = tmp_path / "private"
    outside.mkdir()
    shutil.copy(folder / names[0], outside / "secret.jpg")
    (folder / "link.jpg").symlink_to(outside / "secret.jpg")
    (folder / "dir-link").symlink_to(outside)
    report = index_folder(folder, PhotoIndex(tmp_path / "index.db"), model, identity, batch_size=16, progress=False)
    assert report.on_disk == 16


def test_the_command_line_indexes_and_searches(champion, photos, tmp_path):
    root, _, _ = champion
    folder, names = photos
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    db = tmp_path / "cli.db"
    done = subprocess.run([*cli, "index", str(folder), "--db", str(db), "--model-name", NAME, "-q"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "new 16" in done.stdout and "embedded 16" in done.stdout
    found = subprocess.run([*cli, "search", "a red circle", "--db", str(db), "--model-name", NAME, "--json",
                            "--limit", "4"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert found.returncode == 0, found.stderr
    body = json.loads(found.stdout)
    assert len(body["results"]) == 4 and body["ranking"] == "likelihood"
    assert all((Path(body["root"]) / r["path"]).is_file() for r in body["results"])
    # each photo keeps how sure the model was of its caption; the tiny model is never sure
    assert all(0 <= r["confidence"] < 0.8 and r["confidence_words"] for r in body["results"]), body
    sure = subprocess.run([*cli, "search", "a red circle", "--db", str(db), "--model-name", NAME, "--json",
                           "--min-confidence", "0.8"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert sure.returncode == 0, sure.stderr
    kept = json.loads(sure.stdout)
    assert kept["results"] == [] and any("confidence >= 0.8" in n for n in kept["notes"])
    bad = subprocess.run([*cli, "search", "red", "--db", str(db), "--min-confidence", "2"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr
    like = subprocess.run([*cli, "search", "--like", str(folder / names[0]), "--db", str(db), "--limit", "2",
                           "--model-name", NAME], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert like.returncode == 0 and names[0] not in like.stdout.splitlines()[0]  # itself left out
    bm25 = subprocess.run([*cli, "search", "red", "--ranking", "bm25", "--db", str(db)],  # no model needed
                          capture_output=True, text=True, env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                          cwd=tmp_path, timeout=120)
    assert bm25.returncode == 0 and "red" in bm25.stdout
    nothing = subprocess.run([*cli, "search", "--db", str(db)], capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "QUERY" in nothing.stderr and "Traceback" not in nothing.stderr


def test_names_that_are_not_utf8_or_hold_tabs_and_line_breaks(champion, photos, tmp_path):
    """A name that is not UTF-8 is reported and skipped (the rest is indexed, every run); names
    with tabs or line breaks stay one line of search's tab-separated output."""
    root, _, _ = champion
    folder, names = photos
    data = (folder / names[0]).read_bytes()
    with open(os.fsencode(folder) + b"/bad\xffbytes.jpg", "wb") as f:
        f.write(data)
    (folder / "tab\there.jpg").write_bytes(data)
    (folder / "new\nline.jpg").write_bytes(data)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    cli = [sys.executable, "-m", "pipeline.cli"]
    db = tmp_path / "names.db"
    for _ in range(2):  # a rerun meets the same name and goes on too
        done = subprocess.run([*cli, "index", str(folder), "--db", str(db), "--model-name", NAME, "-q"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "bad\\xffbytes.jpg\tERROR: file name is not valid UTF-8" in done.stderr
        assert "Traceback" not in done.stderr
    assert PhotoIndex(db).counts() == {"ok": 18}
    found = subprocess.run([*cli, "search", "a red circle", "--db", str(db), "--limit", "50", "--model-name", NAME],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    lines = found.stdout.splitlines()
    assert len(lines) == 18 and all(len(line.split("\t")) == 4 for line in lines)  # score, path, caption, how sure
    assert any(line.split("\t")[1].endswith("tab\\there.jpg") for line in lines)
    assert any(line.split("\t")[1].endswith("new\\nline.jpg") for line in lines)


def test_what_a_person_wrote_into_a_photo_is_stored_searched_and_marked(champion, photos, tmp_path):
    """Alt text a person wrote into a photo (XMP) is stored beside the caption and found first,
    marked as theirs; what a model wrote there is not taken for a person's; hostile XMP is not read."""
    from pipeline.data.photo_metadata import PhotoMetadata
    from tests.data.test_photo_metadata import LAUGHS
    from tests.helpers import exiftool

    exiftool()
    _, identity, model = champion
    folder, names = photos
    described, machine, hostile = folder / names[0], folder / "2026/summer" / names[1], folder / names[2]
    with PhotoMetadata() as tool:
        (text,) = tool.read([described], for_writing=True)
        tool.write(text, {"alt_text": "Grandma feeding a zebra under an umbrella."}, {})
        (text,) = tool.read([machine], for_writing=True)  # written by a model, with its record
        tool.write(text, {"alt_text": "A zebra by an umbrella."}, {"Model": NAME, "ModelVersion": "1",
                                                                  "AltText": "A zebra by an umbrella."})
    image = hostile.read_bytes()  # a JPEG whose XMP declares entities (a billion laughs)
    hostile.write_bytes(image[:2] + b"\xff\xe1" + (len(LAUGHS) + 31).to_bytes(2, "big")
                        + b"http://ns.adobe.com/xap/1.0/\x00" + LAUGHS + image[2:])
    store = PhotoIndex(tmp_path / "index.db")
    with PhotoMetadata() as tool:
        report = index_folder(folder, store, model, identity, batch_size=5, progress=False, metadata=tool)
    assert report.embedded == 16 and report.errors == [] and report.described_by_person == 1
    assert [name for name, _ in report.metadata_unread] == [names[2]]
    assert "DTD or entities" in report.metadata_unread[0][1]
    row = store.by_path(names[0])
    assert (row.person_field, row.person_text) == ("alt_text", "Grandma feeding a zebra under an umbrella.")
    assert store.by_path(f"2026/summer/{names[1]}").person_text == ""  # a model's words are not a person's
    searcher = Searcher(store, model)
    for ranking in ("likelihood", "bm25", "blend"):
        result = searcher.search("zebra umbrella", 3, ranking, min_confidence=0.8)  # the tiny model is never sure
        assert [h.photo.path for h in result.hits] == [names[0]], (ranking, result.notes)
        body = result.to_json()["results"][0]
        assert body["found_in_person_text"] is True
        assert body["person"] == {"field": "alt_text", "text": "Grandma feeding a zebra under an umbrella.",
                                  "written_by": "a person"}
    # the person edits their words: the next run stores the new ones, and finds by them only
    with PhotoMetadata() as tool:
        (text,) = tool.read([described], for_writing=True)
        tool.write(text, {"alt_text": "Grandpa with a kite."}, {})
        again = index_folder(folder, store, model, identity, batch_size=5, progress=False, metadata=tool)
    assert again.changed == 1 and store.by_path(names[0]).person_text == "Grandpa with a kite."
    assert not any(h.by_person for h in searcher.search("zebra umbrella", 3, "bm25").hits)
    assert searcher.search("kite grandpa", 1, "likelihood").hits[0].photo.path == names[0]
