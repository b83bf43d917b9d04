"""Tracks of a track-mode link: the table, napari Tracks data and the CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_esam import link_labels, tracks_data, tracks_table, write_tracks_csv
from tests.fakes import moving_discs, relabel_per_slice


@pytest.fixture(scope="module")
def discs() -> tuple[np.ndarray, object]:
    truth = moving_discs(frames=12, size=128, seed=2)
    return truth, link_labels(relabel_per_slice(truth, 2), mode="track")


def test_the_table_has_one_row_per_track_and_frame(discs) -> None:
    truth, result = discs
    table = tracks_table(result)
    assert list(table) == ["track_id", "t", "y", "x", "area"]
    key = np.stack([table["track_id"], table["t"]], 1)
    assert len(np.unique(key, axis=0)) == len(key)
    assert np.array_equal(key, key[np.lexsort((key[:, 1], key[:, 0]))])  # sorted by id, t
    # rows are the linked objects' centroids and areas
    out = result.labels
    for tid, t, y, x, area in list(zip(*table.values(), strict=True))[::7]:
        rows, cols = np.nonzero(out[t] == tid)
        assert len(rows) == area
        assert (y, x) == pytest.approx((rows.mean(), cols.mean()))


def test_napari_tracks_data(discs) -> None:
    _, result = discs
    data = tracks_data(result)
    table = tracks_table(result)
    assert data.shape == (len(table["t"]), 4) and data.dtype == np.float64
    np.testing.assert_array_equal(data[:, 0], table["track_id"])
    np.testing.assert_allclose(data[:, 2:], np.stack([table["y"], table["x"]], 1))


def test_csv_round_trip_and_overwrite(discs, tmp_path: Path) -> None:
    _, result = discs
    path = write_tracks_csv(tmp_path / "tracks.csv", result)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = tracks_table(result)
    assert list(rows[0]) == list(table)
    assert [int(r["track_id"]) for r in rows] == table["track_id"].tolist()
    np.testing.assert_allclose([float(r["x"]) for r in rows], table["x"], atol=5e-4)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tracks_csv(path, result)
    write_tracks_csv(path, result, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["tracks.csv"]


def test_four_d_stacks_get_a_column_per_other_axis() -> None:
    truth = moving_discs(frames=5, size=64, seed=1)
    stack = np.stack([relabel_per_slice(truth, 1)] * 2, axis=1)  # (t, z, y, x)
    table = tracks_table(link_labels(stack, mode="track", axis=0))
    assert list(table) == ["track_id", "t", "z", "y", "x", "area"]
    assert set(table["z"].tolist()) == {0, 1}


def test_three_d_links_have_no_tracks() -> None:
    stack = relabel_per_slice(moving_discs(frames=3, size=64))
    with pytest.raises(ValueError, match="mode='track'"):
        tracks_table(link_labels(stack, mode="3d"))
