"""DeepProfiler stage: end to end on a tiny synthetic plate, the checkpoint guard, bad input.

The tiny plate is made here (16-bit TIFFs, illumination functions, load_data_with_illum.csv in
pe2loaddata layout, Nuclei.csv in complete analysis shards), so these tests do not depend on
the CellProfiler stages. Tests marked ``deepprofiler`` need ``make deepprofiler-env``.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cpjump1 import deepprofiler as dp
from cpjump1 import storage
from cpjump1.cli import main
from cpjump1.errors import InputDataError
from cpjump1.settings import get_settings

BATCH = "2020_11_04_CPJUMP1"
PLATE = "BR00117010"
#: JUMP-Target-1 compound plate map: A02 and A09 are DMSO (negative controls).
WELLS = ("A01", "A02", "A03", "A09")
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito", "Brightfield")
SHARDS = 2

needs_dp = pytest.mark.deepprofiler


def dp_env_missing() -> str | None:
    python = get_settings().deepprofiler_python
    return None if Path(python).exists() else f"DeepProfiler env absent ({python}); run `make deepprofiler-env`"


def write_fixture_plate(root: Path, wells=WELLS, sites: int = 2, size: int = 160, cells: int = 5,
                        seed: int = 0, batch: str = BATCH, plate: str = PLATE) -> dict:
    """A tiny plate with the inputs the stage reads (see the module docstring).

    Cells are Gaussian blobs: a nucleus in DNA and a larger body in the other channels, with a
    per-well brightness/size so that wells differ.
    """
    rng = np.random.default_rng(seed)
    settings = get_settings(storage_root=str(root))
    layout = storage.Layout(str(root))
    img_dir = root / "images" / batch / "images" / plate / "Images"
    img_dir.mkdir(parents=True, exist_ok=True)
    illum_dir = Path(layout.illum_dir(batch, plate))
    illum_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    vignette = 0.6 + 0.4 * np.exp(-(((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (size * 0.6) ** 2)))
    for ch in CHANNELS:
        np.save(illum_dir / f"{plate}_Illum{ch}.npy", vignette.astype(np.float32))
    rows, nuclei = [], []
    site_list = [(w, s) for w in wells for s in range(1, sites + 1)]
    for wi, (well, site) in enumerate(site_list):
        centers = rng.uniform(12, size - 12, size=(cells, 2))
        well_idx = wells.index(well)
        row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
        for ci, ch in enumerate(CHANNELS):
            img = rng.normal(300, 20, size=(size, size)).astype(np.float32)
            radius = 4.0 if ch == "DNA" else 9.0 + well_idx + ci
            for x, y in centers:
                img += (3000 + 800 * well_idx * (ci % 3)) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * radius ** 2))
            img = np.clip(img * vignette, 0, 65535).astype(np.uint16)
            name = f"{well}_s{site}_{ch}.tiff"
            import tifffile

            tifffile.imwrite(img_dir / name, img)
            row[f"FileName_Orig{ch}"] = name
            row[f"PathName_Orig{ch}"] = str(img_dir)
            row[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
            row[f"PathName_Illum{ch}"] = str(illum_dir)
        rows.append(row)
        for x, y in centers:
            nuclei.append({"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site,
                           "Location_Center_X": float(x), "Location_Center_Y": float(y), "_shard": wi % SHARDS})
    ld_dir = Path(layout.load_data_dir(batch, plate))
    ld_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(ld_dir / "load_data_with_illum.csv", index=False)
    nuc = pd.DataFrame(nuclei)
    for shard in range(SHARDS):
        folder = layout.analysis_shard_dir(batch, plate, shard)
        Path(folder).mkdir(parents=True, exist_ok=True)
        nuc[nuc["_shard"] == shard].drop(columns="_shard").to_csv(Path(folder) / "Nuclei.csv", index=False)
        storage.write_marker(folder, f"fixture-{shard}", settings)
    return {"settings": settings, "sites": len(site_list), "cells": len(nuclei), "image_dir": img_dir,
            "load_data": ld_dir / "load_data_with_illum.csv"}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def dp_env():
    reason = dp_env_missing()
    if reason:
        pytest.skip(reason)
    return get_settings().deepprofiler_python


@pytest.fixture(scope="session")
def seeded_checkpoint(dp_env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "seeded-b0-s0.h5"
    dp.build_checkpoint(str(out), get_settings(), seed=0)
    return out


@pytest.fixture(scope="session")
def profiled(dp_env, seeded_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-plate")
    fixture = write_fixture_plate(root)
    # 8 sites in chunks of 5: two DeepProfiler runs, as a real plate has; images kept for the
    # reference-features test.
    result = dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=str(seeded_checkpoint),
                                  progress=False, keep_images=True, sites_per_chunk=5, allow_missing_wells=True)
    return {"root": root, "result": result, **fixture}


# --------------------------------------------------------------------------- no DP env needed


def test_config_template_covers_the_seed_config():
    seed = Path(__file__).resolve().parents[1].parent / "shared" / "cpjump1" / "deep_profiles" / "inputs" / "config" / "jump.json"
    cfg = dp.load_config(get_settings())
    assert cfg["dataset"]["images"]["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert cfg["dataset"]["locations"]["box_size"] == 96
    assert cfg["dataset"]["locations"]["mode"] == "single_cells"
    assert cfg["dataset"]["images"]["bits"] == 16
    assert cfg["train"]["model"]["name"] == "efficientnet" and cfg["train"]["model"]["params"]["conv_blocks"] == 0
    assert cfg["prepare"]["compression"]["implement"] is False
    assert "use_pretrained_input_size" not in cfg["profile"]
    if not seed.exists():
        pytest.skip(f"seed config absent: {seed}")
    ref = json.loads(seed.read_text())
    for path in (("dataset", "images", "channels"), ("dataset", "images", "bits"), ("dataset", "locations", "box_size"),
                 ("dataset", "locations", "mode"), ("dataset", "locations", "mask_objects"),
                 ("train", "model", "params", "conv_blocks"), ("train", "model", "name")):
        a, b = cfg, ref
        for k in path:
            a, b = a[k], b[k]
        assert a == b, path


def test_correct_image_rejects_wrong_bit_depth_and_size():
    illum = np.ones((8, 8), np.float32)
    with pytest.raises(InputDataError, match=r"img\.tif: bit depth uint8"):
        dp.correct_image(np.zeros((8, 8), np.uint8), illum, "img.tif", 16, None)
    with pytest.raises(InputDataError, match=r"img\.tif: size 6x8 differs from the plate's 8x8"):
        dp.correct_image(np.zeros((8, 6), np.uint16), illum, "img.tif", 16, (8, 8))
    out = dp.correct_image(np.full((8, 8), 1000, np.uint16), np.full((8, 8), 0.5, np.float32), "img.tif", 16, None)
    assert out.dtype == np.uint16 and (out == 2000).all()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    fixture = write_fixture_plate(tmp_path, wells=("A01",), sites=1)
    missing = tmp_path / "nope" / "model.h5"
    with pytest.raises(dp.CheckpointError, match=f"checkpoint not found: {missing}"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=str(missing), progress=False)
    with pytest.raises(dp.CheckpointError, match="no DeepProfiler checkpoint configured"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=None, progress=False)
    rc = main(["deep-profiles", "--batch", BATCH, "--plate", PLATE, "--storage-root", str(tmp_path),
               "--checkpoint", str(missing)])
    assert rc == 2
    assert not Path(storage.Layout(str(tmp_path)).deep_profiles_dir(BATCH, PLATE)).exists()


def test_site_without_locations_names_the_site(tmp_path):
    fixture = write_fixture_plate(tmp_path, wells=("A01", "A02"), sites=1)
    ckpt = tmp_path / "c.h5"
    ckpt.write_bytes(b"x")
    layout = storage.Layout(str(tmp_path))
    for shard in range(SHARDS):
        f = Path(layout.analysis_shard_dir(BATCH, PLATE, shard)) / "Nuclei.csv"
        nuc = pd.read_csv(f)
        nuc[nuc.Metadata_Well != "A02"].to_csv(f, index=False)
    with pytest.raises(InputDataError, match=r"site A02-1 .*load_data_with_illum\.csv.* no nuclei locations in .*Nuclei\.csv"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=str(ckpt), progress=False,
                             workdir=tmp_path / "w")


@pytest.mark.parametrize("bad", ["bits", "size"])
def test_bad_images_name_the_file(tmp_path, bad, monkeypatch):
    import tifffile

    # images are corrected after the checkpoint guard; this test is about the images only
    monkeypatch.setattr(dp, "verify_checkpoint", lambda *a, **k: {"ok": True, "matched": 130, "backbone_layers": 130})
    monkeypatch.setattr(dp, "_run_profile", lambda *a, **k: pytest.fail("DeepProfiler must not run"))

    fixture = write_fixture_plate(tmp_path, wells=("A01",), sites=2)
    ckpt = tmp_path / "c.h5"
    ckpt.write_bytes(b"x")
    victim = fixture["image_dir"] / "A01_s2_RNA.tiff"
    img = tifffile.imread(victim)
    tifffile.imwrite(victim, (img // 256).astype(np.uint8) if bad == "bits" else img[:100, :])
    pattern = "bit depth uint8" if bad == "bits" else "size 160x100 differs"
    with pytest.raises(InputDataError, match=f"A01_s2_RNA.tiff: {pattern}"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=str(ckpt), progress=False,
                             workdir=tmp_path / "w")
    assert not Path(storage.Layout(str(tmp_path)).deep_profiles_dir(BATCH, PLATE)).exists()


def test_checkpoint_from_s3(tmp_path):
    """The checkpoint is a configured artifact: an s3:// URL is fetched whole; a missing key
    and a wrong suffix are clear errors."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from s3_server import client, make_bucket, moto_s3

    with moto_s3() as endpoint:
        make_bucket(endpoint, "models")
        body = b"not really hdf5, fetched byte for byte"
        client(endpoint).put_object(Bucket="models", Key="dp/ckpt.h5", Body=body)
        settings = get_settings(storage_root=str(tmp_path), s3_endpoint_url=endpoint)
        local, sha = dp.fetch_checkpoint("s3://models/dp/ckpt.h5", tmp_path / "stage", settings)
        assert local.read_bytes() == body and sha == __import__("hashlib").sha256(body).hexdigest()
        with pytest.raises(dp.CheckpointError, match="checkpoint not found: s3://models/dp/other.h5"):
            dp.fetch_checkpoint("s3://models/dp/other.h5", tmp_path / "stage", settings)
        with pytest.raises(dp.CheckpointError, match=r"ckpt\.weights\.h5: DeepProfiler needs a Keras-2 HDF5"):
            dp.fetch_checkpoint("s3://models/dp/ckpt.weights.h5", tmp_path / "stage", settings)


def test_no_complete_analysis_shard(tmp_path):
    fixture = write_fixture_plate(tmp_path, wells=("A01",), sites=1)
    layout = storage.Layout(str(tmp_path))
    for shard in range(SHARDS):
        (Path(layout.analysis_shard_dir(BATCH, PLATE, shard)) / storage.MARKER_NAME).unlink()
    with pytest.raises(InputDataError, match="no complete analysis shard"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint="x.h5", progress=False)


# --------------------------------------------------------------------------- DeepProfiler runs


@needs_dp
def test_seeded_checkpoint_is_labelled(seeded_checkpoint):
    meta = json.loads(Path(str(seeded_checkpoint) + ".provenance.json").read_text())
    assert meta["provenance"]["kind"] == dp.SEEDED_LABEL and meta["provenance"]["seed"] == 0
    assert meta["layers_with_weights"] == 131  # EfficientNet-B0 backbone (130) + head
    assert meta["sha256"] == dp._sha256(seeded_checkpoint)


@needs_dp
def test_end_to_end_outputs(profiled):
    result, settings = profiled["result"], profiled["settings"]
    assert not result.skipped
    assert result.sites == profiled["sites"] and result.cells == profiled["cells"]
    prov = result.provenance
    assert prov["checkpoint_kind"] == dp.SEEDED_LABEL
    assert prov["guard"]["matched"] == prov["guard"]["backbone_layers"] == 130
    assert prov["features"] == 1280 and prov["image_size"] == [160, 160] and prov["chunks"] == 2
    out = Path(storage.Layout(settings.storage_root).deep_profiles_dir(BATCH, PLATE))
    for level in dp.LEVELS:
        assert (out / f"{PLATE}{level}.csv.gz").exists() and (out / f"{PLATE}{level}.parquet").exists()
    agg = pd.read_parquet(out / f"{PLATE}.parquet")
    feats = [c for c in agg.columns if c.startswith("DP_efficientnet_")]
    assert len(feats) == 1280 and sorted(agg.Metadata_Well) == sorted(WELLS)
    assert (agg.Metadata_Count_Cells == 10).all() and (agg.Metadata_Count_Sites == 2).all()
    assert (agg.Metadata_Model_Checkpoint_Kind == dp.SEEDED_LABEL).all()
    aug = pd.read_csv(out / f"{PLATE}_augmented.csv.gz")
    negcon = set(aug.loc[aug.Metadata_control_type == "negcon", "Metadata_Well"])
    assert negcon == {"A02", "A09"}
    assert aug.loc[aug.Metadata_Well == "A01", "Metadata_pert_iname"].item() == "gabapentin-enacarbil"
    sph = pd.read_parquet(out / f"{PLATE}_spherized.parquet")
    assert np.isfinite(sph[feats].to_numpy()).all()
    assert (sph.Metadata_Model_Checkpoint_Kind == dp.SEEDED_LABEL).all()
    # the well means are the means of DeepProfiler's npz features
    project = Path(prov["project"])
    npz = sorted((project / "outputs" / prov["experiment"] / "features" / PLATE / "A01").glob("*.npz"))
    assert len(npz) == 2
    cells = np.vstack([np.load(p, allow_pickle=True)["features"] for p in npz]).astype(np.float64)
    np.testing.assert_allclose(agg.loc[agg.Metadata_Well == "A01", feats].to_numpy()[0], cells.mean(axis=0), rtol=1e-12)
    assert cells.std() > 0


@needs_dp
def test_rerun_skips_and_expectations_pass(profiled):
    settings = profiled["settings"]
    again = dp.run_deep_profiles(BATCH, PLATE, settings, checkpoint=str(profiled["result"].provenance["checkpoint"]),
                                 progress=False)
    assert again.skipped
    from cpjump1 import validation

    reports = validation.run_validation("deep_profiles", BATCH, PLATE, settings)
    assert len(reports) == 2 and all(r.success for r in reports)
    assert all(r.evaluated >= 20 and not r.skipped for r in reports)
    out = Path(storage.Layout(settings.storage_root).deep_profiles_dir(BATCH, PLATE))
    broken = pd.read_parquet(out / f"{PLATE}_spherized.parquet")
    broken = broken.drop(columns=["Metadata_Model_Checkpoint_Kind"]).iloc[:-1]
    report = validation.run_suite(broken, "deep_profiles", batch=BATCH, plate=PLATE, stage="deep_profiles",
                                  settings=settings, extra_context={"plates": [PLATE], "wells": len(WELLS),
                                                                    "min_columns": 1284},
                                  raise_on_failure=False)
    failed = {(f.type, f.column) for f in report.failures}
    assert ("expect_column_to_exist", "Metadata_Model_Checkpoint_Kind") in failed
    assert ("expect_table_row_count_to_equal", None) in failed


@needs_dp
def test_weights_in_the_file_are_the_weights_used(profiled, seeded_checkpoint, tmp_path, dp_env):
    """Features of the real `deepprofiler profile` run equal, bit for bit, features computed by
    assigning every layer's weights explicitly from the HDF5 file (h5py, no Keras loading);
    a checkpoint with one backbone layer changed gives different features."""
    prov = profiled["result"].provenance
    project = Path(prov["project"])
    perturbed = tmp_path / "perturbed.h5"
    perturbed.write_bytes(seeded_checkpoint.read_bytes())
    subprocess.run([dp_env, "-c", (
        "import h5py,sys\n"
        "with h5py.File(sys.argv[1],'a') as f:\n"
        "    g=f['top_conv']; n=g.attrs['weight_names'][0]; n=n.decode() if isinstance(n,bytes) else n\n"
        "    d=g[n]; d[...]=d[()]*1.5\n"), str(perturbed)], check=True)
    ref = dp._worker(get_settings(), ["reference-features", "--root", str(project), "--config", dp.CONFIG_NAME,
                                      "--exp", prov["experiment"], "--checkpoint", str(seeded_checkpoint),
                                      "--checkpoint", str(perturbed), "--row", "0", "--out-dir", str(tmp_path / "ref")],
                     "reference features")
    same, changed = ref["outputs"]
    assert same["assigned_layers"] == 130
    real = project / "outputs" / prov["experiment"] / "features" / PLATE / "A01" / "1.npz"
    real_f = np.load(real, allow_pickle=True)["features"]
    np.testing.assert_array_equal(np.load(same["npz"], allow_pickle=True)["features"], real_f)
    other = np.load(changed["npz"], allow_pickle=True)["features"]
    assert other.shape == real_f.shape and not np.array_equal(other, real_f)


@needs_dp
def test_guard_rejects_checkpoint_with_unmatched_layer_names(profiled, seeded_checkpoint, tmp_path, dp_env):
    """A file whose `stem_conv` layer is stored under another name would be loaded by
    DeepProfiler without a word, leaving that layer random; the stage refuses it."""
    renamed = tmp_path / "renamed.h5"
    renamed.write_bytes(seeded_checkpoint.read_bytes())
    subprocess.run([dp_env, "-c", (
        "import h5py,sys,numpy as np\n"
        "with h5py.File(sys.argv[1],'a') as f:\n"
        "    f.move('stem_conv','stem_conv_renamed')\n"
        "    names=[n.decode() if isinstance(n,bytes) else n for n in f.attrs['layer_names']]\n"
        "    f.attrs['layer_names']=np.array([('stem_conv_renamed' if n=='stem_conv' else n).encode() for n in names])\n"),
        str(renamed)], check=True)
    root = tmp_path / "plate"
    fixture = write_fixture_plate(root, wells=("A01", "A02"), sites=1, cells=3)
    with pytest.raises(dp.CheckpointError, match=r"renamed\.h5: only 129 of 130 backbone layers match.*stem_conv"):
        dp.run_deep_profiles(BATCH, PLATE, fixture["settings"], checkpoint=str(renamed), progress=False)
    assert not Path(storage.Layout(str(root)).deep_profiles_dir(BATCH, PLATE)).exists()
