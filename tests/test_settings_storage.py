import json

import pytest

from cpjump1 import storage
from cpjump1.settings import get_settings


def test_settings_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for v in ("CPJUMP1_STORAGE_ROOT", "CPJUMP1_MODE", "CPJUMP1_IMAGES_ROOT"):
        monkeypatch.delenv(v, raising=False)
    (tmp_path / ".env").write_text("CPJUMP1_STORAGE_ROOT=s3://bucket/prefix/\nCPJUMP1_MODE=kubernetes\n")
    s = get_settings()
    assert s.storage_root == "s3://bucket/prefix" and s.mode == "kubernetes"
    assert s.resolved_images_root == "s3://bucket/prefix/images"
    monkeypatch.setenv("CPJUMP1_STORAGE_ROOT", "/data/x")
    assert get_settings().storage_root == "/data/x"
    assert get_settings(storage_root="/cli").storage_root == "/cli"
    monkeypatch.setenv("CPJUMP1_S3_ANONYMOUS", "true")
    opts = get_settings().storage_options("s3://cellpainting-gallery/x")
    assert opts["anon"] is True
    assert get_settings().image("cellprofiler").endswith("cpjump1-cellprofiler:0.1.0")


def test_bad_mode_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CPJUMP1_MODE", "docker")
    with pytest.raises(Exception, match="mode"):
        get_settings()


def test_join_and_layout():
    assert storage.join("s3://b/p", "workspace", "x.csv") == "s3://b/p/workspace/x.csv"
    lay = storage.Layout("s3://b/root")
    assert lay.load_data_dir("B1", "P1") == "s3://b/root/workspace/load_data_csv/B1/P1"
    assert lay.profile_file("B1", "P1", "_normalized") == "s3://b/root/profiles/B1/P1/P1_normalized.csv.gz"
    assert lay.analysis_shard_dir("B", "P", 3).endswith("workspace/analysis/B/P/shard-0003")
    assert lay.qc_dir("load_data", "B", "P").endswith("qc/load_data/B/P")
    local = storage.Layout("/tmp/r")
    assert local.single_cell_file("B", "P") == "/tmp/r/workspace/backend/B/P/P.parquet"


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out" / "file.csv"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(str(target), mode="w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []
    with storage.atomic_write(str(target), mode="w") as fh:
        fh.write("whole")
    assert target.read_text() == "whole"
    with pytest.raises(RuntimeError):
        with storage.atomic_path(str(tmp_path / "out" / "t.parquet")) as p:
            p.write_text("x")
            raise RuntimeError("boom")
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["file.csv"]


def test_markers(tmp_path):
    folder = str(tmp_path / "shard")
    fp = storage.fingerprint({"a": 1}, "pipeline-text", "4.2.8.1")
    assert not storage.marker_matches(folder, fp)
    storage.write_marker(folder, fp, n_sites=3)
    assert storage.marker_matches(folder, fp)
    assert not storage.marker_matches(folder, storage.fingerprint({"a": 2}))
    assert json.loads((tmp_path / "shard" / storage.MARKER_NAME).read_text())["n_sites"] == 3


def test_plate_images_dir_gallery_naming(tmp_path):
    base = tmp_path / "B" / "images"
    (base / "P1__2020-11-05T10_00_00-Measurement1").mkdir(parents=True)
    assert storage.plate_images_dir(str(tmp_path), "B", "P1").endswith("P1__2020-11-05T10_00_00-Measurement1")
    (base / "P1").mkdir()
    assert storage.plate_images_dir(str(tmp_path), "B", "P1") == str(base / "P1")
    from cpjump1.errors import InputDataError

    with pytest.raises(InputDataError, match="P2"):
        storage.plate_images_dir(str(tmp_path), "B", "P2")
