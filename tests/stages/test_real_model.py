"""``captioner real-model`` end to end on the real Flickr8k features and photos of ``../shared``
(skipped, with the reason, where they are absent): the champion it registers captions real
photos through ``captioner caption``, shows where it looked for each word (``--attention``, the
app's page), finds them through ``captioner search`` and writes their alt text; a second model
is judged against it on the same dev photos.

The champion is the attention decoder over the real 7x7 grids of regions, trained on every train
caption for 2 epochs, on a dev split cut to the 113 photos and 187 more images, so the whole
module shares one model. It is weaker than ``params.yaml``'s (30 epochs), and still above the
bar a person would set for captions of real photos: beam BLEU-4 >= 0.15 on the 113 dev photos.
The second model is the pooled LSTM decoder, on a folder without grids."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.data.real_folder import EMBEDDINGS, GRID, read_captions
from tests.helpers import PROJECT, chromium, drop_files, write_params

REAL = PROJECT.parent / "shared" / "flickr8k_real"
NO_REAL = f"no real Flickr8k features and dev photos in {REAL}"
CAPTIONER = str(Path(sys.executable).with_name("captioner"))
DEV_IMAGES = 300
PARAMS = {"train.epochs": 2, "train.units": 256, "train.embedding_dim": 128, "train.batch_size": 64,
          "decoding.consensus.samples": 0, "evaluate.gallery_size": 6, "train.decoder": "attention"}


def cut(root: Path, train: int | None, dev: int, grid: bool = False) -> Path:
    """A folder in the shared layout: ``train`` train images (all when None), the dev photos and
    more dev images up to ``dev``, the photos copied (links out of a folder are not followed);
    with ``grid``, their grids of regions too."""
    root.mkdir(parents=True)
    photos = sorted(p.name for p in (REAL / "dev_photos").iterdir())
    by_hash = lambda names: sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())  # noqa: E731
    train_names = by_hash((REAL / "Flickr_8k.trainImages.txt").read_text().split())[:train]
    others = [n for n in by_hash((REAL / "Flickr_8k.devImages.txt").read_text().split()) if n not in photos]
    dev_names = photos + others[:dev - len(photos)]
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(train_names) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(dev_names) + "\n")
    keep = set(train_names) | set(dev_names)
    lines = (REAL / "Flickr8k.token.trainval.txt").read_text().splitlines(keepends=True)
    (root / "Flickr8k.token.trainval.txt").write_text("".join(x for x in lines if x.split("#", 1)[0] in keep))
    table = pq.read_table(REAL / EMBEDDINGS)
    pq.write_table(table.filter(pc.is_in(table["image"], pa.array(sorted(keep)))), root / EMBEDDINGS)
    if grid:
        table = pq.read_table(REAL / GRID)
        pq.write_table(table.filter(pc.is_in(table["image"], pa.array(sorted(keep)))), root / GRID)
    shutil.copytree(REAL / "dev_photos", root / "dev_photos")
    return root


def captioner(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the params' store
    return subprocess.run([CAPTIONER, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A project folder whose store's champion is the real model, and the command's output."""
    if not all((REAL / name).exists() for name in (EMBEDDINGS, GRID, "dev_photos")):
        pytest.skip(NO_REAL)
    project = tmp_path_factory.mktemp("real-project")
    write_params(project, **PARAMS)
    data = cut(tmp_path_factory.mktemp("real-data") / "flickr8k_real", None, DEV_IMAGES, grid=True)
    result = captioner(project, "real-model", "--data", str(data))
    assert result.returncode == 0, result.stderr[-3000:]
    return project, data, result.stdout


@pytest.fixture(scope="module")
def references():
    if not (REAL / EMBEDDINGS).is_file():
        pytest.skip(NO_REAL)
    captions, _ = read_captions(REAL, 1, 40)
    return captions.groupby("image")["caption"].apply(list).to_dict()


def test_a_work_folder_of_other_files_is_refused_before_anything_is_written(tmp_path):
    from pipeline.stages._cli import StageError
    from pipeline.stages.real_model import MARKER, claim

    project = tmp_path / "project"
    (project / "data" / "prepared").mkdir(parents=True)
    (project / "data" / "prepared" / "captions.parquet").write_bytes(b"the pipeline's own")
    with pytest.raises(StageError, match="holds other files"):
        claim(project)
    assert (project / "data" / "prepared" / "captions.parquet").read_bytes() == b"the pipeline's own"
    assert not (project / MARKER).exists()
    claim(tmp_path / "new")
    claim(tmp_path / "new")  # its own folder again: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(StageError, match="is a file"):
        claim(tmp_path / "file")


def test_a_folder_without_the_layout_is_refused_by_the_command(tmp_path):
    write_params(tmp_path, **PARAMS)
    (tmp_path / "empty").mkdir()
    result = captioner(tmp_path, "real-model", "--data", str(tmp_path / "empty"), timeout=300)
    assert result.returncode == 1
    assert "holds no token file" in result.stderr and "Traceback" not in result.stderr


def test_the_first_real_model_is_registered_as_champion_with_the_mobilenet(champion):
    project, data, out = champion
    assert re.search(r"flickr8k-captioner v1: promoted \(there was no champion\)", out), out
    report = json.loads((project / "real" / "reports" / "registry.json").read_text())
    assert report["decision"] == "promoted" and report["tracking_uri"] == f"sqlite:///{project}/mlflow.db"
    spec = json.loads((project / "real" / "data" / "features" / "mobilenet_v2_int8.backbone" / "spec.json").read_text())
    assert spec["spec"]["name"] == "mobilenet_v2_int8" and spec["spec"]["runtime"] == "tflite_int8"
    stored = pq.read_schema(project / "real" / "data" / "features" / "mobilenet_v2_int8.parquet")
    assert str(stored.field("grid").type) == "fixed_size_list<element: uint8>[15680]"  # the grids, as stored
    metrics = json.loads((project / "real" / "metrics" / "eval.json").read_text())
    assert metrics["n_images"] == DEV_IMAGES  # every dev image is scored, from its features
    assert metrics["beam"]["bleu4"] > metrics["baseline"]["bleu4"] + 0.05  # it looks at the photos


def test_the_champion_captions_the_dev_photos_as_people_do(champion, references):
    """The end-to-end bar: real photos, through the CLI a user runs, against the people's captions."""
    from pipeline.captioning.metrics import score
    from pipeline.data.caption_text import clean_caption

    project, data, _ = champion
    photos = sorted((REAL / "dev_photos").iterdir())
    result = captioner(project, "caption", "--json", *map(str, photos))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]).name for r in rows] == [p.name for p in photos]
    found = score([[c.split() for c in references[p.name]] for p in photos],
                  [clean_caption(r["caption"]).split() for r in rows])
    assert found["bleu4"] >= 0.15, found
    # every caption says how sure it is; real dev photos are what the model learnt from
    assert all(0 <= r["confidence"] <= 1 and r["confidence_words"] for r in rows)
    assert sum(r["abstained"] for r in rows) <= 0.05 * len(rows), [r for r in rows if r["abstained"]]


def test_pictures_unlike_photos_get_an_honest_abstention_not_a_confident_sentence(champion, tmp_path):
    """Blank, a solid colour, a tiny icon and noise abstain, saying why; a real photo turned on its
    side or mirrored is still a photo: it is captioned with a confidence like any other."""
    import numpy as np
    from PIL import Image, ImageDraw

    project, _, _ = champion
    rng = np.random.default_rng(0)
    photo = Image.open(sorted((REAL / "dev_photos").iterdir())[0]).convert("RGB")
    icon = Image.new("RGB", (16, 16), "white")
    ImageDraw.Draw(icon).ellipse((3, 3, 12, 12), fill=(30, 90, 200))
    pictures = {"blank.png": Image.new("RGB", (224, 224), "white"),
                "solid.png": Image.new("RGB", (300, 200), (200, 30, 30)),
                "icon.png": icon,
                "noise.png": Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)),
                "rotated.jpg": photo.rotate(90, expand=True), "mirrored.jpg": photo.transpose(Image.FLIP_LEFT_RIGHT)}
    for name, picture in pictures.items():
        picture.save(tmp_path / name)
    result = captioner(project, "caption", "--json", *(str(tmp_path / n) for n in pictures))
    assert result.returncode == 0, result.stderr[-2000:]
    said = {Path(r["file"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    for name in ("blank.png", "solid.png", "icon.png", "noise.png"):
        row = said[name]
        assert row["abstained"] and "unlike the photos it learnt from" in row["reason"], row
        assert row["confidence_words"] == "not sure what this shows" and row["spoken"].startswith("Not sure"), row
    for name in ("rotated.jpg", "mirrored.jpg"):
        assert said[name]["confidence"] is not None, said[name]
    print({n: (r["caption"], r["confidence"], r["abstained"]) for n, r in said.items()})


def test_where_it_looked_for_each_word_is_drawn_for_each_photo(champion, tmp_path):
    """``caption --attention DIR``: one strip per photo (the photo, the caption as a reader should
    take it, a heat map per word), and none for a picture the model abstains on."""
    from PIL import Image

    project, data, _ = champion
    photos = sorted((data / "dev_photos").iterdir())[:3]
    Image.new("RGB", (224, 224), "white").save(tmp_path / "blank.png")
    strips = tmp_path / "strips"
    result = captioner(project, "caption", "--json", "--attention", str(strips), *map(str, photos),
                       str(tmp_path / "blank.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    said = {Path(r["file"]).name: r for r in map(json.loads, result.stdout.splitlines())}
    assert said["blank.png"]["abstained"] and said["blank.png"]["attention_png"] is None
    assert sorted(p.name for p in strips.iterdir()) == sorted(f"{p.stem}.png" for p in photos)
    for photo in photos:
        row = said[photo.name]
        assert row["attention_png"] == str(strips / f"{photo.stem}.png")
        with Image.open(row["attention_png"]) as strip:
            words = len(row["caption"].split())
            assert strip.format == "PNG" and strip.width >= 300 and strip.height >= 160 + 100 * (words > 6)
    # two photos of one name from two folders: both drawn, neither over the other
    (tmp_path / "again").mkdir()
    shutil.copy(photos[1], tmp_path / "again" / photos[0].name)
    result = captioner(project, "caption", "--attention", str(tmp_path / "two"), str(photos[0]),
                       str(tmp_path / "again" / photos[0].name))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{photos[0].stem}-2.png", f"{photos[0].stem}.png"]
    assert f"where it looked: {tmp_path / 'two' / photos[0].stem}-2.png" in result.stderr
    # a DIR that is a file: refused before anything is captioned, the file left as it was
    before = photos[2].read_bytes()
    result = captioner(project, "caption", "--attention", str(tmp_path / "blank.png"), str(photos[2]))
    assert result.returncode == 2 and "cannot make that folder" in result.stderr and result.stdout == ""
    assert photos[2].read_bytes() == before


def test_the_page_shows_where_it_looked_when_a_word_is_hovered_or_focused(champion):
    """The app's page over the attention champion: each word of a photo's caption is a button;
    hovering it, or reaching it with Tab, lays that word's map over the photo, and its label says
    in words where the model looked (for a reader who cannot see the overlay)."""
    import contextlib
    import signal
    import urllib.request

    from playwright.sync_api import expect, sync_playwright

    from tests.helpers import free_port, wait_for_http

    project, data, _ = champion
    photo = sorted((data / "dev_photos").iterdir())[0]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    app = subprocess.Popen([CAPTIONER, "app", "--port", str(port), "--no-feedback"], cwd=project, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/healthz", app, 480, "captioner app")
        # the JSON API, asked: one map of 7x7 per word
        boundary = "captioner-test"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{photo.name}\"\r\n"
                "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(f"{url}/api/caption?attention=1", data=body, method="POST", headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            (result,) = json.loads(answer.read())["results"]
        looked = result["attention"]
        assert looked["grid"] == [7, 7] and looked["words"] == result["caption"].split()
        assert [len(m) for m in looked["maps"]] == [49] * len(looked["words"])
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            page.goto(url)
            drop_files(page, {photo.name: (photo.read_bytes(), "image/jpeg")})
            words = page.locator(".card .looked button.word")
            expect(words.first).to_be_visible(timeout=120_000)
            assert words.all_inner_texts() == looked["words"]
            overlay = page.locator(".card canvas.attention")
            expect(overlay).to_be_hidden()
            painted = "() => { const c = document.querySelector('.card canvas.attention'); const d = " \
                      "c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; " \
                      "for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n / (d.length / 4); }"
            words.nth(1).hover()
            expect(overlay).to_be_visible()
            assert 0 < page.evaluate(painted) <= 1
            page.mouse.move(0, 0)
            expect(overlay).to_be_hidden()
            words.first.focus()  # the keyboard reaches it as the mouse does
            expect(overlay).to_be_visible()
            page.keyboard.press("Tab")
            expect(words.nth(1)).to_be_focused()
            expect(overlay).to_be_visible()
            label = words.first.get_attribute("aria-label")
            assert re.fullmatch(rf"{re.escape(looked['words'][0])}: the model looked most at the "
                                r"(top|middle|bottom) (left|centre|right) of the photo", label), label
            browser.close()
    finally:
        os.killpg(app.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            app.wait(timeout=60)


def test_search_finds_real_photos_by_what_is_in_them(champion, references, tmp_path, monkeypatch, capsys):
    """The top 5 photos for a few things people name (precision: the share of hits whose people's
    captions use the word) beat the share of such photos among all, by far. The searches run in
    this process (the CLI's own main), the index as a user runs it."""
    from pipeline.cli import main

    project, data, _ = champion
    db = tmp_path / "photos.db"
    indexed = captioner(project, "index", str(data / "dev_photos"), "--db", str(db), "-q")
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    photos = sorted(p.name for p in (data / "dev_photos").iterdir())
    precision, base = {}, {}
    for word in ("dog", "water", "snow", "ball", "child"):
        monkeypatch.chdir(project)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["search", f"a {word}", "--db", str(db), "--limit", "5"])
        out = capsys.readouterr().out
        assert done.value.code == 0, out
        hits = [Path(line.split("\t")[1]).name for line in out.splitlines()]
        assert len(hits) == 5, out
        said = {p for p in photos if any(word in c.split() for c in references[p])}
        precision[word], base[word] = len(said & set(hits)) / 5, len(said) / len(photos)
    mean, chance = sum(precision.values()) / 5, sum(base.values()) / 5
    assert mean >= 0.5 and mean >= 3 * chance, (precision, base)


def test_alt_text_says_what_people_see(champion, references, tmp_path):
    """Photos every person described as showing a dog get alt text that says so."""
    project, data, _ = champion
    dogs = [n for n in sorted(references) if (data / "dev_photos" / n).is_file()
            and all("dog" in c.split() for c in references[n])][:4]
    assert len(dogs) == 4
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    for name in dogs:
        shutil.copy(data / "dev_photos" / name, site / "img" / name)
    (site / "index.html").write_text("<html><body>" + "".join(f'<img src="img/{n}">' for n in dogs) + "</body></html>")
    result = captioner(project, "alt-text", str(site))
    assert result.returncode == 0, result.stderr[-2000:]
    proposals = json.loads((site / ".captioner-alt-text.json").read_text())
    assert len(proposals) == 4 and sum("dog" in p["alt"].lower() for p in proposals) >= 3, proposals
    # --yes applies only what the model is sure enough of; the rest wait for a person, marked
    result = captioner(project, "alt-text", str(site), "--apply", "--yes")
    assert result.returncode == 0, result.stderr[-2000:]
    sure = {p["src"] for p in proposals if p["confidence"] is not None and p["confidence"] >= 0.8 and not p["abstained"]}
    tags = re.findall(r"<img[^>]*>", (site / "index.html").read_text())
    applied = {re.search(r'src="([^"]*)"', t).group(1) for t in tags if 'alt="' in t}
    assert len(tags) == 4 and applied == sure, (tags, proposals)
    assert result.stderr.count("WAITS FOR A PERSON") == 4 - len(sure)


def test_a_second_model_is_judged_against_the_champion_on_the_same_photos(champion, tmp_path):
    """A model trained on 300 train images for one epoch is worse, on the paired comparison over
    the 113 photos; ``--promote`` is the operator's override, and the report keeps the judgement."""
    project, _, _ = champion
    write_params(project, **{**PARAMS, "train.epochs": 1, "train.decoder": "lstm"})
    weak = cut(tmp_path / "weak", 300, 120)  # no grids: the pooled decoder needs none
    result = captioner(project, "real-model", "--data", str(weak), "--work", str(tmp_path / "work"), "--promote")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "work" / "reports" / "registry.json").read_text())
    assert report["old_champion"]["status"] == "scored" and report["comparison"]["images"] == 113, report
    assert report["comparison"]["difference"] < 0, report
    assert report["decision"] == "promoted" and report["champion"] == "2"
    assert report["reason"].startswith("promoted by the operator (--promote); the judgement was: beam_bleu4 -")
    assert "does not clear" in report["reason"]
    # the pooled champion has no attention to draw, and says so rather than drawing something
    photo = sorted((REAL / "dev_photos").iterdir())[0]
    result = captioner(project, "caption", "--attention", str(tmp_path / "strips"), str(photo))
    assert result.returncode == 2 and "has no attention to draw" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "strips").exists()
