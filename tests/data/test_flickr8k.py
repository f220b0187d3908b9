import codecs

import pandas as pd
import pytest

from pipeline.data.flickr8k import (
    BAD_NAME,
    NUL_BYTE,
    CaptionFileError,
    count_caption_lines,
    image_file,
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


def test_kaggle_stray_quote_rejects_that_line_and_reads_every_other(tmp_path):
    """One unbalanced quote used to swallow every following line into a single field."""
    path = tmp_path / "captions.txt"
    good = [f"{i}_x.jpg,A dog runs number {i} ." for i in range(500)]
    path.write_text("image,caption\n" + "\n".join(good[:100] + ['100_x.jpg,"A dog runs'] + good[101:]) + "\n")
    rows = parse_kaggle_captions(path)
    assert len(rows) == 500 == count_caption_lines(path)
    bad = rows[rows["error"].notna()]
    assert bad["line"].tolist() == [102]  # header is line 1
    assert "quote" in bad["error"].item() and bad["image"].item() == "100_x.jpg"
    assert rows["image"].nunique() == 500
    assert rows.loc[rows["line"] == 103, "caption_raw"].item() == "A dog runs number 101 ."


def test_kaggle_stray_quote_with_a_later_quote_never_merges_lines(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text('image,caption\r\n'
                    'a.jpg,"A dog runs\r\n'
                    'b.jpg,A cat sits .\r\n'
                    'c.jpg,A bird " flies .\r\n'
                    'd.jpg,"A man , in a ""red"" hat ."\r\n')
    rows = parse_kaggle_captions(path)
    assert rows["image"].tolist() == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert rows["error"].notna().tolist() == [True, False, False, False]
    assert rows["caption_raw"].tolist()[1:] == ["A cat sits .", 'A bird " flies .', 'A man , in a "red" hat .']
    assert not rows["caption_raw"].str.contains("jpg").iloc[1:].any()


def test_names_that_are_paths_are_malformed_rows_in_both_layouts(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("ok.jpg#0\tA red circle .\n/srv/private/secret.jpg#0\tA red circle .\n"
                     "../x.jpg#0\tA dog .\nImages/y.jpg#0\tA dog .\n..\\z.jpg#0\tA dog .\n")
    kaggle = tmp_path / "captions.txt"
    kaggle.write_text("image,caption\nok.jpg,A red circle .\n/srv/private/secret.jpg,A red circle .\n"
                      "../x.jpg,A dog .\n")
    for rows, bad_lines in ((parse_token_file(token), [2, 3, 4, 5]), (parse_kaggle_captions(kaggle), [3, 4])):
        bad = rows[rows["error"].notna()]
        assert bad["line"].tolist() == bad_lines
        assert set(bad["error"]) == {BAD_NAME}
        assert rows["error"].iloc[0] is None or pd.isna(rows["error"].iloc[0])


def test_a_nul_byte_makes_the_line_malformed_not_a_word_break(tmp_path):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(b"a.jpg#0\tA red cir\x00cle .\nb\x00.jpg#0\tA dog .\nc.jpg#0\tA cat .\n")
    rows = parse_token_file(token)
    assert rows["error"].tolist()[:2] == [NUL_BYTE, NUL_BYTE] and pd.isna(rows["error"].iloc[2])
    kaggle = tmp_path / "captions.txt"
    kaggle.write_bytes(b"image,caption\na.jpg,A red cir\x00cle .\nb\x00.jpg,A dog .\nc.jpg,A cat .\n")
    rows = parse_kaggle_captions(kaggle)
    assert rows["error"].tolist()[:2] == [NUL_BYTE, NUL_BYTE] and pd.isna(rows["error"].iloc[2])


@pytest.mark.parametrize(("encoding", "label"), [("utf-16", "UTF-16 LE"), ("utf-16-be", None),
                                                 ("utf-32", "UTF-32 LE"), ("utf-16-le", None)])
def test_a_utf16_or_utf32_file_is_refused_naming_the_encoding(tmp_path, encoding, label):
    text = "image,caption\n" + "".join(f"{i}.jpg,A dog runs .\n" for i in range(20))
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data, label = codecs.BOM_UTF16_BE + data, "UTF-16 BE"
    path = tmp_path / "captions.txt"
    path.write_bytes(data)
    expected = label or "UTF-16 without a byte-order mark"
    for parse in (parse_kaggle_captions, parse_token_file):
        with pytest.raises(CaptionFileError, match=expected) as err:
            parse(path, "data.local_path /x: captions.txt")
        assert "iconv" in str(err.value) and str(err.value).startswith("data.local_path /x: captions.txt")
        assert "\x00" not in str(err.value)


def test_split_lists_and_folder_joins_refuse_paths(tmp_path):
    split = tmp_path / "Flickr_8k.trainImages.txt"
    split.write_text("a.jpg\n\n/etc/passwd\n")
    with pytest.raises(CaptionFileError, match=r"line 3: '/etc/passwd' is not an image file name"):
        read_split_list(split)
    assert image_file(tmp_path, "a.jpg") == tmp_path / "a.jpg"
    for bad in ("/etc/passwd", "../a.jpg", "sub/a.jpg", "..", "", "a\x00.jpg"):
        with pytest.raises(ValueError, match="refusing image name"):
            image_file(tmp_path, bad)
    write_split_lists(tmp_path, ["a.jpg", "/srv/secret.jpg", "../b.jpg"], {"train": 1.0, "dev": 0.0, "test": 0.0})
    assert read_split_list(split) == ["a.jpg"]
