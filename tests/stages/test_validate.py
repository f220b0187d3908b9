import json

import pandas as pd
import pytest

from pipeline import paths
from pipeline.stages import validate
from pipeline.stages._cli import StageError
from tests.helpers import jpeg_bytes, tiny_settings, write_flickr_dataset

GOOD = [f"{1000 + i}_aa.jpg" for i in range(40)]


def good_lines(names):
    return [f"{n}#{k}\tA red ball number {k} on the grass ." for n in names for k in range(5)]


def messy_dataset(root):
    """Forty good images plus one of each problem the real world sends."""
    images = {n: jpeg_bytes() for n in GOOD}
    images["corrupt.jpg"] = jpeg_bytes()[:200]
    images["empty.jpg"] = b""
    images["unsplit.jpg"] = jpeg_bytes()
    images["missing.jpg"] = None
    lines = good_lines(GOOD) + [
        *(f"corrupt.jpg#{k}\tA dog ." for k in range(5)),
        *(f"empty.jpg#{k}\tA dog ." for k in range(5)),
        *(f"missing.jpg#{k}\tA dog ." for k in range(5)),
        *(f"unsplit.jpg#{k}\tA cat ." for k in range(5)),
        *(f"2258277193_586949ec62.jpg.1#{k}\tA man ." for k in range(5)),
        f"{GOOD[0]}#0\tA duplicate key caption .",
        "no_tab_line.jpg#0 A caption without a tab",
    ]
    body = "".join(f"{line}\n" for line in lines).encode()
    body += f"{GOOD[1]}#5\t".encode() + b"caf\xe9 au lait\n"
    body += f"{GOOD[2]}#6\t\n".encode()          # empty caption
    body += f"{GOOD[3]}#7\t. , !\n".encode()     # punctuation only
    splits = {"train": GOOD[:30] + ["corrupt.jpg", "empty.jpg", "missing.jpg"],
              "dev": GOOD[30:35], "test": GOOD[35:]}
    return write_flickr_dataset(root, images, body, splits)


def test_messy_dataset_quarantines_every_bad_row(workdir):
    messy_dataset(paths.dataset_dir("synthetic"))
    report = validate.run(tiny_settings(**{"validate.max_reject_fraction": 0.5}))
    kept = pd.read_parquet(paths.CAPTIONS)
    rejects = pd.read_parquet(paths.REJECTS)
    assert len(kept) + len(rejects) == report["rows_read"] == 200 + 25 + 2 + 3
    assert len(kept) == 200 and set(kept["image"]) == set(GOOD)
    assert list(kept.columns) == ["image", "split", "caption_idx", "caption_raw", "caption"]
    assert kept["caption"].iloc[0] == "a red ball number on the grass"
    reason = {(r.image, r.caption_idx): r.reason for r in rejects.itertuples()}
    assert reason[("corrupt.jpg", 0)].startswith("corrupt image")
    assert reason[("empty.jpg", 0)] == "empty image file"
    assert reason[("missing.jpg", 0)] == "missing image file"
    assert "missing image file" in reason[("2258277193_586949ec62.jpg", 0)]  # the .jpg.1 quirk
    assert "no split" in reason[("unsplit.jpg", 0)]
    assert "duplicate" in reason[(GOOD[0], 0)]
    assert "no tab" in rejects.loc[rejects["line"] == 227, "reason"].item()
    assert reason[(GOOD[1], 5)].startswith("invalid UTF-8")
    assert "fewer than 1" in reason[(GOOD[2], 6)]
    assert "fewer than 1" in reason[(GOOD[3], 7)]
    on_disk = json.loads(paths.VALIDATION_REPORT.read_text())
    assert on_disk["unsplit_images"]["examples"] == ["2258277193_586949ec62.jpg", "unsplit.jpg"]
    assert on_disk["success"] and {e["expectation"] for e in on_disk["expectations"]} >= {
        "expect_column_values_to_be_in_set", "expect_compound_columns_to_be_unique"}


def test_too_many_rejects_fails_and_keeps_earlier_outputs(workdir):
    messy_dataset(paths.dataset_dir("synthetic"))
    validate.run(tiny_settings(**{"validate.max_reject_fraction": 0.5}))
    before = paths.CAPTIONS.read_bytes()
    with pytest.raises(StageError) as err:
        validate.run(tiny_settings(**{"validate.max_reject_fraction": 0.01}))
    message = str(err.value)
    assert "above validate.max_reject_fraction" in message and "corrupt image" in message
    assert paths.CAPTIONS.read_bytes() == before
    assert len(pd.read_parquet(paths.FAILED_REJECTS)) == 30
    assert json.loads(paths.VALIDATION_REPORT.read_text())["success"] is False


def test_split_image_without_captions_is_structural(workdir):
    images = {n: jpeg_bytes() for n in GOOD}
    write_flickr_dataset(paths.dataset_dir("synthetic"), images, good_lines(GOOD[1:]),
                         {"train": GOOD[:30], "dev": GOOD[30:35], "test": GOOD[35:]})
    with pytest.raises(StageError, match=r"has_captions.*1 unexpected.*False"):
        validate.run(tiny_settings())


def test_overlapping_split_lists_are_structural(workdir):
    images = {n: jpeg_bytes() for n in GOOD}
    write_flickr_dataset(paths.dataset_dir("synthetic"), images, good_lines(GOOD),
                         {"train": GOOD[:31], "dev": GOOD[30:35], "test": GOOD[35:]})
    with pytest.raises(StageError, match=rf"expect_column_values_to_be_unique.*{GOOD[30]}"):
        validate.run(tiny_settings())


def test_kaggle_captions_with_quoted_fields(workdir):
    root = paths.dataset_dir("synthetic")
    write_flickr_dataset(root, {n: jpeg_bytes() for n in GOOD}, [],
                         {"train": GOOD[:30], "dev": GOOD[30:35], "test": GOOD[35:]})
    (root / paths.TOKEN_FILE).unlink()
    (root / "captions.txt").write_text("image,caption\n" + "".join(
        f'{n},"A man , in a ""red"" hat , waves {k} ."\n' for n in GOOD for k in range(5)))
    report = validate.run(tiny_settings())
    kept = pd.read_parquet(paths.CAPTIONS)
    assert report["caption_file"] == "captions.txt" and len(kept) == 200
    assert kept["caption_raw"].iloc[0] == 'A man , in a "red" hat , waves 0 .'
    assert kept["caption"].iloc[0] == "a man in a red hat waves"
