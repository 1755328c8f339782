"""load_data stage: pe2loaddata layout, index and listing modes, sharding, the suite, S3 (moto
server on loopback) and the bad inputs of issue 4 (each: a clear error and no CSV left)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harmony_plates import CHANNELS, image_name, write_plate  # noqa: E402
from s3_server import free_port, make_bucket, moto_s3, upload_tree  # noqa: E402

from cpjump1 import load_data as ld  # noqa: E402
from cpjump1 import storage  # noqa: E402
from cpjump1.cli import main  # noqa: E402
from cpjump1.errors import InputDataError, StorageError, ValidationFailed  # noqa: E402
from cpjump1.settings import get_settings  # noqa: E402

BATCH, PLATE = "B1", "P1"
V1 = "external/pe2loaddata_testdata/Version1"


@pytest.fixture
def plate_settings(settings, tmp_path):
    """Settings with a separate images root; returns (settings, plate folder)."""
    s = get_settings(storage_root=settings.storage_root, images_root=str(tmp_path / "images"))
    return s, tmp_path / "images" / BATCH / "images" / PLATE


def out_files(s) -> list[str]:
    d = Path(storage.Layout(s.storage_root).load_data_dir(BATCH, PLATE))
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def read_csv(url: str) -> pd.DataFrame:
    return pd.read_csv(url, dtype=str, keep_default_na=False)


# --------------------------------------------------------------------------- pe2loaddata layout


def test_reproduces_pe2loaddata_reference_csv(shared_data):
    """The shared Index.idx.xml + config_v1.yml give pe2loaddata's load_data_version1.csv, byte for byte."""
    v1 = shared_data / V1
    config = ld.channel_config(str(v1 / "config_v1.yml"))
    with open(v1 / "images" / "Index.idx.xml", "rb") as fh:
        index = ld.parse_index(fh)
    table = ld.images_to_load_data(ld.index_to_images(index, config, "ref"), config, "tests/data/Version1/images/")
    expected = (v1 / "load_data_version1.csv").read_text()
    assert ld.to_csv_text(table) == expected
    ref = pd.read_csv(v1 / "load_data_version1.csv", dtype=str)
    assert list(table.columns) == list(ref.columns) and len(table) == len(ref) == 1


def test_same_as_pe2loaddata_headless_with_illum(shared_data, tmp_path):
    """Side by side with pe2loaddata's own function on the same folder, illum columns included."""
    from pe2loaddata.__main__ import headless

    v1 = shared_data / V1
    images = tmp_path / "images"
    shutil.copytree(v1 / "images", images)
    out, out_illum = tmp_path / "pe.csv", tmp_path / "pe_illum.csv"
    headless(str(v1 / "config_v1.yml"), str(out), index_directory=str(images), illum=True,
             illum_directory="/illum/BR00121482", plate_id="BR00121482", illum_output=str(out_illum))
    config = ld.channel_config(str(v1 / "config_v1.yml"))
    with open(images / "Index.idx.xml", "rb") as fh:
        table = ld.images_to_load_data(ld.index_to_images(ld.parse_index(fh), config, "x"), config, str(images))
    assert ld.to_csv_text(table) == out.read_text()
    illum = ld.add_illum_columns(table, config, "BR00121482", "/illum/BR00121482")
    assert ld.to_csv_text(illum) == out_illum.read_text()


def test_real_jump_site_with_cpjump1_channels(shared_data, tmp_path):
    """The real JUMP site (6 channels, ch6 'Brightfield') maps by ChannelName; the 2 missing
    bright-field planes of CPJUMP1 are reported as missing channels."""
    v1 = shared_data / V1
    with open(v1 / "images" / "Index.idx.xml", "rb") as fh:
        images = ld.index_to_images(ld.parse_index(fh), ld.CPJUMP1_CHANNELS, "x")
    table = ld.images_to_load_data(images, ld.CPJUMP1_CHANNELS, str(v1 / "images"))
    row = table.iloc[0]
    assert row["FileName_OrigDNA"] == "r01c01f01p01-ch5sk1fk1fl1.tiff"
    assert row["FileName_OrigMito"] == "r01c01f01p01-ch1sk1fk1fl1.tiff"
    assert row["FileName_OrigRNA"] == "r01c01f01p01-ch3sk1fk1fl1.tiff"
    assert row["FileName_OrigBrightfield"] == "r01c01f01p01-ch6sk1fk1fl1.tiff"
    assert row["FileName_OrigLowZBF"] is None and row["FileName_OrigHighZBF"] is None
    assert (row["Metadata_PositionX"], row["Metadata_PositionY"]) == ("0", "0")
    s = get_settings(storage_root=str(tmp_path / "d"))
    q = ld.qc_frame(table, s)
    assert q["_qc_missing_channels"].iloc[0] == "OrigHighZBF,OrigLowZBF"
    assert q["_qc_file_problem"].iloc[0] is None  # the six real TIFFs pass the header check


# --------------------------------------------------------------------------- the stage, local


def test_run_load_data_index_outputs_suite_and_rerun(plate_settings):
    s, plate_dir = plate_settings
    write_plate(plate_dir, PLATE, wells=("A01", "A02", "P24"), sites=3)
    res = ld.run_load_data(BATCH, PLATE, s, shards=2)
    assert not res.skipped and res.n_sites == 9 and res.n_images == 72 and res.n_shards == 2
    t = read_csv(res.load_data)
    ti = read_csv(res.load_data_with_illum)
    assert len(t) == len(ti) == 9
    assert list(ti.columns[: len(t.columns)]) == list(t.columns)
    for ch in ("DNA", "ER", "RNA", "AGP", "Mito", "LowZBF", "Brightfield", "HighZBF"):
        assert t[f"FileName_Orig{ch}"].str.endswith(".tiff").all()
        assert (ti[f"FileName_Illum{ch}"] == f"{PLATE}_Illum{ch}.npy").all()
        assert (ti[f"PathName_Illum{ch}"] == storage.Layout(s.storage_root).illum_dir(BATCH, PLATE)).all()
    assert (t["PathName_OrigDNA"] == str(plate_dir / "Images")).all()
    assert t[["Metadata_Well", "Metadata_Site"]].values.tolist()[:4] == [["A01", "1"], ["A01", "2"], ["A01", "3"], ["A02", "1"]]
    assert set(t["Metadata_Well"]) == {"A01", "A02", "P24"} and set(t["Metadata_Plate"]) == {PLATE}
    assert t.loc[0, "FileName_OrigDNA"] == image_name(1, 1, 1, 5)
    for col in ("Metadata_Row", "Metadata_Col", "Metadata_PositionX", "Metadata_PositionY", "Metadata_PositionZ_OrigDNA"):
        assert col in t.columns
    assert t.loc[1, "Metadata_PositionX"] == "0.0006"
    # shards: whole sites, deterministic, cover every row once
    man = json.loads(Path(res.shards).read_text())
    assert man["n_shards"] == 2 and [len(x["sites"]) for x in man["shards"]] == [5, 4]
    assert sorted(r for x in man["shards"] for r in x["rows"]) == list(range(9))
    assert man["shards"][0]["sites"][0] == "A01-1"
    # qc results as JSON and Data Docs HTML
    qc = Path(storage.Layout(s.storage_root).qc_dir("load_data", BATCH, PLATE))
    body = json.loads((qc / "load_data.json").read_text())
    assert body["cpjump1"]["success"] and body["great_expectations"]["success"]
    assert body["cpjump1"]["parameters"]["expected_images"] == 72
    assert "<html" in (qc / "load_data.html").read_text().lower()
    # rerun skipped; changed input rebuilt
    stamp = Path(res.load_data).stat().st_mtime_ns
    assert ld.run_load_data(BATCH, PLATE, s, shards=2).skipped
    assert Path(res.load_data).stat().st_mtime_ns == stamp
    assert not ld.run_load_data(BATCH, PLATE, s, shards=3).skipped
    assert json.loads(Path(res.shards).read_text())["n_shards"] == 3
    assert not ld.run_load_data(BATCH, PLATE, s, shards=3, force=True).skipped


def test_listing_mode_matches_index_mode(plate_settings):
    s, plate_dir = plate_settings
    images = write_plate(plate_dir, PLATE, wells=("B03", "C04"), sites=2)
    with_index = read_csv(ld.run_load_data(BATCH, PLATE, s).load_data)
    (images / "Index.idx.xml").unlink()
    without = read_csv(ld.run_load_data(BATCH, PLATE, s).load_data)
    fcols = [c for c in with_index.columns if c.startswith(("FileName_", "PathName_"))]
    same = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Row", "Metadata_Col", "Metadata_FieldID"]
    pd.testing.assert_frame_equal(with_index[fcols + same], without[fcols + same])
    assert without["Metadata_ChannelName_OrigRNA"].eq("488 long").all()
    assert (without["Metadata_PositionX"] == "").all()  # no positions without an index


def test_index_in_plate_folder_and_gallery_folder_name(settings, tmp_path):
    s = get_settings(storage_root=settings.storage_root, images_root=str(tmp_path / "images"))
    plate_dir = tmp_path / "images" / BATCH / "images" / f"{PLATE}__2020-11-05T19_51_35-Measurement1"
    images = write_plate(plate_dir, PLATE, wells=("A01",), sites=1)
    (images / "Index.idx.xml").rename(plate_dir / "Index.idx.xml")
    res = ld.run_load_data(BATCH, PLATE, s)
    t = read_csv(res.load_data)
    assert len(t) == 1 and t.loc[0, "Metadata_PositionZ_OrigHighZBF"] == "6e-06"


def test_sites_per_shard_and_shard_rules():
    t = pd.DataFrame({"Metadata_Well": ["A01"] * 3 + ["A02"] * 3, "Metadata_Site": ["1", "2", "3"] * 2})
    m = ld.make_shards(t, sites_per_shard=4)
    assert m["n_shards"] == 2 and m["shards"][0]["sites"] == ["A01-1", "A01-2", "A01-3"]
    assert ld.make_shards(t, shards=50)["n_shards"] == 6
    assert ld.make_shards(t, shards=4) == ld.make_shards(t, shards=4)
    # a site with two rows (two planes) stays in one shard
    t2 = pd.concat([t, t.iloc[[0]]], ignore_index=True)
    m2 = ld.make_shards(t2, shards=6)
    assert m2["shards"][0]["rows"] == [0, 6]


def test_cli_load_data(plate_settings, capsys):
    s, plate_dir = plate_settings
    write_plate(plate_dir, PLATE, wells=("A01",), sites=2)
    rc = main(["load-data", "--batch", BATCH, "--plate", PLATE, "--sites-per-shard", "1",
               "--storage-root", s.storage_root, "--images-root", s.resolved_images_root])
    assert rc == 0
    assert "2 sites, 16 images, 2 shard(s)" in capsys.readouterr().out
    rc = main(["load-data", "--batch", BATCH, "--plate", "NOPE", "--storage-root", s.storage_root,
               "--images-root", s.resolved_images_root])
    err = capsys.readouterr().err
    assert rc == 2 and "error: plate NOPE of batch B1" in err


def test_catalog_count_is_the_default_expectation(settings, tmp_path):
    """A plate without synthetic.json is checked against the catalog's Number_of_images (27648)."""
    s = get_settings(storage_root=settings.storage_root, images_root=str(tmp_path / "images"))
    batch, plate = "2020_11_04_CPJUMP1", "BR00117010"
    plate_dir = tmp_path / "images" / batch / "images" / plate
    write_plate(plate_dir, plate, wells=("A01",), sites=1)
    (plate_dir / "synthetic.json").unlink()
    with pytest.raises(ValidationFailed) as err:
        ld.run_load_data(batch, plate, s)
    assert "expect_column_sum_to_be_between(_qc_n_images" in str(err.value)
    assert "observed 8" in str(err.value) and "27648" in str(err.value)
    assert not Path(storage.Layout(s.storage_root).load_data_dir(batch, plate)).exists()


def test_with_cpjump1_synthesize(settings, tmp_path):
    synthetic = pytest.importorskip("cpjump1.synthetic")
    s = get_settings(storage_root=settings.storage_root)
    synthetic.run_synthesize("2020_11_04_CPJUMP1", "BR00117010", s, wells=2, sites=2, size=64, seed=0, progress=False)
    res = ld.run_load_data("2020_11_04_CPJUMP1", "BR00117010", s, shards=2)
    assert res.n_sites == 4 and res.n_images == 32
    t = read_csv(res.load_data)
    assert t["FileName_OrigDNA"].str.contains("-ch5sk").all()
    assert t["FileName_OrigHighZBF"].str.contains("-ch8sk").all()


# --------------------------------------------------------------------------- bad input


def assert_no_output(s):
    assert [n for n in out_files(s) if not n.startswith("_")] == []
    leftovers = list(Path(s.storage_root).rglob("*.tmp-*"))
    assert leftovers == []


def test_bad_empty_folder_without_index(plate_settings):
    s, plate_dir = plate_settings
    (plate_dir / "Images").mkdir(parents=True)
    with pytest.raises(InputDataError, match=r"plate P1 of batch B1: no images in .*Images"):
        ld.run_load_data(BATCH, PLATE, s)
    (plate_dir / "Images" / "notes.txt").write_text("x")
    with pytest.raises(InputDataError, match=r"no Index.idx.xml and no Harmony-named images"):
        ld.run_load_data(BATCH, PLATE, s)
    assert_no_output(s)


@pytest.mark.parametrize("with_index", [True, False])
def test_bad_channel_missing_for_some_sites(plate_settings, with_index):
    s, plate_dir = plate_settings
    images = write_plate(plate_dir, PLATE, wells=("A01", "B02"), sites=2, index=with_index)
    (images / image_name(2, 2, 2, 3)).unlink()  # RNA of B02 site 2
    (images / image_name(1, 1, 1, 4)).unlink()  # ER of A01 site 1
    with pytest.raises(ValidationFailed) as err:
        ld.run_load_data(BATCH, PLATE, s)
    msg = str(err.value)
    if with_index:  # the index lists them, the files are gone
        assert "expect_column_values_to_be_null(_qc_file_problem" in msg
        assert "r02c02f02p01-ch3sk1fk1fl1.tiff: missing" in msg
    else:  # the listing lacks them: the site has no file for the channel
        assert "expect_column_values_to_not_be_null(FileName_OrigRNA" in msg
        assert "Metadata_Well=B02, Metadata_Site=2" in msg
        assert "expect_column_values_to_be_null(_qc_missing_channels" in msg and "OrigER" in msg
    assert "expect_column_sum_to_be_between(_qc_n_images" in msg or with_index
    assert_no_output(s)


@pytest.mark.parametrize("kind", ["truncated", "not_tiff", "empty"])
def test_bad_image_header(plate_settings, kind):
    s, plate_dir = plate_settings
    images = write_plate(plate_dir, PLATE, wells=("A01",), sites=2, size=32)
    bad = images / image_name(1, 1, 2, 5)
    data = bad.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "not_tiff": b"\x89PNG\r\n\x1a\n" + data[8:], "empty": b""}[kind])
    with pytest.raises(ValidationFailed) as err:
        ld.run_load_data(BATCH, PLATE, s)
    msg = str(err.value)
    assert "_qc_file_problem" in msg and "r01c01f02p01-ch5sk1fk1fl1.tiff" in msg
    assert {"truncated": "truncated", "not_tiff": "not a TIFF", "empty": "truncated: 0 bytes"}[kind] in msg
    assert_no_output(s)


def test_tiff_problem_accepts_real_and_rejects_cut_images(shared_data):
    path = shared_data / V1 / "images" / "r01c01f01p01-ch5sk1fk1fl1.tiff"
    data = path.read_bytes()
    import io

    assert ld.tiff_problem(io.BytesIO(data), len(data)) is None
    cut = data[: len(data) - 1000]
    assert "truncated" in ld.tiff_problem(io.BytesIO(cut), len(cut))


@pytest.mark.parametrize("with_index", [True, False])
def test_bad_duplicate_images(plate_settings, with_index):
    s, plate_dir = plate_settings
    images = write_plate(plate_dir, PLATE, wells=("A01",), sites=2, index=with_index,
                         extra_images=[("A01", 1, 5)] if with_index else [])
    if not with_index:  # the same site and channel exported twice (.tif beside .tiff)
        shutil.copy(images / image_name(1, 1, 1, 5), images / image_name(1, 1, 1, 5).replace(".tiff", ".tif"))
    with pytest.raises(InputDataError, match=r"duplicate images .* P1 A01 site 1 OrigDNA"):
        ld.run_load_data(BATCH, PLATE, s)
    assert_no_output(s)


@pytest.mark.parametrize("with_index", [True, False])
def test_bad_wells_outside_384(plate_settings, with_index):
    s, plate_dir = plate_settings
    extra = [("Q01", 1, ch) for ch, *_ in CHANNELS] + [("A25", 1, ch) for ch, *_ in CHANNELS]
    write_plate(plate_dir, PLATE, wells=("A01",), sites=1, index=with_index, extra_images=extra)
    with pytest.raises(ValidationFailed) as err:
        ld.run_load_data(BATCH, PLATE, s)
    msg = str(err.value)
    assert "expect_column_values_to_match_regex(Metadata_Well" in msg
    assert "Metadata_Well=Q01" in msg and "Metadata_Well=A25" in msg
    assert_no_output(s)


def test_bad_unreachable_s3_endpoint(settings, tmp_path, monkeypatch):
    from s3_server import FAKE_CREDENTIALS

    for k, v in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    s = get_settings(storage_root=settings.storage_root, images_root="s3://nowhere/images",
                     s3_endpoint_url=f"http://127.0.0.1:{free_port()}", storage_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=r"could not .* s3://nowhere/images"):
        ld.run_load_data(BATCH, PLATE, s)
    assert time.perf_counter() - t0 < 60
    assert_no_output(s)
    # without credentials: a clear error too
    for k in FAKE_CREDENTIALS:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match=r"no S3 credentials|could not"):
        ld.run_load_data(BATCH, PLATE, s)


# --------------------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="module")
def s3_plate(tmp_path_factory):
    """moto's S3 server on loopback with a plate uploaded to a public-read bucket."""
    local = tmp_path_factory.mktemp("s3src")
    write_plate(local / BATCH / "images" / f"{PLATE}__2020-11-05T19_51_35-Measurement1", PLATE,
                wells=("A01", "C07"), sites=2)
    with moto_s3() as endpoint:
        make_bucket(endpoint, "gallery", public=True)
        make_bucket(endpoint, "work")
        assert upload_tree(local, endpoint, "gallery", "cpjump1/images") == 34
        yield endpoint


def test_s3_credentialed_read_and_write(s3_plate, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    s = get_settings(storage_root="s3://work/run1", images_root="s3://gallery/cpjump1/images",
                     s3_endpoint_url=s3_plate)
    res = ld.run_load_data(BATCH, PLATE, s, shards=2)
    assert res.load_data.startswith("s3://work/run1/workspace/load_data_csv/B1/P1/")
    with storage.open_file(res.load_data_with_illum, "rb", s) as fh:
        t = pd.read_csv(fh, dtype=str)
    folder = "s3://gallery/cpjump1/images/B1/images/P1__2020-11-05T19_51_35-Measurement1/Images"
    assert len(t) == 4 and (t["PathName_OrigDNA"] == folder).all()
    assert (t["PathName_IllumDNA"] == "s3://work/run1/workspace/illum/B1/P1").all()
    assert storage.exists("s3://work/run1/qc/load_data/B1/P1/load_data.html", s)
    assert json.loads(storage.read_text(res.shards, s))["n_shards"] == 2
    assert ld.run_load_data(BATCH, PLATE, s, shards=2).skipped


def test_s3_anonymous_read(s3_plate, settings):
    s = get_settings(storage_root=settings.storage_root, images_root="s3://gallery/cpjump1/images",
                     s3_endpoint_url=s3_plate, s3_anonymous=True)
    res = ld.run_load_data(BATCH, PLATE, s)
    assert res.n_images == 32 and Path(res.load_data).exists()
    # a private bucket read anonymously: a clear error, no output
    s2 = get_settings(storage_root=str(Path(settings.storage_root) / "x"), images_root="s3://work/images",
                      s3_endpoint_url=s3_plate, s3_anonymous=True)
    with pytest.raises((StorageError, InputDataError), match="P1"):
        ld.run_load_data(BATCH, PLATE, s2)


def test_s3_bad_image_found_by_header_sample(s3_plate, settings, monkeypatch):
    """On S3 the headers of a sample are read; with the sample covering the plate a bad
    image fails the suite."""
    from s3_server import client

    c = client(s3_plate)
    key = "cpjump1/images/B1/images/P1__2020-11-05T19_51_35-Measurement1/Images/" + image_name(3, 7, 2, 1)
    good = c.get_object(Bucket="gallery", Key=key)["Body"].read()
    c.put_object(Bucket="gallery", Key=key, Body=b"not a tiff at all")
    try:
        monkeypatch.setattr(ld, "REMOTE_HEADER_SAMPLE", 1000)
        s = get_settings(storage_root=str(Path(settings.storage_root) / "y"),
                         images_root="s3://gallery/cpjump1/images", s3_endpoint_url=s3_plate)
        with pytest.raises(ValidationFailed, match="r03c07f02p01-ch1sk1fk1fl1.tiff: not a TIFF"):
            ld.run_load_data(BATCH, PLATE, s)
    finally:
        c.put_object(Bucket="gallery", Key=key, Body=good)
