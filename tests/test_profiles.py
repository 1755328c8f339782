"""cpjump1.profiles: annotate, normalize, feature select (pycytominer), QC, validation."""

from __future__ import annotations

import gzip
import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cpjump1 import aggregate, profiles, storage
from cpjump1.errors import InputDataError, MetadataError, ValidationFailed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pycytominer_baseline  # noqa: E402  (benchmarks/pycytominer_baseline.py: the reference the benchmark times)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "cpjump1"
BATCH = "2020_11_04_CPJUMP1"
#: one compound, one CRISPR and one ORF plate of the main batch
PLATES = ["BR00117010", "BR00118041", "BR00117006"]
N_FEATURES = 120


def _settings(root: Path, **kw):
    from cpjump1.settings import get_settings

    return get_settings(storage_root=str(root), **kw)


def write_level1(settings, plates=PLATES, n_features=N_FEATURES, mutate=None):
    for i, p in enumerate(plates):
        df = aggregate.synthetic_well_profile(p, n_features=n_features, seed=i)
        if mutate is not None:
            df = mutate(df)
        aggregate.write_profile(df, storage.Layout(settings.storage_root).profile_file(BATCH, p), settings)


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    """Three plates through the per-plate step and the batch step (made once)."""
    root = tmp_path_factory.mktemp("profiles")
    s = _settings(root / "data")
    write_level1(s)
    profiles.run_profiles(BATCH, s, plates=PLATES, step="plate")
    profiles.run_profiles(BATCH, s, plates=PLATES, step="batch")
    return s


def _text(url: str) -> str:
    return gzip.decompress(Path(url).read_bytes()).decode()


def stepwise_reference(settings, out_dir: Path, plates=PLATES) -> dict[tuple[str, str], Path]:
    """pycytominer called step by step with CSV files in between: the very function the
    benchmark times (benchmarks/pycytominer_baseline.py)."""
    return pycytominer_baseline.stepwise_pycytominer(settings, list(plates), out_dir, batch=BATCH)


def test_outputs_have_seed_names_twins_and_qc(batch_run):
    s = batch_run
    folder = Path(storage.Layout(s.storage_root).profiles_dir(BATCH, "BR00117010"))
    names = {p.name for p in folder.iterdir()}
    for sfx in profiles.LEVELS.values():
        assert f"BR00117010{sfx}.csv.gz" in names and f"BR00117010{sfx}.parquet" in names
    assert {"BR00117010_qc_summary.json", "BR00117010_qc_wells.csv", "BR00117010_qc_heatmaps.png"} <= names
    import json

    summary = json.loads((folder / "BR00117010_qc_summary.json").read_text())
    assert summary["wells"] == 384 and summary["wells_per_control_type"]["negcon"] > 0
    assert sum(summary["wells_per_pert_type"].values()) == 384
    assert (folder / "BR00117010_qc_heatmaps.png").read_bytes()[:4] == b"\x89PNG"
    for sfx in profiles.LEVELS.values():
        df = pd.read_csv(folder / f"BR00117010{sfx}.csv.gz")
        pd.testing.assert_frame_equal(aggregate.read_profile(str(folder / f"BR00117010{sfx}.csv.gz"), s), df)
        assert len(df) == 384
    feats = profiles.features_of(pd.read_csv(folder / "BR00117010_normalized_feature_select_plate.csv.gz"))
    assert 0 < len(feats) < N_FEATURES
    assert "Nuclei_Granularity_14_AGP" not in feats  # blocklisted


def test_numbers_identical_to_stepwise_pycytominer_with_csv_in_between(batch_run, tmp_path):
    s = batch_run
    ref = stepwise_reference(s, tmp_path)
    assert len(ref) == len(PLATES) * (len(profiles.PLATE_LEVELS) + len(profiles.BATCH_LEVELS))
    for (p, lv), path in ref.items():
        ours = _text(profiles.level_url(s, BATCH, p, lv))
        assert ours == gzip.decompress(path.read_bytes()).decode(), (p, lv)
    same, differ = pycytominer_baseline.compare(s, ref, batch=BATCH)
    assert same == len(ref) and not differ


def test_batch_level_keeps_one_feature_set_and_metadata_union(batch_run):
    s = batch_run
    cols = [list(pd.read_csv(profiles.level_url(s, BATCH, p, "feature_select_negcon_batch")).columns) for p in PLATES]
    assert cols[0] == cols[1] == cols[2]
    meta = [c for c in cols[0] if c.startswith("Metadata_")]
    assert cols[0][: len(meta)] == meta  # metadata first, then features
    assert {"Metadata_InChIKey", "Metadata_target_sequence", "Metadata_gene", "Metadata_solvent"} <= set(meta)


def test_negcon_normalization_centres_controls(batch_run):
    s = batch_run
    df = pd.read_csv(profiles.level_url(s, BATCH, "BR00118041", "normalized_negcon"))
    ctrl = df[df["Metadata_control_type"] == "negcon"]
    values = ctrl[profiles.features_of(df)]
    usable = np.isfinite(values).all() & values.notna().any()  # zero-MAD features give inf/NaN
    assert usable.sum() > 0.8 * len(usable)
    assert values.loc[:, usable].median().abs().max() < 1e-3


def test_rerun_skips_and_validate_command(batch_run):
    import os

    from cpjump1.cli import main

    s = batch_run
    url = profiles.level_url(s, BATCH, "BR00117010", "normalized")
    before = os.stat(url).st_mtime_ns
    profiles.run_profiles(BATCH, s, plates=PLATES, step="all")
    assert os.stat(url).st_mtime_ns == before
    assert main(["validate", "--stage", "profiles", "--batch", BATCH, "--plate", "BR00117006", "--storage-root", s.storage_root]) == 0
    item = profiles.load_for_validation(BATCH, "BR00117006", s)
    assert set(item.df["_qc_level"]) == set(profiles.LEVELS)


def test_suite_fails_on_bad_profile(batch_run):
    s = batch_run
    df = pd.read_csv(profiles.level_url(s, BATCH, "BR00117010", "normalized_negcon"))
    bad = pd.concat([df, df.iloc[:1]], ignore_index=True)  # a well twice
    bad[profiles.features_of(bad)[0]] = np.nan
    with pytest.raises(ValidationFailed, match=r"_qc_key|_qc_excess_all_nan_features"):
        profiles.validate_profiles({("BR00117010", "normalized_negcon"): bad}, BATCH, s, expected_wells={"BR00117010": 384})


def test_cli_plate_then_batch_steps(tmp_path):
    from cpjump1.cli import main

    s = _settings(tmp_path / "data")
    write_level1(s, plates=PLATES[:2], n_features=40)
    args = ["--batch", BATCH, "--plates", ",".join(PLATES[:2]), "--storage-root", s.storage_root]
    assert main(["profiles", *args, "--step", "plate"]) == 0
    assert not storage.exists(profiles.level_url(s, BATCH, PLATES[0], "feature_select_batch"))
    assert main(["profiles", *args, "--step", "batch"]) == 0
    assert storage.exists(profiles.level_url(s, BATCH, PLATES[1], "feature_select_negcon_batch"))


# --------------------------------------------------------------------------- bad input


def _no_plate_outputs(s, plate):
    return not any(storage.exists(profiles.level_url(s, BATCH, plate, lv)) for lv in profiles.PLATE_LEVELS)


def test_platemap_well_absent_from_data(tmp_path):
    s = _settings(tmp_path / "data")
    write_level1(s, plates=["BR00117010"], n_features=30, mutate=lambda d: d[d.Metadata_Well != "C07"].reset_index(drop=True))
    with pytest.raises(InputDataError, match=r"BR00117010.*C07.*BR00117010\.csv\.gz|BR00117010.*absent from .*BR00117010\.csv\.gz: C07"):
        profiles.run_profiles(BATCH, s, plates=["BR00117010"], step="plate")
    assert _no_plate_outputs(s, "BR00117010")


def test_all_nan_feature(tmp_path):
    s = _settings(tmp_path / "data")

    def mutate(d):
        d["Cells_AreaShape_Area"] = np.nan
        return d

    write_level1(s, plates=["BR00117010"], n_features=30, mutate=mutate)
    with pytest.raises(InputDataError, match=r"BR00117010.*BR00117010\.csv\.gz.*Cells_AreaShape_Area.*NaN"):
        profiles.run_profiles(BATCH, s, plates=["BR00117010"], step="plate")
    assert _no_plate_outputs(s, "BR00117010")


def _metadata_copy(tmp_path) -> Path:
    dst = tmp_path / "metadata"
    shutil.copytree(REPO / "metadata", dst)
    return dst


def test_perturbation_missing_from_metadata(tmp_path):
    meta = _metadata_copy(tmp_path)
    table = meta / "external_metadata" / "JUMP-Target-1_compound_metadata.tsv"
    lines = table.read_text().splitlines(keepends=True)
    gone = lines[5].split("\t")[0]
    table.write_text("".join(lines[:5] + lines[6:]))
    s = _settings(tmp_path / "data", metadata_dir=str(meta))
    write_level1(s, plates=["BR00117010"], n_features=30)
    with pytest.raises(MetadataError, match=rf"BR00117010.*{gone}.*JUMP-Target-1_compound_metadata\.tsv"):
        profiles.run_profiles(BATCH, s, plates=["BR00117010"], step="plate")
    assert _no_plate_outputs(s, "BR00117010")


def test_no_negative_controls(tmp_path):
    meta = _metadata_copy(tmp_path)
    table = meta / "external_metadata" / "JUMP-Target-1_orf_metadata.tsv"
    table.write_text(table.read_text().replace("\tnegcon", "\ttrt"))
    s = _settings(tmp_path / "data", metadata_dir=str(meta))
    write_level1(s, plates=["BR00117006"], n_features=30)
    with pytest.raises(InputDataError, match=r"BR00117006.*no negative control.*BR00117006\.csv\.gz"):
        profiles.run_profiles(BATCH, s, plates=["BR00117006"], step="plate")
    assert _no_plate_outputs(s, "BR00117006")


def test_missing_level1_file_is_named(tmp_path):
    s = _settings(tmp_path / "data")
    with pytest.raises(InputDataError, match=r"BR00117010.*BR00117010\.csv\.gz not found"):
        profiles.run_profiles(BATCH, s, plates=["BR00117010"], step="plate")


# --------------------------------------------------------------------------- real profiles

real = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared CPJUMP1 data not found at {SHARED}")


def _real_frames():
    out = {}
    for f in sorted((SHARED / "profiles" / BATCH).glob("*/*_normalized_feature_select_negcon_batch.csv.gz")):
        out[f.parent.name] = f
    assert len(out) == 7
    return out


@real
def test_profiles_suite_passes_on_real_profiles(tmp_path):
    s = _settings(tmp_path / "data")
    frames = {(p, "feature_select_negcon_batch"): pd.read_csv(f) for p, f in _real_frames().items()}
    report = profiles.validate_profiles(frames, BATCH, s, expected_wells={p: 384 for p, _ in frames})
    assert report.success and report.evaluated >= 12 and not report.skipped


@real
def test_annotation_reproduces_real_metadata_for_every_well(tmp_path):
    """Annotating each real plate's wells from metadata/ gives the seed's Metadata_ columns,
    value for value as written (%.5g), in the seed's column order once the batch's CRISPR
    plates add their columns (batch-level files carry the union)."""
    s = _settings(tmp_path / "data")
    crispr_wells = aggregate.synthetic_well_profile("BR00118041", n_features=5)
    crispr_wells = crispr_wells[["Metadata_Plate", "Metadata_Well"] + profiles.features_of(crispr_wells)]
    crispr = profiles.annotate(crispr_wells, BATCH, "BR00118041", s)
    for plate, f in _real_frames().items():
        seed = pd.read_csv(f, dtype=str, keep_default_na=False)
        meta = [c for c in seed.columns if c.startswith("Metadata_")]
        level1 = pd.read_csv(f)
        level1 = level1[["Metadata_Plate", "Metadata_Well"] + profiles.features_of(level1)[:5]]  # metadata is the point
        ours = profiles.annotate(level1, BATCH, plate, s)
        union = pd.concat([ours, crispr.iloc[:0]], ignore_index=True)
        union_meta = [c for c in union.columns if c.startswith("Metadata_")]
        assert union_meta == meta
        text = aggregate.format_csv(union[meta + profiles.features_of(union)])
        got = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        got = got.set_index("Metadata_Well").loc[seed["Metadata_Well"]].reset_index()
        assert len(got) == 384
        for c in meta:
            assert got[c].tolist() == seed[c].tolist(), (plate, c)


@real
def test_repeated_feature_selection_on_real_profiles_is_consistent(tmp_path):
    """The seed's batch-level selection already applied these operations: repeating them on
    the 7 real plates keeps a subset with no blocklisted or NA-heavy feature, the same set for
    the whole batch, and a second pass keeps exactly the first pass's features."""
    s = _settings(tmp_path / "data")
    frames = [pd.read_csv(f) for f in _real_frames().values()]
    combined = pd.concat(frames, ignore_index=True)
    before = profiles.features_of(combined)
    blocklist = set(Path(s.metadata_dir, "blocklist_features.txt").read_text().split())
    assert not blocklist & set(before)
    once = profiles.feature_select(combined, s)
    kept = profiles.features_of(once)
    assert 0 < len(kept) <= len(before) and set(kept) <= set(before)
    # the operations that do not depend on the row set remove nothing the seed kept
    assert profiles.features_of(profiles.feature_select(combined, s, operations=["drop_na_columns", "blocklist"])) == before
    twice = profiles.features_of(profiles.feature_select(once, s))
    assert twice == kept


def test_allow_missing_wells_is_remembered_by_validate(tmp_path):
    """A plate profiled with --allow-missing-wells (a synthetic subset of the plate map) passes
    `cpjump1 validate --stage profiles`, which reads the choice from the plate's marker; the
    same data profiled without the option is refused."""
    from cpjump1.cli import main

    s = _settings(tmp_path / "data")
    keep = lambda d: d[d.Metadata_Well.str[0].isin(list("ABCDEFGH"))].reset_index(drop=True)  # noqa: E731
    write_level1(s, plates=["BR00117010"], n_features=30, mutate=keep)
    args = ["--batch", BATCH, "--storage-root", s.storage_root]
    assert main(["profiles", *args, "--plates", "BR00117010", "--step", "plate"]) == 2
    assert main(["profiles", *args, "--plates", "BR00117010", "--step", "plate", "--allow-missing-wells"]) == 0
    assert main(["validate", "--stage", "profiles", *args, "--plate", "BR00117010"]) == 0
    item = profiles.load_for_validation(BATCH, "BR00117010", s)
    assert set(item.df["Metadata_Well"].str[0]) <= set("ABCDEFGH")


# --------------------------------------------------------------------------- numpy operations = pycytominer's


def _tricky_frame(n=97, p=40, seed=3):
    """Features with ties, NaN, integers, negative zero, constants and near-copies."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    x[:, 1] = np.round(x[:, 1])  # few distinct values
    x[:, 2] = 1.0
    x[:5, 2] = 2.0  # nearly constant
    x[rng.random(n) < 0.2, 3] = np.nan
    x[:, 4] = x[:, 0] * 2 + rng.normal(0, 1e-3, n)  # near copy
    x[:, 5] = np.where(rng.random(n) < 0.5, 0.0, -0.0)
    x[:, 6] = np.nan
    x[:, 7] = rng.integers(0, 3, n)
    x[:, 8] = np.round(x[:, 8], 1)
    names = [f"Cells_F{j}" for j in range(p)]
    meta = pd.DataFrame({"Metadata_Well": [f"W{i}" for i in range(n)], "Metadata_control_type": np.where(np.arange(n) % 4 == 0, "negcon", "trt")})
    return pd.concat([meta, pd.DataFrame(x, columns=names)], axis=1), names


def test_mad_robustize_equals_pycytominer():
    import pycytominer

    df, names = _tricky_frame()
    df = df.drop(columns=["Cells_F6"])
    names.remove("Cells_F6")
    x = df[names].to_numpy()
    for samples, ref in (("all", np.ones(len(df), bool)), ("Metadata_control_type == 'negcon'", (df.Metadata_control_type == "negcon").to_numpy())):
        for eps in (0.0, 1e-18):
            theirs = pycytominer.normalize(df, method="mad_robustize", samples=samples, mad_robustize_epsilon=eps)[names].to_numpy()
            ours = profiles.mad_robustize(x, ref, eps)
            assert np.array_equal(ours, theirs, equal_nan=True), (samples, eps)


def test_frequency_and_na_exclusions_equal_pycytominer():
    from pycytominer.operations import frequency_threshold, get_na_columns

    df, names = _tricky_frame()
    x = df[names].to_numpy()
    for freq_cut, unique_cut in ((0.05, 0.1), (0.2, 0.01), (0.5, 0.5)):
        theirs = set(frequency_threshold(df, features=names, freq_cut=freq_cut, unique_cut=unique_cut))
        ours = {names[j] for j in np.flatnonzero(profiles.frequency_exclusions(x, freq_cut, unique_cut))}
        assert ours == theirs, (freq_cut, unique_cut)
    assert set(get_na_columns(df, features=names, cutoff=0.05)) == {n for n, f in zip(names, np.isnan(x).mean(axis=0)) if f > 0.05}


def test_feature_selection_block_equals_pycytominer(tmp_path):
    """select_features on a Block keeps exactly the columns pycytominer.feature_select keeps."""
    import pycytominer

    s = _settings(tmp_path / "data")
    cfg = profiles.load_config(s)
    fs = cfg["feature_select"]
    df, names = _tricky_frame(n=200, p=60)
    df = df.drop(columns=["Cells_F6"])  # all-NaN: pandas' correlation path, outside the fast one
    df["Nuclei_Granularity_14_AGP"] = np.random.default_rng(1).normal(size=len(df))  # blocklisted
    blocklist = [x for x in (Path(s.metadata_dir) / "blocklist_features.txt").read_text().split() if x != "blocklist"]
    theirs = pycytominer.feature_select(df, operation=fs["operations"], freq_cut=fs["freq_cut"], unique_cut=fs["unique_cut"],
                                        corr_threshold=fs["corr_threshold"], na_cutoff=fs["na_cutoff"], blocklist=blocklist)
    b = profiles.block_of(df)
    keep = profiles.select_features(b, s, cfg)
    assert [b.features[k] for k in keep] == [c for c in theirs.columns if c.startswith(("Cells", "Nuclei", "Cytoplasm"))]


def test_pandas_path_and_fast_path_write_the_same_profiles(tmp_path):
    """A plate whose layout the numpy path does not take (an extra non-Metadata column) goes
    through pandas/pycytominer; on the same wells both paths give the same levels."""
    s = _settings(tmp_path / "data")
    cfg = profiles.load_config(s)
    level1 = aggregate.synthetic_well_profile("BR00117010", n_features=60, seed=5)
    levels = list(profiles.PLATE_LEVELS)
    fast, allowed_fast = profiles._frames_fast(level1, BATCH, "BR00117010", s, cfg, levels, "<test>")
    slow, allowed_slow = profiles._frames_pandas(level1, BATCH, "BR00117010", s, cfg, levels, "<test>")
    assert allowed_fast == allowed_slow
    for lv in levels:
        assert profiles.csv_text(fast[lv], "%.5g") == aggregate.format_csv(slow[lv], "%.5g"), lv
        pd.testing.assert_frame_equal(fast[lv].frame(), slow[lv], check_dtype=True)
    odd = level1.assign(Extra="x")
    assert profiles._frames_fast(odd, BATCH, "BR00117010", s, cfg, levels, "<test>") is None


def test_one_bad_plate_does_not_stop_the_others(tmp_path):
    s = _settings(tmp_path / "data")
    write_level1(s, plates=PLATES[:2], n_features=30, mutate=None)
    bad = aggregate.synthetic_well_profile(PLATES[1], n_features=30, seed=1)
    bad = bad[bad.Metadata_Well != "B02"].reset_index(drop=True)
    aggregate.write_profile(bad, storage.Layout(s.storage_root).profile_file(BATCH, PLATES[1]), s)
    with pytest.raises(InputDataError, match=rf"{PLATES[1]}.*B02"):
        profiles.run_profiles(BATCH, s, plates=PLATES[:2], step="plate", jobs=2)
    assert all(storage.exists(profiles.level_url(s, BATCH, PLATES[0], lv)) for lv in profiles.PLATE_LEVELS)
    assert _no_plate_outputs(s, PLATES[1])
    leftovers = [f for f in Path(s.storage_root).rglob("*") if ".staged-" in f.name]
    assert not leftovers
