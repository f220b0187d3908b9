"""Reading a folder of real captions and features computed elsewhere: what it keeps, and what it
refuses with the reason (a missing file, embeddings of another CNN, photos outside the folder)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.features_file import embedding_table
from pipeline.data.real_folder import (
    EMBEDDINGS,
    RealFolderError,
    dev_photos,
    grid_file,
    read_captions,
    read_embeddings,
)
from tests.helpers import jpeg_bytes


def write_folder(root, dim=1280, backbone="mobilenet_v2_1.0_224_quant (tflite, imagenet)"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "Flickr8k.token.trainval.txt").write_text(
        "a.jpg#0\tA dog runs .\na.jpg#1\tA brown dog runs on grass\nb.jpg#0\tTwo children play\n"
        "c.jpg#0\tA man rides a bike\nz.jpg#0\tAn image in no split\n")
    (root / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    (root / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    table = embedding_table(["a.jpg", "b.jpg", "c.jpg"], np.ones((3, dim), np.float32))
    pq.write_table(table.replace_schema_metadata({"backbone": backbone}), root / EMBEDDINGS)
    return root


def test_captions_are_cleaned_and_split_as_validate_does(tmp_path):
    captions, dropped = read_captions(write_folder(tmp_path / "real"), 1, 40)
    assert list(captions.columns) == ["image", "split", "caption_idx", "caption_raw", "caption"]
    assert captions.loc[captions["image"] == "a.jpg", "caption"].tolist() == ["a dog runs", "a brown dog runs on grass"]
    assert dict(captions.groupby("split").size()) == {"dev": 1, "train": 3}
    assert dropped["not in train/dev"] == 1


def test_a_missing_split_list_is_named(tmp_path):
    root = write_folder(tmp_path / "real")
    (root / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(RealFolderError, match=r"no dev split list \(Flickr_8k\.devImages\.txt\)"):
        read_captions(root, 1, 40)


def test_embeddings_of_another_cnn_are_refused(tmp_path):
    xception = write_folder(tmp_path / "x", dim=2048, backbone="xception")
    with pytest.raises(RealFolderError, match=r"holds 2048-d embeddings made by xception; this backbone makes 1280-d"):
        read_embeddings(xception, 1280)
    same_width = write_folder(tmp_path / "y", backbone="efficientnet_lite0")
    with pytest.raises(RealFolderError, match="made by efficientnet_lite0"):
        read_embeddings(same_width, 1280)
    images, features, meta = read_embeddings(write_folder(tmp_path / "z"), 1280)
    assert images == ["a.jpg", "b.jpg", "c.jpg"] and features.shape == (3, 1280)


def test_a_parquet_that_is_not_embeddings_is_refused(tmp_path):
    root = write_folder(tmp_path / "real")
    pq.write_table(pa.table({"image": ["a.jpg"], "vector": [1.0]}), root / EMBEDDINGS)
    with pytest.raises(RealFolderError, match="is not an embeddings Parquet"):
        read_embeddings(root, 1280)
    (root / EMBEDDINGS).unlink()
    with pytest.raises(RealFolderError, match="holds no embeddings Parquet file"):
        read_embeddings(root, 1280)


def test_dev_photos_are_only_dev_images_inside_the_folder(tmp_path):
    root = write_folder(tmp_path / "real")
    (root / "dev_photos").mkdir()
    (root / "dev_photos" / "c.jpg").write_bytes(jpeg_bytes())
    (root / "dev_photos" / "a.jpg").write_bytes(jpeg_bytes())  # a train image
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(jpeg_bytes())
    (root / "dev_photos" / "d.jpg").symlink_to(outside)
    assert dev_photos(root, {"c.jpg", "d.jpg"}) == {"c.jpg": root / "dev_photos" / "c.jpg"}
    assert dev_photos(tmp_path / "nowhere", {"c.jpg"}) == {}


def test_the_grid_beside_the_embeddings_is_found_by_its_name(tmp_path):
    root = write_folder(tmp_path / "real")
    assert grid_file(root) is None
    (root / "mobilenet_v2_224_grid.trainval.parquet").write_bytes(b"")
    assert grid_file(root) == root / "mobilenet_v2_224_grid.trainval.parquet"


def write_grid_file(root, images=("a.jpg", "b.jpg", "c.jpg"), shape=(7, 7, 320), scale="0.11694499105215073",
                    zero_point="130", dtype=np.uint8):
    values = np.arange(len(images) * int(np.prod(shape))).reshape(len(images), -1).astype(dtype)
    table = pa.table({"image": pa.array(list(images)),
                      "grid": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])})
    meta = {"shape": f"[{shape[0]}, {shape[1]}, {shape[2]}]", "scale": scale, "zero_point": zero_point}
    pq.write_table(table.replace_schema_metadata(meta), root / "mobilenet_v2_224_grid.trainval.parquet")
    return values


SERVING = {"shape": "[7, 7, 320] (rows, columns, channels; row-major)", "scale": "0.11694499105215073",
           "zero_point": "130"}


def test_the_stored_grid_is_taken_as_it_is_in_the_order_asked(tmp_path):
    from pipeline.data.real_folder import stored_grid

    root = write_folder(tmp_path / "real")
    values = write_grid_file(root)
    found = stored_grid(root, ["c.jpg", "a.jpg"], SERVING)
    assert found.dtype == np.uint8 and found.shape == (2, 7, 7, 320)
    assert np.array_equal(found.reshape(2, -1), values[[2, 0]])


@pytest.mark.parametrize("grid, match", [
    (None, "holds no grid of regions"),
    ({"shape": (10, 10, 32)}, r"holds grids of \[10, 10, 32\]"),
    ({"scale": "0.5"}, "scale 0.5"),
    ({"zero_point": "128"}, "zero point 128"),
    ({"images": ("a.jpg", "b.jpg")}, r"no grid for 1 of the 2 images, e.g. \['c.jpg'\]"),
])
def test_a_grid_the_serving_cnn_would_not_make_is_refused_naming_the_file(tmp_path, grid, match):
    """Trained on one grid and served another, the decoder would caption noise: refused first."""
    from pipeline.data.real_folder import stored_grid

    root = write_folder(tmp_path / "real")
    if grid is not None:
        write_grid_file(root, **grid)
    with pytest.raises(RealFolderError, match=match):
        stored_grid(root, ["a.jpg", "c.jpg"], SERVING)
