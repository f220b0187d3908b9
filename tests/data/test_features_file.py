"""The grid file format: what an attention decoder reads beside the pooled vectors."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.features_file import GridFileError, read_grid, with_grid


def write_grid(path, values, meta, images=("b.jpg", "a.jpg")):
    flat = pa.array(values.reshape(-1))
    table = pa.table({"image": pa.array(list(images)),
                      "grid": pa.FixedSizeListArray.from_arrays(flat, values.shape[1])})
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


def test_a_quantised_grid_is_dequantised_and_laid_out_row_major(tmp_path):
    q = np.arange(2 * 12, dtype=np.uint8).reshape(2, 12)
    path = write_grid(tmp_path / "g.parquet", q, {"shape": "[2, 2, 3] row-major (row, column, channel)",
                                                  "scale": "0.5", "zero_point": "4"})
    images, grid, shape = read_grid(path)
    assert images == ["b.jpg", "a.jpg"] and shape == (2, 2, 3)
    np.testing.assert_allclose(grid, (q.astype(np.float32) - 4) * 0.5)
    # each image's row: pooled vector first, then its grid, matched by name
    rows = with_grid(["a.jpg", "b.jpg"], np.array([[1.0], [2.0]], np.float32), images, grid, path)
    np.testing.assert_allclose(rows[0], [1.0, *grid[1]])
    np.testing.assert_allclose(rows[1], [2.0, *grid[0]])


def test_a_float16_grid_reads_as_float32(tmp_path):
    values = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float16)
    _, grid, shape = read_grid(write_grid(tmp_path / "g.parquet", values, {"shape": "[2, 2, 2]"}))
    assert grid.dtype == np.float32 and shape == (2, 2, 2)
    np.testing.assert_array_equal(grid, values.astype(np.float32))


@pytest.mark.parametrize("meta, match", [
    ({}, "no 'shape'"),
    ({"shape": "[7, 7, 320]"}, r"shape \[7, 7, 320\] does not hold the 12 values"),
    ({"shape": "[2, 2, 3]"}, "needs 'scale' and 'zero_point'"),
])
def test_a_grid_file_that_cannot_be_laid_out_is_refused_naming_it(tmp_path, meta, match):
    path = write_grid(tmp_path / "bad.parquet", np.zeros((2, 12), np.uint8), meta)
    with pytest.raises(GridFileError, match=match) as err:
        read_grid(path)
    assert "bad.parquet" in str(err.value)


def test_a_pooled_features_file_is_not_taken_for_a_grid(tmp_path):
    path = tmp_path / "xception.parquet"
    pq.write_table(pa.table({"image": ["a.jpg"], "embedding": [[1.0, 2.0]]}), path)
    with pytest.raises(GridFileError, match="no 'grid' column beside 'image'.*not a grid file"):
        read_grid(path)


def test_a_grid_missing_an_image_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "g.parquet"
    with pytest.raises(GridFileError, match=r"g\.parquet: no grid for 1 of the 2 images, e\.g\. \['c\.jpg'\]"):
        with_grid(["a.jpg", "c.jpg"], np.zeros((2, 1), np.float32), ["a.jpg"], np.zeros((1, 4), np.float32), path)


def test_a_grid_with_nan_is_refused_naming_the_photo(tmp_path):
    values = np.zeros((2, 8), np.float32)
    values[1, 3] = np.nan
    with pytest.raises(GridFileError, match=r"1 rows hold NaN or infinite values, e\.g\. \['a\.jpg'\]"):
        read_grid(write_grid(tmp_path / "g.parquet", values, {"shape": "[2, 2, 2]"}))


def test_a_features_file_with_a_grid_reads_as_rows_of_pooled_then_regions(tmp_path):
    from pipeline.data.features_file import (
        embedding_table,
        grid_metadata,
        pooled_part,
        read_feature_rows,
        read_features,
        write_table,
    )

    pooled = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    q = np.arange(2 * 2 * 1 * 3, dtype=np.uint8).reshape(2, 2, 1, 3)
    path = tmp_path / "f.parquet"
    table = embedding_table(["a.jpg", "b.jpg"], pooled, q)
    write_table(table.replace_schema_metadata({"backbone": "x", **grid_metadata((2, 1, 3), (0.25, 3))}), path)
    images, rows, meta, grid = read_feature_rows(path)
    assert images == ["a.jpg", "b.jpg"] and grid == (2, 3) and meta["backbone"] == "x"
    np.testing.assert_allclose(rows, np.concatenate([pooled, (q.reshape(2, -1) - 3.0) * 0.25], axis=1))
    np.testing.assert_array_equal(pooled_part(rows, grid), pooled)
    # readers of pooled vectors see the file as before; a file without a grid reads as its vectors
    assert np.array_equal(read_features(path)[1], pooled)
    write_table(embedding_table(["a.jpg", "b.jpg"], pooled), tmp_path / "p.parquet")
    _, rows, _, grid = read_feature_rows(tmp_path / "p.parquet")
    assert grid is None and np.array_equal(rows, pooled) and pooled_part(rows, None) is rows


def test_a_grid_of_float32_or_the_wrong_count_is_not_written(tmp_path):
    from pipeline.data.features_file import embedding_table

    with pytest.raises(ValueError, match="uint8 or float16"):
        embedding_table(["a.jpg"], np.ones((1, 2), np.float32), np.ones((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="for 2 images"):
        embedding_table(["a.jpg", "b.jpg"], np.ones((2, 2), np.float32), np.ones((1, 2, 2, 3), np.uint8))
