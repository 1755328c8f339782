"""CellProfiler stages (illum, analysis): pipelines, sharding, markers, bad input.

Tests marked ``cellprofiler`` run CellProfiler 4.2.8.1 from ``.venvs/cellprofiler`` (``make
cellprofiler-env``) and are skipped when it is absent: a synthetic plate (2 wells x 2 sites x
256 px, 8 channels, 2 shards) and the real JUMP site of pe2loaddata's test data (6 channels,
1080 px).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cpjump1 import cellprofiler as cp
from cpjump1 import storage
from cpjump1.errors import InputDataError, UnknownNameError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "cpjump1"
JUMP_SITE = SHARED / "external" / "pe2loaddata_testdata" / "Version1"
CP_PYTHON = REPO / ".venvs" / "cellprofiler" / "bin" / "python"
needs_cp = pytest.mark.skipif(
    not CP_PYTHON.exists(), reason=f"CellProfiler environment absent ({CP_PYTHON}); run `make cellprofiler-env`"
)
BATCH, PLATE = "2020_11_04_CPJUMP1", "BR00117010"
JUMP_CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito", "Brightfield"]
FAMILIES = ("AreaShape", "Intensity", "Granularity", "Texture", "RadialDistribution", "Correlation")


def _clean_env(monkeypatch=None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPJUMP1_")}
    if monkeypatch is not None:
        for k in os.environ:
            if k.startswith("CPJUMP1_"):
                monkeypatch.delenv(k, raising=False)
    return env


def _settings(root: Path, **kw):
    from cpjump1.settings import get_settings

    return get_settings(storage_root=str(root), cellprofiler_python=str(CP_PYTHON), **kw)


# --------------------------------------------------------------------------- pipelines (no CellProfiler)


def _modules(text):
    return cp.parse_pipeline(text)[1]


def test_pipelines_are_cellprofiler_files_for_all_cpjump1_channels(settings):
    for name in ("illum", "analysis"):
        text = (REPO / "pipelines" / f"{name}.cppipe").read_text()
        header, modules = cp.parse_pipeline(text)
        assert header[0].startswith("CellProfiler Pipeline")
        assert f"ModuleCount:{len(modules)}" in header
        assert [int(m.header.split("module_num:")[1].split("|")[0]) for m in modules] == list(range(1, len(modules) + 1))
        assert modules[0].name == "LoadData"
        for ch in cp.CHANNELS:
            assert f"Orig{ch}" in text
        # the adapted text for the full channel set is the file itself (modulo blank lines)
        assert cp.adapt_pipeline(text, cp.CHANNELS).split() == text.split()
    analysis = _modules((REPO / "pipelines" / "analysis.cppipe").read_text())
    names = [m.name for m in analysis]
    for needed in (
        "CorrectIlluminationApply", "IdentifyPrimaryObjects", "IdentifySecondaryObjects", "IdentifyTertiaryObjects",
        "MeasureObjectIntensity", "MeasureGranularity", "MeasureTexture", "MeasureObjectSizeShape",
        "MeasureObjectIntensityDistribution", "MeasureColocalization", "MeasureObjectNeighbors", "ExportToSpreadsheet",
    ):
        assert needed in names
    tertiary = next(m for m in analysis if m.name == "IdentifyTertiaryObjects")
    assert tertiary.values("Shrink smaller object prior to subtraction?") == ["Yes"]
    export = next(m for m in analysis if m.name == "ExportToSpreadsheet")
    assert export.values("Add a prefix to file names?") == ["No"]
    assert export.values("Add image metadata columns to your object data file?") == ["Yes"]
    assert export.values("Overwrite existing files without warning?") == ["Yes"]
    texture = next(m for m in analysis if m.name == "MeasureTexture")
    assert len(texture.values("Texture scale to measure")) >= 2
    # every per-image measurement covers every channel, fluorescent and bright-field
    every = ", ".join(f"Corr{c}" for c in cp.CHANNELS)
    for name in ("MeasureObjectIntensity", "MeasureGranularity", "MeasureTexture",
                 "MeasureObjectIntensityDistribution", "MeasureColocalization"):
        module = next(m for m in analysis if m.name == name)
        assert module.values("Select images to measure") == [every], name


def test_adapt_pipeline_to_the_six_channels_of_a_jump_site():
    for name in ("illum", "analysis"):
        text = (REPO / "pipelines" / f"{name}.cppipe").read_text()
        adapted = cp.adapt_pipeline(text, JUMP_CHANNELS)
        assert "LowZBF" not in adapted and "HighZBF" not in adapted
        header, modules = cp.parse_pipeline(adapted)
        assert f"ModuleCount:{len(modules)}" in header
        assert len(modules) < len(_modules(text))
        for ch in JUMP_CHANNELS:
            assert f"Orig{ch}" in adapted
    adapted = cp.adapt_pipeline((REPO / "pipelines" / "analysis.cppipe").read_text(), JUMP_CHANNELS)
    intensity = next(m for m in _modules(adapted) if m.name == "MeasureObjectIntensity")
    assert intensity.values("Select images to measure") == [", ".join(f"Corr{c}" for c in JUMP_CHANNELS)]
    for name in ("MeasureTexture", "MeasureColocalization"):
        module = next(m for m in _modules(adapted) if m.name == name)
        assert module.values("Select images to measure") == [", ".join(f"Corr{c}" for c in JUMP_CHANNELS)], name
    apply = [m for m in _modules(adapted) if m.name == "CorrectIlluminationApply"]
    assert [m.values("Select the input image")[0] for m in apply] == [f"Orig{c}" for c in JUMP_CHANNELS]


def test_adapt_pipeline_picks_another_cell_stain_and_needs_dna():
    text = (REPO / "pipelines" / "analysis.cppipe").read_text()
    adapted = cp.adapt_pipeline(text, ["DNA", "RNA", "Mito"])
    secondary = next(m for m in _modules(adapted) if m.name == "IdentifySecondaryObjects")
    assert secondary.values("Select the input image") == ["CorrRNA"]
    with pytest.raises(InputDataError, match="no DNA channel"):
        cp.adapt_pipeline(text, ["ER", "AGP"])
    with pytest.raises(InputDataError, match="cytoplasm or membrane stain"):
        cp.adapt_pipeline(text, ["DNA", "Brightfield"])


def test_channels_of_load_data_columns(caplog):
    cols = ["FileName_OrigDNA", "PathName_OrigDNA", "FileName_OrigFoo", "FileName_OrigAGP", "FileName_IllumDNA"]
    assert cp.channels_of(cols) == ["DNA", "AGP"]
    assert "Foo" in caplog.text


# --------------------------------------------------------------------------- bad input before CellProfiler


def _write_load_data(settings, rows: int, channels=("DNA", "AGP"), illum_dir: str | None = None, shards=None):
    layout = storage.Layout(settings.storage_root)
    folder = Path(layout.load_data_dir(BATCH, PLATE))
    folder.mkdir(parents=True, exist_ok=True)
    illum_dir = illum_dir or layout.illum_dir(BATCH, PLATE)
    records = []
    for i in range(rows):
        r = {}
        for ch in channels:
            r[f"FileName_Orig{ch}"] = f"img{i}-{ch}.tiff"
            r[f"PathName_Orig{ch}"] = str(folder / "images")
        r.update(Metadata_Plate=PLATE, Metadata_Well="A01", Metadata_Site=str(i + 1))
        records.append(r)
    table = pd.DataFrame(records)
    table.to_csv(folder / "load_data.csv", index=False)
    for ch in channels:
        table[f"FileName_Illum{ch}"] = f"{PLATE}_Illum{ch}.npy"
        table[f"PathName_Illum{ch}"] = illum_dir
    table.to_csv(folder / "load_data_with_illum.csv", index=False)
    if shards is not None:
        (folder / "shards.json").write_text(json.dumps(shards))
    return folder


def test_missing_illum_function_fails_before_cellprofiler_starts(settings, monkeypatch):
    _write_load_data(settings, rows=2)

    def boom(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("CellProfiler was started")

    monkeypatch.setattr(cp, "run_cellprofiler", boom)
    with pytest.raises(InputDataError, match=r"missing illumination function.*BR00117010_IllumDNA\.npy.*cpjump1 illum"):
        cp.run_analysis(BATCH, PLATE, 0, settings)
    # one function present, the other still missing: the message names only the missing one
    illum = Path(storage.Layout(settings.storage_root).illum_dir(BATCH, PLATE))
    illum.mkdir(parents=True)
    np.save(illum / f"{PLATE}_IllumDNA.npy", np.ones((4, 4), np.float32))
    with pytest.raises(InputDataError) as err:
        cp.run_analysis(BATCH, PLATE, 0, settings)
    assert "IllumAGP" in str(err.value) and "IllumDNA" not in str(err.value)


def test_shards_manifest_and_unknown_shard(settings):
    _write_load_data(settings, rows=3, shards={"n_shards": 2, "shards": [
        {"index": 0, "rows": [0, 1], "sites": ["A01-1", "A01-2"]}, {"index": 1, "rows": [2], "sites": ["A01-3"]}]})
    assert cp.shard_rows(BATCH, PLATE, 1, settings, 3) == [2]
    with pytest.raises(UnknownNameError, match="no shard 5; shards are 0, 1"):
        cp.run_analysis(BATCH, PLATE, 5, settings)


def test_without_manifest_the_plate_is_shard_zero(settings):
    _write_load_data(settings, rows=3)
    assert cp.read_shards(BATCH, PLATE, settings, 3) == [{"index": 0, "rows": [0, 1, 2], "sites": None}]


def test_missing_load_data_is_a_clear_error(settings):
    with pytest.raises(InputDataError, match="no load_data.csv .*cpjump1 load-data"):
        cp.run_illum(BATCH, PLATE, settings)


def test_missing_cellprofiler_environment_is_a_clear_error(settings, capsys):
    from cpjump1.cli import main

    _write_load_data(settings, rows=1)
    settings_file = Path(".env")
    settings_file.write_text(f"CPJUMP1_STORAGE_ROOT={settings.storage_root}\nCPJUMP1_CELLPROFILER_PYTHON=/nonexistent/python\n")
    assert main(["illum", "--batch", BATCH, "--plate", PLATE]) == 2
    err = capsys.readouterr().err
    assert "CellProfiler environment not found: /nonexistent/python" in err and "make cellprofiler-env" in err


def test_digest_columns_are_dropped_from_image_tables(tmp_path):
    # pandas 2.3's C parser segfaults on this digest (read as a float with a huge exponent), so
    # it is only ever read here with the csv module and, after the drop, with pandas.
    path = tmp_path / "Image.csv"
    path.write_bytes(
        b"Count_Nuclei,MD5Digest_OrigDNA,Metadata_Well,MD5Digest_IllumRNA\r\n"
        b"12,0be30f01ae9afb9c87946f3494df8938,A01,840970e7163834292b0add5e1eb66f7a\r\n"
        b"7,63830f045fff49c1f7f1256ccbd0143f,A02,840970e7163834292b0add5e1eb66f7a\r\n"
    )
    assert cp.drop_digest_columns(path) == ["MD5Digest_OrigDNA", "MD5Digest_IllumRNA"]
    assert path.read_bytes() == b"Count_Nuclei,Metadata_Well\r\n12,A01\r\n7,A02\r\n"
    assert pd.read_csv(path)["Count_Nuclei"].tolist() == [12, 7]
    assert cp.drop_digest_columns(path) == []


def test_feature_nan_table():
    tables = {
        "Nuclei": pd.DataFrame({"ImageNumber": [1, 1], "AreaShape_Area": [1.0, np.nan], "Metadata_Well": ["A01"] * 2}),
        "Cells": pd.DataFrame({"ImageNumber": [1, 1], "Texture_X": [np.nan, np.nan]}),
        "Cytoplasm": pd.DataFrame({"ImageNumber": [], "Intensity_X": []}),
    }
    got = cp.feature_nan_table(tables)
    assert got.to_dict("records") == [
        {"compartment": "Nuclei", "feature": "AreaShape_Area", "nan_fraction": 0.5},
        {"compartment": "Cells", "feature": "Texture_X", "nan_fraction": 1.0},
    ]


def test_remote_inputs_are_staged_per_shard_and_outputs_uploaded(tmp_path, monkeypatch):
    """S3 storage (moto): only the shard's images and the illum functions are copied to scratch,
    PathName columns point at the copies, outputs and marker are uploaded; a rerun is skipped.

    CellProfiler itself is replaced by a stand-in that checks its inputs and writes small
    tables (the real runs are the ``cellprofiler`` tests below)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from s3_server import make_bucket, moto_s3

    from cpjump1.settings import get_settings

    _clean_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with moto_s3() as endpoint:
        make_bucket(endpoint, "cpbucket")
        s = get_settings(storage_root="s3://cpbucket/root", s3_endpoint_url=endpoint, cellprofiler_python=sys.executable)
        layout = storage.Layout(s.storage_root)
        images = "s3://cpbucket/images/plate"
        rows = []
        for i in range(4):
            r = {}
            for ch in ("DNA", "AGP"):
                name = f"s{i}-{ch}.tiff"
                with storage.atomic_write(storage.join(images, name), s) as fh:
                    fh.write(b"pixels" + bytes([i]))
                r[f"FileName_Orig{ch}"], r[f"PathName_Orig{ch}"] = name, images
                r[f"FileName_Illum{ch}"], r[f"PathName_Illum{ch}"] = f"{PLATE}_Illum{ch}.npy", layout.illum_dir(BATCH, PLATE)
            r.update(Metadata_Plate=PLATE, Metadata_Well="A01", Metadata_Site=str(i + 1))
            rows.append(r)
        ld = layout.load_data_dir(BATCH, PLATE)
        with storage.atomic_write(storage.join(ld, "load_data_with_illum.csv"), s, mode="w") as fh:
            pd.DataFrame(rows).to_csv(fh, index=False)
        with storage.atomic_write(storage.join(ld, "shards.json"), s, mode="w") as fh:
            json.dump({"n_shards": 2, "shards": [{"index": 0, "rows": [0, 1]}, {"index": 1, "rows": [2, 3]}]}, fh)
        for ch in ("DNA", "AGP"):
            with storage.atomic_write(storage.join(layout.illum_dir(BATCH, PLATE), f"{PLATE}_Illum{ch}.npy"), s) as fh:
                np.save(fh, np.ones((4, 4), np.float32))
        seen = {}

        def stand_in(settings, pipeline, data_file, out_dir, log_path, n_sets, what, progress=True):
            table = pd.read_csv(data_file, dtype=str)
            seen["table"] = table
            seen["scratch_files"] = sorted(p.name for p in Path(data_file).parent.rglob("*") if p.is_file())
            for col in [c for c in table.columns if c.startswith("PathName_")]:
                for folder, name in zip(table[col], table[col.replace("PathName_", "FileName_")]):
                    assert (Path(folder) / name).is_file()
            out_dir.mkdir()
            pd.DataFrame({"ImageNumber": [1, 2], "Count_Nuclei": [1, 1]}).to_csv(out_dir / "Image.csv", index=False)
            for t in cp.COMPARTMENTS:
                pd.DataFrame({"ImageNumber": [1, 2], "ObjectNumber": [1, 1]}).to_csv(out_dir / f"{t}.csv", index=False)
            log_path.write_text("Image # 1, module LoadData # 1: CPU_time = 0.1 secs, Wall_time = 0.1 secs\n")
            return cp.CellProfilerRun(0, 0.1, log_path, 2)

        monkeypatch.setattr(cp, "run_cellprofiler", stand_in)
        monkeypatch.setattr(cp, "cellprofiler_version", lambda python: "4.2.8.1")
        res = cp.run_analysis(BATCH, PLATE, 1, s, progress=False, validate=False)
        staged = [n for n in seen["scratch_files"] if n.endswith(".tiff")]
        assert sorted(staged) == ["s2-AGP.tiff", "s2-DNA.tiff", "s3-AGP.tiff", "s3-DNA.tiff"]
        assert f"{PLATE}_IllumDNA.npy" in seen["scratch_files"]
        assert not any(v.startswith("s3://") for c in seen["table"] if c.startswith("PathName_") for v in seen["table"][c])
        assert res.folder == layout.analysis_shard_dir(BATCH, PLATE, 1) and res.folder.startswith("s3://")
        for name in ("Image.csv", "Nuclei.csv", "Cells.csv", "Cytoplasm.csv", cp.LOG_NAME, storage.MARKER_NAME):
            assert storage.exists(storage.join(res.folder, name), s), name
        assert cp.run_analysis(BATCH, PLATE, 1, s, progress=False, validate=False).skipped
        # a changed image (new ETag) invalidates only the shard that reads it
        with storage.atomic_write(storage.join(images, "s3-DNA.tiff"), s) as fh:
            fh.write(b"other pixels")
        assert not cp.run_analysis(BATCH, PLATE, 1, s, progress=False, validate=False).skipped


# --------------------------------------------------------------------------- CellProfiler runs


def _kill_midway(args: list[str], env: dict[str, str], timeout: float = 240) -> dict:
    """Start ``cpjump1 …`` in a subprocess, SIGKILL it once CellProfiler has begun measuring."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "cpjump1", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    child = None
    log_path = None
    while time.time() < deadline and proc.poll() is None:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "cellprofiler" in " ".join(c.cmdline())]
        if kids:
            child = kids[0]
            cmd = child.cmdline()
            log_path = Path(cmd[cmd.index("-o") + 1]).parent / cp.LOG_NAME
            if log_path.exists() and "module IdentifyPrimaryObjects" in log_path.read_text(errors="replace"):
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()
    assert child is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs([child], timeout=30)
    # a SIGKILLed stage cannot remove its scratch folder (a pod's is discarded with the pod)
    shutil.rmtree(log_path.parent, ignore_errors=True)
    return {"child_killed": not alive, "returncode": proc.returncode}


@pytest.fixture(scope="module")
def analysed_plate(tmp_path_factory):
    """A synthetic plate (2 wells x 2 sites x 256 px, 8 channels, 4 shards of 1 site) taken
    through illum and analysis of shards 0 and 1, with the bad-input scenarios on the way
    (shards 2 and 3 are left alone to keep the run time down):

    1. illum (all 4 sites);
    2. one image of shard 1 corrupted: shard 0 finishes, shard 1 fails naming the file;
    3. image restored; shard 1 run as ``cpjump1 analysis`` and killed midway;
    4. both shards rerun: shard 0 is skipped (marker), shard 1 is redone.
    """
    if not CP_PYTHON.exists():
        pytest.skip(f"CellProfiler environment absent ({CP_PYTHON}); run `make cellprofiler-env`")
    from cpjump1.load_data import run_load_data
    from cpjump1.synthetic import run_synthesize

    env = _clean_env()
    root = tmp_path_factory.mktemp("cp-plate")
    s = _settings(root / "data")
    run_synthesize(BATCH, PLATE, s, wells=2, sites=2, size=256, seed=3, progress=False)
    run_load_data(BATCH, PLATE, s, shards=4)
    facts: dict = {"settings": s, "root": root}
    facts["illum"] = cp.run_illum(BATCH, PLATE, s, progress=False)
    facts["illum_again"] = cp.run_illum(BATCH, PLATE, s, progress=False)

    # 2. a corrupt image in shard 1
    layout = storage.Layout(s.storage_root)
    table = pd.read_csv(Path(layout.load_data_dir(BATCH, PLATE)) / "load_data_with_illum.csv", dtype=str)
    manifest = json.loads((Path(layout.load_data_dir(BATCH, PLATE)) / "shards.json").read_text())
    row = manifest["shards"][1]["rows"][0]
    victim = Path(table.loc[row, "PathName_OrigER"]) / table.loc[row, "FileName_OrigER"]
    backup = root / "backup.tiff"
    shutil.copy2(victim, backup)
    victim.write_bytes(b"II*\x00" + os.urandom(2000))
    facts["victim"] = victim
    facts["shard0_first"] = cp.run_analysis(BATCH, PLATE, 0, s, progress=False)
    with pytest.raises(InputDataError) as err:
        cp.run_analysis(BATCH, PLATE, 1, s, progress=False)
    facts["corrupt_error"] = str(err.value)
    facts["shard1_after_corrupt"] = sorted(p.name for p in Path(layout.analysis_shard_dir(BATCH, PLATE, 1)).iterdir())
    shutil.copy2(backup, victim)

    # 3. kill shard 1 midway
    facts["kill"] = _kill_midway(
        ["analysis", "--batch", BATCH, "--plate", PLATE, "--shard", "1", "--storage-root", s.storage_root],
        dict(env, CPJUMP1_CELLPROFILER_PYTHON=str(CP_PYTHON)),
    )
    facts["marker_after_kill"] = storage.read_marker(layout.analysis_shard_dir(BATCH, PLATE, 1), s)
    marker0 = storage.read_marker(layout.analysis_shard_dir(BATCH, PLATE, 0), s)

    # 4. rerun every shard (shard 0 through the CLI)
    from cpjump1.cli import main

    cwd = os.getcwd()
    os.chdir(root)
    try:
        facts["cli_rc"] = main(["analysis", "--batch", BATCH, "--plate", PLATE, "--shard", "0", "--storage-root", s.storage_root])
    finally:
        os.chdir(cwd)
    facts["shard0_marker_kept"] = storage.read_marker(layout.analysis_shard_dir(BATCH, PLATE, 0), s) == marker0
    facts["shard0_rerun"] = cp.run_analysis(BATCH, PLATE, 0, s, progress=False)
    facts["shard1"] = cp.run_analysis(BATCH, PLATE, 1, s, progress=False)
    facts["tables"] = {
        i: {t: pd.read_csv(Path(layout.analysis_shard_dir(BATCH, PLATE, i)) / f"{t}.csv") for t in cp.TABLES}
        for i in (0, 1)
    }
    return facts


@pytest.mark.cellprofiler
@needs_cp
def test_illum_functions_of_a_synthetic_plate(analysed_plate):
    from cpjump1.synthetic import CHANNELS as SYN_CHANNELS, _illumination

    res = analysed_plate["illum"]
    assert not res.skipped and res.channels == list(cp.CHANNELS)
    assert analysed_plate["illum_again"].skipped
    folder = Path(res.folder)
    assert sorted(p.name for p in folder.glob("*.npy")) == sorted(f"{PLATE}_Illum{c}.npy" for c in cp.CHANNELS)
    assert (folder / cp.LOG_NAME).exists() and (folder / storage.MARKER_NAME).exists()
    truth = {c.dye_channel: c for c in SYN_CHANNELS}
    for ch in cp.CHANNELS:
        fn = np.load(folder / f"{PLATE}_Illum{ch}.npy")
        assert fn.shape == (256, 256) and fn.dtype == np.float32
        assert np.isfinite(fn).all() and fn.min() >= 0.99
    # The cytoplasmic stains cover most of a site, so even 4 sites show the synthetic
    # vignetting field (measured r = 0.40-0.52); DNA and bright-field need more sites.
    for ch in ("ER", "RNA", "AGP", "Mito"):
        fn = np.load(folder / f"{PLATE}_Illum{ch}.npy")
        field = _illumination(256, truth[ch], PLATE)
        r = np.corrcoef(fn.ravel(), field.ravel())[0, 1]
        assert r > 0.3, f"{ch}: illumination function does not follow the synthetic field (r={r:.2f})"


@pytest.mark.cellprofiler
@needs_cp
def test_corrupt_image_fails_only_its_shard_naming_the_file(analysed_plate):
    assert str(analysed_plate["victim"]) in analysed_plate["corrupt_error"]
    assert "shard 1" in analysed_plate["corrupt_error"]
    assert not analysed_plate["shard0_first"].skipped
    # the failed shard keeps its log but has no marker and no tables
    assert analysed_plate["shard1_after_corrupt"] == [cp.LOG_NAME]


@pytest.mark.cellprofiler
@needs_cp
def test_killed_shard_is_redone_and_complete_shards_are_skipped(analysed_plate):
    assert analysed_plate["kill"]["returncode"] == -signal.SIGKILL
    assert analysed_plate["kill"]["child_killed"], "CellProfiler outlived the killed stage process"
    assert analysed_plate["marker_after_kill"] is None
    assert analysed_plate["cli_rc"] == 0
    assert analysed_plate["shard0_marker_kept"]
    assert analysed_plate["shard0_rerun"].skipped
    assert not analysed_plate["shard1"].skipped
    marker = storage.read_marker(analysed_plate["shard1"].folder, analysed_plate["settings"])
    assert marker["cellprofiler_version"] == "4.2.8.1" and marker["shard"] == 1


@pytest.mark.cellprofiler
@needs_cp
def test_synthetic_shards_tables_counts_and_features(analysed_plate):
    sites = []
    for i, tables in analysed_plate["tables"].items():
        image = tables["Image"]
        assert len(image) == 1
        sites += list(image["Metadata_Well"] + "-" + image["Metadata_Site"].astype(str))
        # synthetic sites of 256 px hold a handful to a few dozen cells
        assert image["Count_Nuclei"].between(3, 80).all(), image["Count_Nuclei"].tolist()
        assert (image["Count_Cells"] == image["Count_Nuclei"]).all()
        assert (image["Count_Cytoplasm"] == image["Count_Cells"]).all()
        assert not any(c.startswith("MD5Digest_") for c in image.columns)
        for comp in cp.COMPARTMENTS:
            df = tables[comp]
            assert len(df) == image[f"Count_{comp}"].sum()
            for col in ("ImageNumber", "ObjectNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site"):
                assert col in df.columns
            assert set(df["Metadata_Plate"]) == {PLATE}
            for fam in FAMILIES:
                assert any(c.startswith(f"{fam}_") for c in df.columns), f"{comp} lacks {fam}"
            assert any(c.startswith("Neighbors_") for c in df.columns) or comp == "Cytoplasm"
            assert any("Zernike" in c for c in df.columns if c.startswith("AreaShape_"))
            assert any("CorrBrightfield" in c for c in df.columns if c.startswith("Intensity_"))
            # texture and colocalization include the out-of-focus bright-field planes
            for plane in ("CorrLowZBF", "CorrHighZBF"):
                assert any(plane in c for c in df.columns if c.startswith("Texture_")), (comp, plane)
                assert any(plane in c for c in df.columns if c.startswith("Correlation_")), (comp, plane)
            assert any(
                c.startswith("Correlation_Correlation_") and "CorrLowZBF" in c and "CorrHighZBF" in c for c in df.columns
            )
        assert {"Location_Center_X", "Location_Center_Y"} <= set(tables["Nuclei"].columns)
        assert "Parent_Nuclei" in tables["Cells"].columns
        assert {"Parent_Cells", "Parent_Nuclei"} <= set(tables["Cytoplasm"].columns)
    assert len(set(sites)) == 2


@pytest.mark.cellprofiler
@needs_cp
def test_single_cell_suite_reports_are_written(analysed_plate):
    s = analysed_plate["settings"]
    qc = Path(storage.Layout(s.storage_root).qc_dir("analysis", BATCH, PLATE))
    names = sorted(p.name for p in qc.glob("single_cell-*.json"))
    for shard in (0, 1):
        for t in ("Image", "Nuclei", "Cells", "Cytoplasm", "features"):
            assert f"single_cell-{t}-shard-{shard:04d}.json" in names
    report = json.loads((qc / "single_cell-features-shard-0001.json").read_text())
    assert report["cpjump1"]["success"]


@pytest.mark.cellprofiler
@needs_cp
def test_single_cell_suite_catches_bad_tables(analysed_plate):
    from cpjump1.errors import ValidationFailed

    tables = {t: df.copy() for t, df in analysed_plate["tables"][0].items()}
    tables["Nuclei"].loc[0, "Metadata_Well"] = None
    feat = next(c for c in tables["Cells"].columns if c.startswith("Intensity_"))
    tables["Cells"][feat] = np.nan
    tables["Image"]["Count_Nuclei"] = 0
    with pytest.raises(ValidationFailed) as err:
        cp.validate_single_cells(tables, BATCH, PLATE, 99, analysed_plate["settings"])
    msg = str(err.value)
    assert "Metadata_Well" in msg and "nan_fraction" in msg and "Count_Nuclei" in msg


@pytest.fixture(scope="module")
def jump_site(tmp_path_factory):
    """The real JUMP site (BR00121482 A01 site 1, 6 channels, 1080 px) through illum + analysis."""
    if not CP_PYTHON.exists():
        pytest.skip(f"CellProfiler environment absent ({CP_PYTHON}); run `make cellprofiler-env`")
    if not JUMP_SITE.is_dir():
        pytest.skip(f"real JUMP site not found at {JUMP_SITE}")
    root = tmp_path_factory.mktemp("jump")
    s = _settings(root / "data")
    plate, batch = "BR00121482", "jump"
    layout = storage.Layout(s.storage_root)
    folder = Path(layout.load_data_dir(batch, plate))
    folder.mkdir(parents=True)
    # pe2loaddata's own output for this site, with the image folder made absolute
    with open(JUMP_SITE / "load_data_version1.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = pd.DataFrame(rows)
    for col in [c for c in table.columns if c.startswith("PathName_Orig")]:
        table[col] = str(JUMP_SITE / "images")
    table.to_csv(folder / "load_data.csv", index=False)
    for ch in cp.channels_of(table.columns):
        table[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
        table[f"PathName_Illum{ch}"] = layout.illum_dir(batch, plate)
    table.to_csv(folder / "load_data_with_illum.csv", index=False)
    illum = cp.run_illum(batch, plate, s, progress=False)
    result = cp.run_analysis(batch, plate, 0, s, progress=False)
    tables = {t: pd.read_csv(Path(result.folder) / f"{t}.csv") for t in cp.TABLES}
    return illum, result, tables


@pytest.mark.cellprofiler
@needs_cp
def test_real_jump_site_six_channels(jump_site):
    illum, result, tables = jump_site
    assert illum.channels == JUMP_CHANNELS and result.channels == JUMP_CHANNELS
    for ch in JUMP_CHANNELS:
        fn = np.load(Path(illum.folder) / f"BR00121482_Illum{ch}.npy")
        assert fn.shape == (1080, 1080) and np.isfinite(fn).all()
    image = tables["Image"]
    assert len(image) == 1
    n = int(image["Count_Nuclei"].iloc[0])
    # This field (pe2loaddata's test site, well A01) is nearly empty: its Hoechst image shows a
    # few bright bodies and no layer of nuclei (checked by eye; Otsu on the raw image gives 3
    # components above 80 px). Plausible is therefore a handful, not the hundreds of a full field.
    assert 1 <= n <= 20, n
    for comp in cp.COMPARTMENTS:
        df = tables[comp]
        assert len(df) == n
        for fam in FAMILIES:
            cols = [c for c in df.columns if c.startswith(f"{fam}_")]
            assert cols, f"{comp} lacks {fam}"
        assert not any("LowZBF" in c or "HighZBF" in c for c in df.columns)
        assert any(c.endswith("CorrBrightfield") or "CorrBrightfield_" in c for c in df.columns)
        assert df["Metadata_Site"].astype(str).eq("1").all() and df["Metadata_Well"].eq("A01").all()
    nuclei = tables["Nuclei"]
    # nucleus areas of a 20x site (0.6 um px): roughly 80-5000 px
    assert 80 < nuclei["AreaShape_Area"].median() < 5000
