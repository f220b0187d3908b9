import io
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
    with pytest.raises(StageError, match=r"has_captions.*1 unexpected.*False") as err:
        validate.run(tiny_settings())
    assert GOOD[0] in str(err.value)  # the message names the image


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


def test_reject_reasons_are_a_fixed_set_with_details_apart(workdir):
    """Reasons used to embed the decoder message with the file path: one key per image."""
    images = {n: jpeg_bytes() for n in GOOD}
    broken = [f"broken{i}.jpg" for i in range(3)]
    images.update({n: jpeg_bytes()[:150] for n in broken})
    lines = good_lines(GOOD) + [f"{n}#{k}\tA dog ." for n in broken for k in range(5)]
    write_flickr_dataset(paths.dataset_dir("synthetic"), images, lines,
                         {"train": GOOD[:30] + broken, "dev": GOOD[30:35], "test": GOOD[35:]})
    report = validate.run(tiny_settings(**{"validate.max_reject_fraction": 0.5}))
    assert report["reject_reasons"] == {"corrupt image": 15}
    rejects = pd.read_parquet(paths.REJECTS)
    assert set(rejects["reason"]) == {"corrupt image"}
    assert rejects["detail"].str.len().min() > 0  # the decoder's words are kept, apart


def test_images_above_the_pixel_limit_are_rejected_below_it_decoded_silently(workdir, recwarn):
    from PIL import Image

    big = io.BytesIO()
    Image.new("L", (10_000, 9_000)).save(big, format="PNG")  # 90 Mpx: above PIL's bomb warning
    images = {n: jpeg_bytes() for n in GOOD}
    images[GOOD[0]] = big.getvalue()
    write_flickr_dataset(paths.dataset_dir("synthetic"), images, good_lines(GOOD),
                         {"train": GOOD[:30], "dev": GOOD[30:35], "test": GOOD[35:]})
    report = validate.run(tiny_settings(**{"validate.max_image_pixels": 100_000_000}))
    assert report["rejected"] == 0
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    report = validate.run(tiny_settings(**{"validate.max_image_pixels": 50_000_000,
                                            "validate.max_reject_fraction": 0.5}))
    assert report["reject_reasons"] == {"image too large": 5}
    detail = pd.read_parquet(paths.REJECTS)["detail"].iloc[0]
    assert "10000x9000 = 90,000,000 pixels" in detail


def test_kaggle_stray_quote_is_quarantined_and_nothing_else_is_lost(workdir):
    root = paths.dataset_dir("synthetic")
    write_flickr_dataset(root, {n: jpeg_bytes() for n in GOOD}, [],
                         {"train": GOOD[:30], "dev": GOOD[30:35], "test": GOOD[35:]})
    (root / paths.TOKEN_FILE).unlink()
    lines = [f"{n},A dog runs {k} ." for n in GOOD for k in range(5)]
    lines[7] = f'{GOOD[1]},"A dog runs'
    (root / "captions.txt").write_text("image,caption\n" + "\n".join(lines) + "\n")
    report = validate.run(tiny_settings())
    kept, rejects = pd.read_parquet(paths.CAPTIONS), pd.read_parquet(paths.REJECTS)
    assert report["lines_read"] == report["rows_read"] == 200
    assert len(kept) == 199 and kept["image"].nunique() == 40
    assert rejects["line"].tolist() == [9] and rejects["reason"].item().startswith("malformed CSV row")


def test_caption_lines_naming_files_outside_the_dataset_are_quarantined_unread(workdir, tmp_path):
    """A Kaggle captions.txt naming /abs/path.jpg or ../x.jpg: malformed rows with their line
    numbers, in no split list, and the files they name are never opened."""
    import sys

    from pipeline.stages import download

    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg_bytes())
    folder = tmp_path / "kaggle"
    (folder / "Images").mkdir(parents=True)
    for name in GOOD:
        (folder / "Images" / name).write_bytes(jpeg_bytes())
    lines = [f"{n},A red ball {k} ." for n in GOOD for k in range(5)]
    lines.insert(3, f"{secret},A red circle .")  # line 5 of the file (header is line 1)
    lines.insert(10, "../kaggle/Images/1000_aa.jpg,A red circle .")  # line 12
    (folder / "captions.txt").write_text("image,caption\n" + "\n".join(lines) + "\n")
    opened = []
    sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" and args and
                     ("secret.jpg" in str(args[0]) or "../" in str(args[0])) else None)
    settings = tiny_settings(**{"data.source": "local", "data.local_path": str(folder)})
    download.run(settings)
    report = validate.run(settings)
    rejects = pd.read_parquet(paths.REJECTS)
    bad = rejects[rejects["reason"].str.startswith("malformed image name")]
    assert bad["line"].tolist() == [5, 12] and report["kept"] == 200
    splits = "".join((paths.dataset_dir("local") / f).read_text() for f in paths.SPLIT_FILES.values())
    assert "secret" not in splits and "../" not in splits
    assert opened == []
