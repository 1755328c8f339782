"""Tests of the benchmark stage: hand-computed metrics on small matrices, bad input, the real plates."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cpjump1 import metrics

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "cpjump1"
BATCH = "2020_11_04_CPJUMP1"


def orthogonal_zero_mean(n_vectors: int, n_features: int, seed: int = 0) -> np.ndarray:
    """Mutually orthogonal zero-mean vectors: any two have Pearson correlation exactly 0."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n_features, n_vectors))
    A -= A.mean(axis=0)
    Q, _ = np.linalg.qr(A)
    return Q.T  # rows orthonormal and (being combinations of zero-mean columns) zero-mean


# --------------------------------------------------------------------------- correlations


def test_pair_correlations_match_hand_values():
    X = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0], [1.0, 3.0, 2.0]])
    Z = metrics.standardize_rows(X)
    r = metrics.pair_correlations(Z, [0, 0, 0], [1, 2, 3])
    # a vs 2a: 1; a vs reversed a: -1; [1,2,3] vs [1,3,2]: (−1·−1 + 0·1 + 1·0)/2 = 0.5
    np.testing.assert_allclose(r, [1.0, -1.0, 0.5])
    # median of the three pairs among rows 0,1,2: {1, -1, -1} -> -1
    assert metrics.median_pairwise_correlation(Z, [0, 1, 2]) == pytest.approx(-1.0)
    assert math.isnan(metrics.median_pairwise_correlation(Z, [0]))
    # cross correlation rows {0} x {1, 2, 3}: {1, -1, 0.5} -> 0.5
    assert metrics.median_cross_correlation(Z, [0], Z, [1, 2, 3]) == pytest.approx(0.5)


def test_standardize_rows_rejects_nan_and_marks_constant_rows():
    with pytest.raises(metrics.MetricInputError, match="NaN"):
        metrics.standardize_rows(np.array([[1.0, np.nan, 2.0]]))
    Z = metrics.standardize_rows(np.array([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]]))
    assert np.isnan(Z[0]).all() and not np.isnan(Z[1]).any()


# --------------------------------------------------------------------------- Percent Replicating


def test_percent_replicating_hand_computed():
    u = orthogonal_zero_mean(4, 8)
    # P1: identical replicates (r = 1); P2: opposite replicates (r = -1); P3: scaled (r = 1);
    # P4: a single well. Every pair of wells from different perturbations has r = 0, so the
    # null (2 wells from 2 different perturbations) is all zeros and its 95th percentile is 0.
    X = np.vstack([u[0], u[0], u[1], -u[1], u[2], 2 * u[2], u[3]])
    labels = ["P1", "P1", "P2", "P2", "P3", "P3", "P4"]
    res = metrics.percent_replicating(metrics.standardize_rows(X), labels, null_size=200, seed=1)
    t = res.table.set_index("label")
    assert t.loc["P1", "median_replicate_correlation"] == pytest.approx(1.0)
    assert t.loc["P2", "median_replicate_correlation"] == pytest.approx(-1.0)
    assert t.loc["P3", "median_replicate_correlation"] == pytest.approx(1.0)
    assert math.isnan(t.loc["P4", "median_replicate_correlation"])
    assert res.null_95th == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(res.nulls[2], 0.0, atol=1e-12)
    assert res.n_perturbations == 3 and res.n_unreplicated == 1
    assert res.percent_replicating == pytest.approx(200 / 3)
    assert list(t["replicating"].astype(object)) == [True, False, True, pd.NA]


def test_percent_replicating_three_replicates_median_and_null_of_distinct_perturbations():
    u = orthogonal_zero_mean(5, 10)
    a, b = u[0], u[1]
    # P1 wells: a, a, a+b -> r(a,a)=1, r(a,a+b)=1/sqrt2 twice -> median 1/sqrt2
    X = np.vstack([a, a, a + b, u[2], u[2], u[2], u[3], u[4], -u[3]])
    labels = ["P1"] * 3 + ["P2"] * 3 + ["P3", "P4", "P5"]
    res = metrics.percent_replicating(metrics.standardize_rows(X), labels, null_size=300, seed=0)
    t = res.table.set_index("label")
    assert t.loc["P1", "median_replicate_correlation"] == pytest.approx(1 / math.sqrt(2))
    assert t.loc["P2", "median_replicate_correlation"] == pytest.approx(1.0)
    assert res.modal_replicates == 3 and len(res.nulls[3]) == 300
    # no null draw may contain two wells of one perturbation: with P2's three identical
    # wells such a draw would have a pair with r = 1; null medians here are all <= 1/sqrt2
    assert res.nulls[3].max() <= 1 / math.sqrt(2) + 1e-9


def test_replicate_null_needs_enough_distinct_perturbations():
    X = metrics.standardize_rows(np.random.default_rng(0).normal(size=(4, 5)))
    null = metrics.replicate_null(X, ["a", "a", "b", "b"], 3, 10, np.random.default_rng(0))
    assert null.size == 0


# --------------------------------------------------------------------------- Percent Matching


def test_percent_matching_hand_computed():
    v = orthogonal_zero_mean(3, 8)
    Xc = np.vstack([v[0], v[0], v[1], v[1]])  # c1 = v0, c2 = v1
    Xg = np.vstack([v[0], v[0], -v[1], v[2]])  # G1 = v0, G2 = -v1, G3 = v2
    res = metrics.percent_matching(
        metrics.standardize_rows(Xc),
        ["c1", "c1", "c2", "c2"],
        metrics.standardize_rows(Xg),
        ["G1", "G1", "G2", "G3"],
        {"c1": ["G1", "NOT_PROFILED"], "c2": ["G2"]},
        null_size=100,
        seed=0,
    )
    t = res.table.set_index(["compound", "gene"])
    assert t.loc[("c1", "G1"), "median_cross_correlation"] == pytest.approx(1.0)
    assert t.loc[("c2", "G2"), "median_cross_correlation"] == pytest.approx(-1.0)
    # every non-matching pair (c1-G2, c1-G3, c2-G1, c2-G3) has r = 0
    np.testing.assert_allclose(res.null, 0.0, atol=1e-12)
    assert res.n_pairs == 2 and res.n_compounds == 2
    assert res.percent_matching == pytest.approx(50.0)
    assert res.percent_anti_matching == pytest.approx(50.0)


# --------------------------------------------------------------------------- mAP


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_replicate_average_precision_hand_computed_and_same_plate_negatives():
    # plate p1: A (0 deg), negcons at 10 deg and 90 deg; plate p2: A (60 deg), negcons at -5 and 180 deg
    feats = np.array([_unit(0), _unit(10), _unit(90), _unit(60), _unit(-5), _unit(180)])
    meta = pd.DataFrame(
        {
            "label": ["A", "", "", "A", "", ""],
            "plate": ["p1", "p1", "p1", "p2", "p2", "p2"],
            "is_negcon": [False, True, True, False, True, True],
        }
    )
    ap = metrics.replicate_average_precision(meta, feats)
    ap = ap.set_index("plate")
    # A@p1 ranks: negcon 10deg (0.985) > A@p2 (0.5) > negcon 90deg (0) -> AP = 1/2.
    # (The p2 negcon at -5deg would rank first if other plates' controls leaked in: AP 1/3.)
    assert ap.loc["p1", "average_precision"] == pytest.approx(0.5)
    # A@p2 ranks: A@p1 (0.5) > negcon -5deg (0.42) > negcon 180deg (-0.5) -> AP = 1
    assert ap.loc["p2", "average_precision"] == pytest.approx(1.0)
    assert list(ap["n_total_pairs"]) == [3, 3] and list(ap["n_pos_pairs"]) == [1, 1]
    m = metrics.mean_average_precision(ap.reset_index(), "label", null_size=100, seed=0)
    assert m.loc[0, "mean_average_precision"] == pytest.approx(0.75)


def test_replicate_average_precision_chunking_changes_nothing():
    rng = np.random.default_rng(3)
    n_pert, plates = 12, ["p1", "p2", "p3"]
    rows, feats = [], []
    for p in plates:
        for k in range(n_pert):
            rows.append((f"P{k}", p, False))
            feats.append(rng.normal(size=16) + (k % 3))
        for _ in range(4):
            rows.append(("", p, True))
            feats.append(rng.normal(size=16))
    meta = pd.DataFrame(rows, columns=["label", "plate", "is_negcon"])
    whole = metrics.replicate_average_precision(meta, np.array(feats))
    chunked = metrics.replicate_average_precision(meta, np.array(feats), max_pairs=20)
    np.testing.assert_allclose(whole["average_precision"], chunked["average_precision"], rtol=1e-6)


def test_mean_average_precision_p_values_and_bh():
    ap = pd.DataFrame(
        {
            "label": ["A", "A", "B", "B"],
            "average_precision": [1.0, 1.0, 1 / 3, 1 / 3],
            "normalized_average_precision": [1.0, 1.0, 0.0, 0.0],
            "n_pos_pairs": [1, 1, 1, 1],
            "n_total_pairs": [3, 3, 3, 3],
        }
    )
    m = metrics.mean_average_precision(ap, "label", null_size=999, seed=0).set_index("label")
    # mAP 1 is never exceeded by the null: p = 1 / (999 + 1)
    assert m.loc["A", "p_value"] == pytest.approx(1 / 1000)
    # one positive among 3 ranked at random: AP is 1, 1/2 or 1/3 with probability 1/3 each;
    # B's rows share that configuration, so their null mAP is one such AP and
    # P(null > 1/3) = 2/3
    assert m.loc["B", "p_value"] == pytest.approx(2 / 3, abs=0.05)
    # BH over two tests: q_A = min(2 * p_A / 1, q_B) = 0.002
    assert m.loc["A", "corrected_p_value"] == pytest.approx(2 / 1000)
    assert bool(m.loc["A", "retrieved"]) and not bool(m.loc["B", "retrieved"])


def test_matching_average_precision_hand_computed():
    comp = pd.DataFrame([_unit(0)], index=["c1"], columns=["f1", "f2"])
    genes = pd.DataFrame([[0.8, 0.6], [0.9, math.sqrt(1 - 0.81)], [0.0, 1.0]], index=["G1", "G2", "G3"], columns=["f1", "f2"])
    ap = metrics.matching_average_precision(comp, genes, {"c1": ["G1"]})
    # c1 ranks G2 (0.9) > G1 (0.8) > G3 (0) with G1 the only positive -> AP = 1/2
    assert len(ap) == 1 and ap.loc[0, "gene"] == "G1"
    assert ap.loc[0, "average_precision"] == pytest.approx(0.5)
    assert ap.loc[0, "n_total_pairs"] == 3


# --------------------------------------------------------------------------- the stage on synthetic plates


@pytest.fixture(scope="module")
def catalog():
    from cpjump1.catalog import load_catalog

    return load_catalog(REPO / "metadata")


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory, catalog):
    """Compound U2OS 48 h (4 plates) + ORF U2OS 48 h (2) + ORF A549 96 h Blasticidin (1 plate)."""
    from cpjump1.benchmark import write_synthetic_profiles

    root = tmp_path_factory.mktemp("profiles")
    plates = ["BR00117010", "BR00117011", "BR00117012", "BR00117013", "BR00117022", "BR00117023", "BR00118049"]
    write_synthetic_profiles(root, BATCH, plates, catalog, n_features=40, seed=0, signal=1.5)
    return root


def _run(profiles, out, settings, **kw):
    from cpjump1.benchmark import run_benchmark

    return run_benchmark(profiles, str(out), settings, null_size=kw.pop("null_size", 200), **kw)


def test_synthetic_batch_all_metrics_and_single_plate(synthetic_root, settings, tmp_path):
    out = tmp_path / "bench"
    result = _run([str(synthetic_root)], out, settings)
    pr = pd.read_csv(out / "tables" / "percent_replicating.csv")
    assert list(pr.columns[:7]) == ["Modality", "Perturbation", "Cell_type", "Time", "n_perturbations", "null_95th", "percent_replicating"]
    by = pr.set_index("experiment")
    assert by.loc["compound_U2OS_48h", "percent_replicating"] > 40  # signal built in
    assert by.loc["compound_U2OS_48h", "n_plates"] == 4
    single = by.loc["orf_A549_96h_Blasticidin"]
    assert single["status"] == "single plate" and math.isnan(single["percent_replicating"])
    issues = pd.read_csv(out / "tables" / "issues.csv")
    assert "single-plate experiment" in set(issues["what"])
    rep = pd.read_csv(out / "tables" / "replicate_correlation.csv")
    assert list(rep.columns[:6]) == ["Modality", "Perturbation", "Cell_type", "Time", "Metadata_broad_sample", "median_replicate_correlation"]
    pm = pd.read_csv(out / "tables" / "percent_matching.csv")
    row = pm[(pm["compound_experiment"] == "compound_U2OS_48h") & (pm["genetic_experiment"] == "orf_U2OS_48h")].iloc[0]
    assert row["n_pairs"] > 0 and row["percent_matching"] > 10
    mp = pd.read_csv(out / "tables" / "map.csv")
    assert {"replicate_retrieval", "compound_gene_matching"} <= set(mp["metric"])
    assert mp["p_value"].between(0, 1).all()
    for fig in ("replicate_correlation.png", "percent_replicating.png", "map_pvalue.png", "percent_matching.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    report = (out / "report.md").read_text()
    for link in ("tables/percent_replicating.csv", "figures/map_pvalue.png", "tables/issues.csv", "single-plate experiment"):
        assert link in report
    assert not result.skipped
    # a rerun with the same inputs is skipped via the completion marker
    again = _run([str(synthetic_root)], out, settings)
    assert again.skipped and again.summary == json.loads((out / "_COMPLETE.json").read_text())["summary"]


def _copy_plates(src_root: Path, dst_root: Path, plates: list[str], edit=None) -> None:
    for p in plates:
        f = next((src_root / BATCH / p).glob("*.csv.gz"))
        df = pd.read_csv(f)
        if edit is not None:
            df = edit(p, df)
        target = dst_root / BATCH / p / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(target, index=False)


def test_bad_input_nan_features_differing_features_unreplicated(synthetic_root, settings, tmp_path):
    plates = ["BR00117010", "BR00117011", "BR00117012", "BR00117013"]
    lonely = "BRD-A86665761-001-01-1"

    def edit(plate, df):
        feats = [c for c in df.columns if not c.startswith("Metadata_")]
        if plate == "BR00117010":
            df.loc[5, feats] = np.nan  # a well with every feature NaN -> dropped
            df.loc[7, feats[0]] = np.nan  # one NaN -> that feature dropped
        if plate == "BR00117011":
            df = df.drop(columns=[feats[1]])  # feature sets differ
        if plate != "BR00117012":
            df = df[df["Metadata_broad_sample"] != lonely]  # one perturbation left with one well
        return df

    root = tmp_path / "bad"
    _copy_plates(synthetic_root, root, plates, edit)
    out = tmp_path / "bench"
    _run([str(root)], out, settings)
    issues = pd.read_csv(out / "tables" / "issues.csv")
    what = set(issues["what"])
    assert {"NaN features", "feature sets differ across plates", "perturbations without replicates"} <= what
    pr = pd.read_csv(out / "tables" / "percent_replicating.csv").iloc[0]
    assert pr["n_features"] == 38  # 40 minus the NaN feature and the one missing on BR00117011
    assert pr["n_unreplicated"] == 1
    assert pr["status"] == "ok" and 0 <= pr["percent_replicating"] <= 100
    rep = pd.read_csv(out / "tables" / "replicate_correlation.csv")
    row = rep[rep["Metadata_broad_sample"] == lonely].iloc[0]
    assert row["n_replicates"] == 1 and math.isnan(row["median_replicate_correlation"])
    assert lonely not in set(pd.read_csv(out / "tables" / "map.csv")["Metadata_broad_sample"])
    report = (out / "report.md").read_text()
    assert "NaN features" in report and "feature sets differ" in report


def test_explicit_files_and_cli_errors(synthetic_root, settings, tmp_path, capsys):
    from cpjump1.cli import main

    files = sorted(str(p) for p in (synthetic_root / BATCH).glob("BR0011701[01]/*.csv.gz"))
    out = tmp_path / "cli"
    rc = main(["benchmark", "--profiles", *files, "--out", str(out), "--null-size", "100", "--metadata-dir", str(REPO / "metadata")])
    assert rc == 0
    assert "Percent Replicating" in capsys.readouterr().out
    assert (out / "report.md").exists()
    # a profile file that cannot be read: clear error naming it, nothing written
    bad = tmp_path / "x" / BATCH / "BR00117010" / "BR00117010_normalized_feature_select_negcon_batch.csv.gz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not gzip")
    out2 = tmp_path / "cli2"
    rc = main(["benchmark", "--profiles", str(bad), "--out", str(out2), "--metadata-dir", str(REPO / "metadata")])
    assert rc == 2
    assert str(bad) in capsys.readouterr().err
    assert not out2.exists()
    # a folder with nothing of the modality
    rc = main(["benchmark", "--profiles", str(synthetic_root), "--modality", "deepprofiler", "--out", str(out2),
               "--metadata-dir", str(REPO / "metadata")])
    assert rc == 2 and "no DeepProfiler profiles" in capsys.readouterr().err


def test_profile_level_preference(tmp_path, catalog, settings):
    from cpjump1.benchmark import discover_profiles

    d = tmp_path / BATCH / "BR00117010"
    d.mkdir(parents=True)
    for name in ("BR00117010_normalized_feature_select_negcon_plate.csv.gz", "BR00117010_normalized.csv.gz",
                 "BR00117010_normalized_feature_select_negcon_batch.csv.gz", "BR00117010_spherized.csv.gz"):
        (d / name).write_text("x")
    d2 = tmp_path / BATCH / "BR00117011"
    d2.mkdir(parents=True)
    (d2 / "BR00117011_normalized_feature_select_negcon_plate.csv.gz").write_text("x")
    (d2 / "BR00117011_normalized_feature_select_negcon_plate.parquet").write_text("x")  # twin: preferred
    got = {s.plate: Path(s.url).name for s in discover_profiles([str(tmp_path)], "cellprofiler", settings, catalog)}
    assert got == {
        "BR00117010": "BR00117010_normalized_feature_select_negcon_batch.csv.gz",
        "BR00117011": "BR00117011_normalized_feature_select_negcon_plate.parquet",
    }
    deep = discover_profiles([str(tmp_path)], "deepprofiler", settings, catalog)
    assert [Path(s.url).name for s in deep] == ["BR00117010_spherized.csv.gz"]
    assert all(s.batch == BATCH for s in deep)


# --------------------------------------------------------------------------- the 7 real plates


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"real CPJUMP1 profiles not found at {SHARED}")
def test_real_plates(tmp_path):
    from cpjump1.cli import main

    out = tmp_path / "real"
    rc = main(["benchmark", "--profiles", str(SHARED / "profiles"), "--out", str(out), "--metadata-dir", str(REPO / "metadata")])
    assert rc == 0
    pr = pd.read_csv(out / "tables" / "percent_replicating.csv").set_index("experiment")
    assert set(pr.index) == {"compound_U2OS_24h", "compound_U2OS_48h"}
    assert pr.loc["compound_U2OS_48h", "n_plates"] == 4 and pr.loc["compound_U2OS_24h", "n_plates"] == 3
    assert (pr["n_perturbations"] == 306).all()  # 302 compounds + 4 positive-control compounds... per plate map
    assert pr["percent_replicating"].between(30, 100).all()  # replicate signal exists in real data
    rep = pd.read_csv(out / "tables" / "replicate_correlation.csv")
    assert len(rep) == 2 * 306 and rep["median_replicate_correlation"].between(-1, 1).all()
    summary = pd.read_csv(out / "tables" / "map_summary.csv")
    assert (summary["n_perturbations"] == 306).all() and summary["fraction_retrieved"].between(0.2, 1).all()
    pm = pd.read_csv(out / "tables" / "percent_matching.csv")
    assert pm.empty  # only compound plates are available: stated in the report, no number invented
    assert "Not computed" in (out / "report.md").read_text()
    assert pd.read_csv(out / "tables" / "issues.csv").empty


def test_parquet_profiles_and_annotation_from_plate_map(synthetic_root, settings, tmp_path):
    """Parquet twins are read; missing Metadata_broad_sample/control_type come from the plate map."""
    for p in ("BR00117010", "BR00117011"):
        df = pd.read_csv(next((synthetic_root / BATCH / p).glob("*.csv.gz")))
        df = df.drop(columns=["Metadata_broad_sample", "Metadata_control_type"])
        target = tmp_path / "pq" / BATCH / p / f"{p}_normalized_feature_select_negcon_batch.parquet"
        target.parent.mkdir(parents=True)
        df.to_parquet(target)
    out = tmp_path / "bench"
    _run([str(tmp_path / "pq")], out, settings, null_size=50)
    pr = pd.read_csv(out / "tables" / "percent_replicating.csv").iloc[0]
    assert pr["n_plates"] == 2 and pr["n_perturbations"] == 306 and pr["n_wells"] == 2 * (384 - 64)
