import pandas as pd

from pipeline.flickr8k import (
    normalise_image_name,
    parse_kaggle_captions,
    parse_token_file,
    read_split_list,
    stable_split,
    write_split_lists,
)


def test_token_file_rows_and_numbered_jpg_quirk(tmp_path):
    path = tmp_path / "Flickr8k.token.txt"
    path.write_bytes(
        b"\xef\xbb\xbf1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\r\n"
        b"2258277193_586949ec62.jpg.1#3\tA man walks .\n"
        b"\n"
        b"1001773457_577c3a7d70.jpg#1 no tab here\n"
        b"1002674143_1b742ab4b8.jpg#x\tbad index\n"
        b"1003163366_44323f5815.jpg#2\tcaf\xe9 latte\n")
    rows = parse_token_file(path)
    assert rows["image"].tolist()[:2] == ["1000268201_693b08cb0e.jpg", "2258277193_586949ec62.jpg"]
    assert rows["caption_idx"].tolist()[:2] == [0, 3]
    assert rows["line"].tolist() == [1, 2, 4, 5, 6]  # blank line skipped, numbering kept
    errors = rows["error"].tolist()
    assert pd.isna(errors[0]) and pd.isna(errors[1])
    assert "no tab" in errors[2]
    assert "malformed key" in errors[3]
    assert errors[4] == "invalid UTF-8"
    assert "\ufffd" in rows["caption_raw"].iloc[4]  # storable text, bad byte visible


def test_kaggle_csv_with_quoted_commas_and_quotes(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        'image,caption\n'
        '1000268201_693b08cb0e.jpg,A child in a pink dress .\n'
        '1000268201_693b08cb0e.jpg,"A girl , in pink , climbs ."\n'
        '1001773457_577c3a7d70.jpg,"A dog with a ""ball"" ."\n'
        '1001773457_577c3a7d70.jpg,too,many,fields\n')
    rows = parse_kaggle_captions(path)
    assert rows["caption_raw"].tolist()[1] == "A girl , in pink , climbs ."
    assert rows["caption_raw"].tolist()[2] == 'A dog with a "ball" .'
    assert rows["caption_idx"].tolist() == [0, 1, 0, 1]
    assert rows["error"].iloc[3].startswith("malformed CSV row")
    assert rows["error"].iloc[:3].isna().all()


def test_split_helpers(tmp_path):
    assert normalise_image_name(" x.jpg.1 ") == "x.jpg"
    names = [f"img{i}.jpg" for i in range(300)]
    ratios = {"train": 0.6, "dev": 0.2, "test": 0.2}
    assert stable_split("img7.jpg", ratios) == stable_split("img7.jpg", ratios)
    write_split_lists(tmp_path, names, ratios)
    lists = {s: read_split_list(tmp_path / f"Flickr_8k.{s}Images.txt") for s in ("train", "dev", "test")}
    assert sorted(sum(lists.values(), [])) == sorted(names)
    assert 140 < len(lists["train"]) < 220
    assert pd.Series(sum(lists.values(), [])).is_unique
