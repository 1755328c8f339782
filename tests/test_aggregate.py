"""cpjump1.aggregate: CellProfiler shard tables → single-cell Parquet → well medians."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cpjump1 import aggregate, storage
from cpjump1.errors import InputDataError

BATCH, PLATE = "2020_11_04_CPJUMP1", "BR00117010"
WELLS = ["A01", "A02", "B01", "P24"]


def make_shards(settings, shards=3, global_numbers=False, **kw):
    folder = storage.Layout(settings.storage_root).analysis_dir(BATCH, PLATE)
    names = aggregate.write_synthetic_shards(
        folder, PLATE, WELLS, sites=kw.pop("sites", 3), cells_per_site=kw.pop("cells", 5),
        n_features=kw.pop("n_features", 30), shards=shards, seed=3, global_image_numbers=global_numbers, settings=settings,
    )
    return Path(folder), names


def expected_single_cells(folder: Path) -> pd.DataFrame:
    """The single cells by a plain pandas join of the shard CSVs (reference for the DuckDB join;
    correctly rounded parsing, as DuckDB does)."""
    parts = []
    for shard in sorted(p for p in folder.iterdir() if (p / "_COMPLETE.json").exists()):
        t = {n: pd.read_csv(shard / f"{n}.csv", float_precision="round_trip") for n in ("Cells", "Cytoplasm", "Nuclei")}
        for n, df in t.items():
            keep = {"ImageNumber", "ObjectNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site"}
            t[n] = df.rename(columns={c: f"{n}_{c}" for c in df.columns if c not in keep})
        m = t["Cytoplasm"].merge(
            t["Cells"].drop(columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site"]),
            left_on=["ImageNumber", "Cytoplasm_Parent_Cells"], right_on=["ImageNumber", "ObjectNumber"], suffixes=("", "_c"),
        ).merge(
            t["Nuclei"].drop(columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site"]),
            left_on=["ImageNumber", "Cytoplasm_Parent_Nuclei"], right_on=["ImageNumber", "ObjectNumber"], suffixes=("", "_n"),
        )
        m["Metadata_Shard"] = shard.name
        parts.append(m)
    return pd.concat(parts, ignore_index=True)


def test_shards_join_into_single_cells_and_well_medians(settings):
    import pycytominer

    folder, names = make_shards(settings, shards=3, global_numbers=False)  # ImageNumber repeats across shards
    out = aggregate.run_aggregate(BATCH, PLATE, settings)
    cells = pd.read_parquet(out["single_cells"])
    assert len(cells) == len(WELLS) * 3 * 5
    assert list(cells.columns[:6]) == list(aggregate.SINGLE_CELL_METADATA)
    assert cells["Metadata_Well"].tolist() == sorted(cells["Metadata_Well"])
    # Same cells and values as a plain pandas join keyed on shard + ImageNumber + parents.
    ref = expected_single_cells(folder)
    feats = [c for c in cells.columns if aggregate.is_feature(c)]
    assert set(feats) == {c for c in ref.columns if aggregate.is_feature(c) and not c.endswith(("_c", "_n"))}
    key = ["Metadata_Shard", "Metadata_Well", "Metadata_Site", "Cytoplasm_Parent_Cells"]
    a = cells.sort_values(key).reset_index(drop=True)
    b = ref.sort_values(key).reset_index(drop=True)
    np.testing.assert_array_equal(a[feats].to_numpy(), b[feats].to_numpy())
    # Well medians equal pycytominer.aggregate(median) on the same single cells, written as %.5g.
    ref_med = pycytominer.aggregate(cells, operation="median").set_index("Metadata_Well")
    prof = pd.read_csv(out["profile"])
    assert list(prof.columns[:7]) == list(aggregate.WELL_METADATA)
    assert prof["Metadata_Well"].tolist() == sorted(WELLS)
    for f in feats:
        assert prof[f].tolist() == [float("%.5g" % v) for v in ref_med.loc[prof["Metadata_Well"], f]]
    assert (prof["Metadata_Count_Cells"] == 15).all() and (prof["Metadata_Object_Count"] == 15).all()
    assert (prof["Metadata_Site_Count"] == 3).all()
    pd.testing.assert_frame_equal(pd.read_parquet(out["profile_parquet"]), prof)


def test_rerun_skips_and_force_recomputes(settings):
    make_shards(settings, shards=2)
    out = aggregate.run_aggregate(BATCH, PLATE, settings)
    before = os.stat(out["profile"]).st_mtime_ns
    aggregate.run_aggregate(BATCH, PLATE, settings)
    assert os.stat(out["profile"]).st_mtime_ns == before
    aggregate.run_aggregate(BATCH, PLATE, settings, force=True)
    assert os.stat(out["profile"]).st_mtime_ns != before


def test_cli_and_incomplete_shard_ignored(settings):
    from cpjump1.cli import main

    folder, _ = make_shards(settings, shards=2)
    (folder / "shard-0001" / "_COMPLETE.json").unlink()  # still running: not aggregated
    assert main(["aggregate", "--batch", BATCH, "--plate", PLATE, "--storage-root", settings.storage_root]) == 0
    cells = pd.read_parquet(storage.Layout(settings.storage_root).single_cell_file(BATCH, PLATE))
    assert set(cells["Metadata_Shard"]) == {"shard-0000"}


def test_well_medians_stream_in_feature_chunks(tmp_path):
    import pycytominer

    path = tmp_path / "cells.parquet"
    aggregate.write_synthetic_single_cells(path, PLATE, WELLS, sites=2, cells_per_site=7, n_features=50, seed=1)
    cells = pd.read_parquet(path)
    ours = aggregate.well_medians(path, features_per_chunk=7, progress=False)
    ref = pycytominer.aggregate(cells, operation="median")
    feats = [c for c in ref.columns if aggregate.is_feature(c)]
    assert len(feats) == 50
    np.testing.assert_array_equal(ours[feats].to_numpy(), ref[feats].to_numpy())
    assert ours["Metadata_Object_Count"].tolist() == [14] * len(WELLS)


def test_format_csv_equals_pandas():
    df = aggregate.synthetic_well_profile(PLATE, n_features=40, seed=2)
    df.loc[3, "Cells_AreaShape_Area"] = np.inf
    assert aggregate.format_csv(df) == df.to_csv(index=False, float_format="%.5g", lineterminator="\n")


def _outputs_absent(settings):
    lay = storage.Layout(settings.storage_root)
    return not any(
        storage.exists(u) for u in (lay.single_cell_file(BATCH, PLATE), lay.profile_file(BATCH, PLATE), lay.profile_file(BATCH, PLATE, ext=".parquet"))
    )


def test_missing_table_is_named(settings):
    folder, _ = make_shards(settings, shards=2)
    (folder / "shard-0001" / "Nuclei.csv").unlink()
    with pytest.raises(InputDataError, match=r"BR00117010.*shard-0001.*Nuclei\.csv"):
        aggregate.run_aggregate(BATCH, PLATE, settings)
    assert _outputs_absent(settings)


def test_misspelled_column_is_named(settings):
    folder, _ = make_shards(settings, shards=2)
    path = folder / "shard-0000" / "Cytoplasm.csv"
    text = path.read_text().split("\n", 1)
    path.write_text(text[0].replace("Parent_Cells", "Parent_Cell") + "\n" + text[1])
    with pytest.raises(InputDataError, match=r"BR00117010.*Cytoplasm\.csv.*Parent_Cells.*'Parent_Cell'"):
        aggregate.run_aggregate(BATCH, PLATE, settings)
    assert _outputs_absent(settings)


def test_all_nan_feature_is_named(settings):
    folder, names = make_shards(settings, shards=2)
    col = names["Cells"][2]
    for shard in ("shard-0000", "shard-0001"):
        path = folder / shard / "Cells.csv"
        df = pd.read_csv(path)
        df[col] = np.nan
        df.to_csv(path, index=False, na_rep="nan")
    with pytest.raises(InputDataError, match=rf"BR00117010.*Cells_{col}.*all NaN.*Cells\.csv"):
        aggregate.run_aggregate(BATCH, PLATE, settings)
    assert _outputs_absent(settings)


def test_no_shard_is_an_error(settings):
    with pytest.raises(InputDataError, match=r"BR00117010.*no complete analysis shard"):
        aggregate.run_aggregate(BATCH, PLATE, settings)


def test_other_plate_in_image_table_is_named(settings):
    folder, _ = make_shards(settings, shards=1)
    path = folder / "shard-0000" / "Image.csv"
    path.write_text(path.read_text().replace(PLATE, "BR00000000"))
    with pytest.raises(InputDataError, match=r"Image\.csv holds images of plate\(s\) BR00000000"):
        aggregate.run_aggregate(BATCH, PLATE, settings)


def test_profile_csv_is_gzip_with_5_significant_digits(settings):
    make_shards(settings, shards=1)
    out = aggregate.run_aggregate(BATCH, PLATE, settings)
    text = gzip.decompress(Path(out["profile"]).read_bytes()).decode()
    df = pd.read_csv(io.StringIO(text), dtype=str)
    feats = [c for c in df.columns if aggregate.is_feature(c)]
    for v in df[feats].to_numpy().ravel():
        assert v == "%.5g" % float(v)


def test_validate_single_cell_stage_reads_the_shards(settings):
    """``cpjump1 validate --stage single_cell`` runs the analysis stage's suite on every shard
    table through :func:`cpjump1.aggregate.load_for_validation`."""
    from cpjump1.validation import validation_inputs

    make_shards(settings, shards=2)
    items = validation_inputs("single_cell", BATCH, PLATE, settings)
    tables = {(i.parameters["shard"], i.parameters["table"]) for i in items}
    assert ("shard-0000", "Image") in tables and ("shard-0001", "features") in tables
    feats = next(i.df for i in items if i.parameters["table"] == "features")
    assert len(feats) > 0 and (feats["nan_fraction"] == 0).all()


def _with_nans(path, out, seed=0):
    """A copy of a single-cell file with NaN sprinkled over features (one feature NaN in a whole
    well), written by plain pandas (snappy, nullable columns: not the stage's layout)."""
    cells = pd.read_parquet(path)
    feats = [c for c in cells.columns if aggregate.is_feature(c)]
    rng = np.random.default_rng(seed)
    x = cells[feats].to_numpy(copy=True)
    x[rng.random(x.shape) < 0.05] = np.nan
    x[(cells["Metadata_Well"] == WELLS[1]).to_numpy(), 3] = np.nan
    cells[feats] = x
    cells.to_parquet(out, index=False)
    return cells, feats


def test_well_medians_raw_layout_and_fallback_equal_pycytominer(tmp_path):
    """The stage's layout is read by the raw fast path; another writer's file (compressed,
    nullable columns, one row group) through pyarrow; both give pycytominer's medians, NaN
    skipped, odd and even cell counts."""
    import pyarrow.parquet as pq
    import pycytominer

    # 14 (even) and 15 (odd) cells per well; row groups of 30 rows (two wells each) and of 10
    # rows (every well split over two row groups)
    for cps, sites, group_rows in ((7, 2, 30), (5, 3, 10)):
        path = tmp_path / f"cells_{cps}.parquet"
        aggregate.write_synthetic_single_cells(
            path, PLATE, WELLS, sites=sites, cells_per_site=cps, n_features=40, seed=2, row_group_bytes=8 * 40 * group_rows
        )
        pf = pq.ParquetFile(path)
        segments = aggregate.well_segments(pf)
        if group_rows == 30:
            assert pf.num_row_groups == 2 and segments[WELLS[1]] == [(0, 14, 14)]
        else:
            assert segments[WELLS[0]] == [(0, 0, 10), (1, 0, 5)]
        feats = [c for c in pf.schema_arrow.names if aggregate.is_feature(c)]
        reader = aggregate._WellReader(path, pf, feats)
        assert reader.raw and all(reader._layout(g) is not None for g in range(pf.num_row_groups))
        reader.close()
        assert all(not pf.schema_arrow.field(c).nullable for c in feats)
        cells = pd.read_parquet(path)
        ref = pycytominer.aggregate(cells, operation="median")
        for threads in (1, 2):
            ours = aggregate.well_medians(path, features_per_chunk=6, progress=False, threads=threads)
            np.testing.assert_array_equal(ours[feats].to_numpy(), ref[feats].to_numpy())

        foreign = tmp_path / f"foreign_{cps}.parquet"
        cells, feats = _with_nans(path, foreign)
        reader = aggregate._WellReader(foreign, pq.ParquetFile(foreign), feats)
        assert not reader.raw
        reader.close()
        ref = pycytominer.aggregate(cells, operation="median")
        with pytest.raises(InputDataError, match="not one well"):
            aggregate.well_medians(foreign, progress=False)  # pandas wrote all wells in one row group
        one_well_groups = tmp_path / f"grouped_{cps}.parquet"
        import pyarrow as pa

        table = pa.Table.from_pandas(cells, preserve_index=False)
        with pq.ParquetWriter(one_well_groups, table.schema, compression="zstd") as w:
            for well in WELLS:
                w.write_table(table.filter(pa.compute.equal(table["Metadata_Well"], well)))
        ours = aggregate.well_medians(one_well_groups, progress=False)
        got, want = ours[feats].to_numpy(), ref[feats].to_numpy()
        np.testing.assert_array_equal(got, want)
        assert np.isnan(got[1, 3]) and not np.isnan(got[0, 3])


def test_stage_writes_required_nan_features_and_medians_in_the_same_pass(settings):
    """Missing CellProfiler values (empty / nan in the CSV, NULL in DuckDB) are NaN in the
    single-cell file, whose features are required float64 in the raw-readable layout; the
    medians taken while writing equal those of the written file read back."""
    import pyarrow.parquet as pq

    folder, names = make_shards(settings, shards=2)
    path = folder / "shard-0000" / "Nuclei.csv"
    df = pd.read_csv(path)
    df.loc[::3, names["Nuclei"][1]] = np.nan
    df.to_csv(path, index=False, na_rep="")
    out = aggregate.run_aggregate(BATCH, PLATE, settings)
    pf = pq.ParquetFile(out["single_cells"])
    feats = [c for c in pf.schema_arrow.names if aggregate.is_feature(c)]
    assert all(not pf.schema_arrow.field(c).nullable for c in feats)
    assert pf.metadata.row_group(0).column(len(aggregate.SINGLE_CELL_METADATA)).compression == "UNCOMPRESSED"
    cells = pd.read_parquet(out["single_cells"])
    assert cells[f"Nuclei_{names['Nuclei'][1]}"].isna().sum() > 0
    reader = aggregate._WellReader(out["single_cells"], pf, feats)
    assert reader.raw and reader._layout(0) is not None
    reader.close()
    again = aggregate.well_medians(out["single_cells"], progress=False)
    prof = pd.read_csv(out["profile"])
    for f in feats:
        assert prof[f].tolist() == [float("%.5g" % v) for v in again[f]]
