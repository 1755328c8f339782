"""Profiles stage: well medians → annotated, normalized and feature-selected profiles (pycytominer).

Method
------
The seed's profiling recipe (CPJUMP1 ``config_files/*.yml``, run with pycytominer), driven by
``pipelines/profiling.yml``:

1. **annotate** — ``pycytominer.annotate``: the plate map (``Catalog.plate_map``; an empty
   ``broad_sample`` is DMSO) joined on ``Metadata_well_position`` = ``Metadata_Well``, then the
   perturbation table of the plate's type (compound, CRISPR or ORF; ``Catalog``) joined on
   ``Metadata_broad_sample``. Tables are read the way pandas reads them from their files, so the
   values equal the seed's (e.g. ``Metadata_pubchem_cid`` is a float); the compound table's
   ``target`` column is called ``gene`` as in the seed's version of that table.
2. **normalize** — ``pycytominer.normalize(method="mad_robustize", mad_robustize_epsilon=0)``
   against all wells of the plate (``_normalized``) and against the negative controls
   ``Metadata_control_type == "negcon"`` (``_normalized_negcon``).
3. **feature_select** — ``pycytominer.feature_select`` with frequency threshold (the seed's
   "variance threshold": freq_cut 0.05, unique_cut 0.1), correlation threshold 0.9 (Pearson),
   NA columns over 5 % and pycytominer's blocklist, once per plate (``--step plate``) and once
   over all plates of the batch (``--step batch``).

Between steps every table goes through its ``%.5g`` CSV (see :func:`cpjump1.aggregate.write_profile`),
so the numbers are the ones a person gets by calling pycytominer step by step with the CSV files
in between. Every profile is checked with the Great Expectations suite ``expectations/profiles.json``
(:func:`validate_profiles`) before any file of the step is moved into place.

Reusable functions (the DeepProfiler stage uses them for deep profiles)
----------------------------------------------------------------------
``load_config(settings)``; ``annotate(profiles, batch, plate, settings, config=None,
source="<file>")``; ``normalize(profiles, samples="all", method="mad_robustize",
epsilon=0.0, features="infer")``; ``spherize(profiles, samples="all", method="ZCA-cor",
epsilon=1e-6, center=True, features="infer")``; ``feature_select(profiles, settings,
config=None, features="infer", operations=None)``; ``negcon_query(config)``;
``validate_profiles(frames, batch, settings, config=None, stage="profiles")`` with
``frames = {(plate, level): DataFrame}``; ``quality_control(annotated, batch, plate, out_dir, settings, config)``.
Features default to pycytominer's inference (``Cells_``/``Cytoplasm_``/``Nuclei_`` columns); pass
an explicit list for other feature names (e.g. DeepProfiler's ``efficientnet_*``).

Outputs (``profiles/<batch>/<plate>/``, each with a Parquet twin, all atomic)::

    <plate>_augmented.csv.gz  <plate>_normalized.csv.gz  <plate>_normalized_negcon.csv.gz
    <plate>_normalized_feature_select_plate.csv.gz  <plate>_normalized_feature_select_negcon_plate.csv.gz
    <plate>_normalized_feature_select_batch.csv.gz  <plate>_normalized_feature_select_negcon_batch.csv.gz
    <plate>_qc_summary.json  <plate>_qc_wells.csv  <plate>_qc_heatmaps.png
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import io
import json
import logging
import operator
import os
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import storage
from cpjump1.aggregate import format_csv, is_feature, read_profile
from cpjump1.errors import Cpjump1Error, InputDataError, MetadataError

log = logging.getLogger(__name__)

VERSION = "profiles-1"

#: level name → file suffix after the plate barcode (the seed's names).
LEVELS: dict[str, str] = {
    "aggregated": "",
    "augmented": "_augmented",
    "normalized": "_normalized",
    "normalized_negcon": "_normalized_negcon",
    "feature_select_plate": "_normalized_feature_select_plate",
    "feature_select_negcon_plate": "_normalized_feature_select_negcon_plate",
    "feature_select_batch": "_normalized_feature_select_batch",
    "feature_select_negcon_batch": "_normalized_feature_select_negcon_batch",
}
PLATE_LEVELS = ("augmented", "normalized", "normalized_negcon", "feature_select_plate", "feature_select_negcon_plate")
BATCH_LEVELS = ("feature_select_batch", "feature_select_negcon_batch")
#: levels whose rows are normalized against a reference set of wells (whose medians are then ~0)
REFERENCE = {
    "normalized": "all",
    "feature_select_plate": "all",
    "feature_select_batch": "all",
    "normalized_negcon": "negcon",
    "feature_select_negcon_plate": "negcon",
    "feature_select_negcon_batch": "negcon",
}
ANNOTATED_METADATA = ("Metadata_broad_sample", "Metadata_pert_type", "Metadata_control_type")
PLATE_MARKER = "_COMPLETE_profiles_plate.json"
BATCH_MARKER = "_COMPLETE_profiles_batch.json"


# --------------------------------------------------------------------------- config


def load_config(settings: Any = None, path: str | Path | None = None) -> dict[str, Any]:
    """``pipelines/profiling.yml`` (or ``path``) as a dict; raises MetadataError naming the file."""
    import yaml

    if path is None:
        path = Path(settings.pipelines_dir) / "profiling.yml"
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MetadataError(f"{path}: profiling config not found") from None
    except yaml.YAMLError as exc:
        raise MetadataError(f"{path}: not valid YAML: {exc}") from None
    for key in ("annotate", "normalize", "normalize_negcon", "feature_select", "options", "batches"):
        if key not in (cfg or {}):
            raise MetadataError(f"{path}: missing section {key!r}")
    cfg["_path"] = str(path)
    return cfg


def batch_steps(config: dict[str, Any], batch: str) -> list[str]:
    spec = config["batches"].get(batch) or config["batches"]["default"]
    return list(spec["steps"])


def negcon_query(config: dict[str, Any]) -> str:
    a = config["annotate"]
    return f"{a.get('negcon_column', 'Metadata_control_type')} == '{a.get('negcon_value', 'negcon')}'"


def negcon_mask(df: pd.DataFrame, config: dict[str, Any], query: str | None = None) -> np.ndarray:
    """Boolean mask of the rows matching ``query`` (default: the negative controls), evaluated
    on the metadata columns only (pandas' eval over thousands of feature columns is slow)."""
    meta = df[[c for c in df.columns if not is_feature(c)]]
    return meta.eval(query or negcon_query(config)).to_numpy(bool)


def _catalog(settings: Any):
    from cpjump1.catalog import load_catalog

    return load_catalog(settings.metadata_dir)


def level_url(settings: Any, batch: str, plate: str, level: str, ext: str = ".csv.gz") -> str:
    return storage.Layout(settings.storage_root).profile_file(batch, plate, LEVELS[level], ext)


# --------------------------------------------------------------------------- operations


@functools.cache
def _read_tsv(path: str) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t")


def perturbation_table(settings: Any, kind: str, config: dict[str, Any]) -> pd.DataFrame:
    """The perturbation table of ``kind`` as pandas reads its file (seed semantics), renamed per config."""
    from cpjump1.catalog import PERTURBATION_TABLES

    cat = _catalog(settings)
    cat.perturbation_metadata(kind)  # checks the file's shape, names unknown kinds
    path = cat.root / "external_metadata" / PERTURBATION_TABLES[kind]
    table = _read_tsv(str(path)).copy()
    rename = (config["annotate"]["external"].get("rename") or {}).get(kind) or {}
    return table.rename(columns=rename)


def platemap_table(settings: Any, batch: str, plate_map: str) -> pd.DataFrame:
    cat = _catalog(settings)
    cat.plate_map(batch, plate_map)  # checks wells
    return _read_tsv(str(cat.plate_map_path(batch, plate_map))).copy()


def features_of(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if is_feature(c)]


def annotate(
    profiles: pd.DataFrame,
    batch: str,
    plate: str,
    settings: Any,
    config: dict[str, Any] | None = None,
    source: str = "<profiles>",
) -> pd.DataFrame:
    """pycytominer.annotate with the plate map and perturbation table of ``batch``/``plate``.

    Raises :class:`InputDataError` naming the plate and files when a plate-map well is absent
    from the profiles (unless ``annotate.require_all_wells`` is false), a profile well is not in
    the plate map, or the plate has no negative control; :class:`MetadataError` when a
    perturbation of the plate map is missing from the perturbation table.
    """
    import pycytominer

    config = config or load_config(settings)
    cat = _catalog(settings)
    p = cat.plate(batch, plate)
    _annotate_checks(profiles, batch, plate, settings, config, source)
    platemap = platemap_table(settings, batch, p.plate_map)
    pm_path = cat.plate_map_path(batch, p.plate_map)
    well_col = config["annotate"]["well_column"]
    merge = "Metadata_" + config["annotate"]["external"]["merge_column"]
    out = pycytominer.annotate(
        profiles=profiles,
        platemap=platemap,
        join_on=[config["annotate"]["platemap_well_column"], well_col],
        external_metadata=perturbation_table(settings, p.perturbation, config),
        external_join_on=[merge],
    )
    q = negcon_query(config)
    col = config["annotate"].get("negcon_column", "Metadata_control_type")
    if col not in out.columns or not negcon_mask(out, config).any():
        raise InputDataError(
            f"plate {batch}/{plate}: no negative control ({q}) among the wells of {source} "
            f"annotated with {pm_path}; cannot normalize to negative controls"
        )
    return out


def _annotate_checks(profiles: pd.DataFrame, batch: str, plate: str, settings: Any, config: dict[str, Any], source: str) -> None:
    """The input checks of :func:`annotate` (wells against the plate map, perturbations against their table)."""
    from cpjump1.catalog import PERTURBATION_TABLES

    cat = _catalog(settings)
    p = cat.plate(batch, plate)
    pm_path = cat.plate_map_path(batch, p.plate_map)
    missing = cat.missing_perturbations(batch, plate)
    if missing:
        raise MetadataError(
            f"plate {batch}/{plate}: perturbation(s) {', '.join(missing[:10])} of plate map {pm_path} "
            f"missing from {cat.root / 'external_metadata' / PERTURBATION_TABLES[p.perturbation]}"
        )
    platemap = platemap_table(settings, batch, p.plate_map)
    well_col = config["annotate"]["well_column"]
    if well_col not in profiles.columns:
        raise InputDataError(f"plate {batch}/{plate}: {source}: no column {well_col}")
    have = set(profiles[well_col].astype(str))
    want = set(platemap["well_position"].astype(str))
    absent = sorted(want - have)
    if absent and config["annotate"].get("require_all_wells", True):
        raise InputDataError(
            f"plate {batch}/{plate}: {len(absent)} well(s) of plate map {pm_path} absent from {source}: "
            f"{', '.join(absent[:10])}"
        )
    extra = sorted(have - want)
    if extra:
        raise InputDataError(f"plate {batch}/{plate}: well(s) {', '.join(extra[:10])} of {source} are not in plate map {pm_path}")
    dup = profiles[well_col][profiles[well_col].duplicated()].tolist()
    if dup:
        raise InputDataError(f"plate {batch}/{plate}: {source} has several rows for well(s) {', '.join(map(str, dup[:10]))}")


def normalize(
    profiles: pd.DataFrame,
    samples: str = "all",
    method: str = "mad_robustize",
    epsilon: float = 0.0,
    features: str | list[str] = "infer",
) -> pd.DataFrame:
    """pycytominer.normalize (default: mad_robustize, ``(x - median) / MAD`` of the ``samples``
    rows, MAD scaled as in pycytominer; epsilon 0 as the seed's fudge factor)."""
    import pycytominer

    return pycytominer.normalize(
        profiles=profiles, features=features, samples=samples, method=method, mad_robustize_epsilon=epsilon
    )


def spherize(
    profiles: pd.DataFrame,
    samples: str = "all",
    method: str = "ZCA-cor",
    epsilon: float = 1e-6,
    center: bool = True,
    features: str | list[str] = "infer",
) -> pd.DataFrame:
    """pycytominer.normalize(method="spherize"): ZCA-cor whitening fitted on ``samples``
    (Kessy, Lewin & Strimmer 2018), as the seed applies to DeepProfiler profiles."""
    import pycytominer

    return pycytominer.normalize(
        profiles=profiles,
        features=features,
        samples=samples,
        method="spherize",
        spherize_method=method,
        spherize_epsilon=epsilon,
        spherize_center=center,
    )


def pairwise_complete_correlation(x: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of ``x`` over pairwise-complete rows.

    What ``pandas.DataFrame.corr()`` computes (pycytominer's path when a profile has NaN), but
    with matrix products: columns without NaN through one centred product, columns with NaN
    through joint-row moments against every column. NaN where a pair has no variance.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    valid = ~np.isnan(x)
    full = valid.all(axis=0)
    c = np.full((p, p), np.nan)
    with np.errstate(all="ignore"):
        f = np.flatnonzero(full)
        if f.size:
            z = x[:, f] - x[:, f].mean(axis=0)
            ss = np.einsum("ij,ij->j", z, z)
            c_ff = (z.T @ z) / np.sqrt(np.outer(ss, ss))
            c_ff[:, ss == 0] = np.nan
            c_ff[ss == 0, :] = np.nan
            c[np.ix_(f, f)] = c_ff
            del z
        g = np.flatnonzero(~full)
        if g.size:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                centre = np.nanmean(x, axis=0)
            x0 = np.where(valid, x - centre, 0.0)
            m = valid.astype(np.float64)
            x0g, mg = x0[:, g], m[:, g]
            cnt = mg.T @ m
            s_g = x0g.T @ m
            s_j = mg.T @ x0
            ss_g = (x0g * x0g).T @ m
            ss_j = mg.T @ (x0 * x0)
            cov = x0g.T @ x0 - s_g * s_j / cnt
            var_g = ss_g - s_g * s_g / cnt
            var_j = ss_j - s_j * s_j / cnt
            tiny = 1e-12
            r = cov / np.sqrt(var_g * var_j)
            r[(cnt < 1) | (var_g <= tiny * np.maximum(ss_g, tiny)) | (var_j <= tiny * np.maximum(ss_j, tiny))] = np.nan
            c[g, :] = r
            c[:, g] = r.T
    return c


def correlation_threshold(
    population_df: pd.DataFrame,
    features: list[str],
    samples: str = "all",
    threshold: float = 0.9,
    method: str = "pearson",
) -> list[str]:
    """pycytominer's correlation_threshold with a faster correlation matrix.

    Same rule as ``pycytominer.operations.correlation_threshold``: among the pairs of the lower
    triangle whose correlation exceeds ``threshold``, drop the feature that comes later when
    features are ordered by their summed absolute correlation (pandas ``sort_values``). The
    matrix is ``np.corrcoef`` when there is no NaN (pycytominer's own choice) and
    :func:`pairwise_complete_correlation` otherwise (pycytominer would call
    ``DataFrame.corr()``, O(rows × features²) in pure loops). Other methods and profiles with
    infinite values go to pycytominer unchanged.
    """
    from pycytominer.operations import correlation_threshold as pcm_correlation_threshold

    if samples != "all":
        population_df = population_df.loc[negcon_mask(population_df, {}, samples)]
    x = population_df.loc[:, features].to_numpy(dtype=np.float64)
    if method != "pearson" or np.isinf(x).any():
        return pcm_correlation_threshold(population_df=population_df, features=features, threshold=threshold, method=method)
    return _correlation_exclusions(x, list(features), threshold)


@functools.cache
def _blocklist(path: str) -> tuple[str, ...]:
    lines = [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]
    return tuple(x for x in lines if x != "blocklist")


def feature_select(
    profiles: pd.DataFrame,
    settings: Any,
    config: dict[str, Any] | None = None,
    features: str | list[str] = "infer",
    operations: list[str] | None = None,
    samples: str = "all",
) -> pd.DataFrame:
    """Feature selection as ``pycytominer.feature_select`` with the config's operations and
    cut-offs (module docstring): the operations run in order, each on the features the previous
    ones kept, using pycytominer's operation functions; only the correlation matrix of
    ``correlation_threshold`` is computed by :func:`correlation_threshold` (same rule)."""
    import pycytominer
    from pycytominer.cyto_utils import get_blocklist_features, infer_cp_features
    from pycytominer.operations import frequency_threshold, get_na_columns

    config = config or load_config(settings)
    fs = config["feature_select"]
    ops = list(operations or fs["operations"])
    blocklist = None
    if "blocklist" in ops:
        path = Path(settings.metadata_dir) / fs.get("blocklist", "blocklist_features.txt")
        if not path.exists():
            raise MetadataError(f"{path}: blocklist file not found (feature_select.blocklist in {config.get('_path')})")
        blocklist = list(_blocklist(str(path)))
    supported = {"frequency_threshold", "correlation_threshold", "drop_na_columns", "blocklist"}
    if not set(ops) <= supported:
        return pycytominer.feature_select(
            profiles=profiles, features=features, samples=samples, operation=ops, freq_cut=fs["freq_cut"],
            unique_cut=fs["unique_cut"], corr_threshold=fs["corr_threshold"], corr_method=fs.get("corr_method", "pearson"),
            na_cutoff=fs["na_cutoff"], blocklist=blocklist,
        )
    feats = infer_cp_features(profiles, image_features=fs.get("image_features", False)) if features == "infer" else list(features)
    excluded: list[str] = []
    for op in ops:
        if op == "frequency_threshold":
            exclude = frequency_threshold(population_df=profiles, features=feats, samples=samples, freq_cut=fs["freq_cut"], unique_cut=fs["unique_cut"])
        elif op == "correlation_threshold":
            exclude = correlation_threshold(profiles, feats, samples, fs["corr_threshold"], fs.get("corr_method", "pearson"))
        elif op == "drop_na_columns":
            exclude = get_na_columns(population_df=profiles, features=feats, samples=samples, cutoff=fs["na_cutoff"])
        else:
            exclude = get_blocklist_features(population_df=profiles, blocklist=blocklist)
        excluded += list(exclude)
        gone = set(excluded)
        feats = [f for f in feats if f not in gone]
    return profiles.drop(columns=list(set(excluded)))


def check_input(df: pd.DataFrame, batch: str, plate: str, source: str) -> None:
    """Bad well-level input: no features, or a feature with no value in any well."""
    feats = features_of(df)
    if not feats:
        raise InputDataError(f"plate {batch}/{plate}: {source} has no Cells_/Cytoplasm_/Nuclei_ feature column")
    empty = df[feats].columns[df[feats].isna().all().to_numpy()].tolist()
    if empty:
        raise InputDataError(f"plate {batch}/{plate}: {source}: feature(s) {', '.join(empty[:10])} are NaN in every well")
    kinds = df[feats].dtypes.map(lambda d: d.kind)
    bad = kinds.index[~kinds.isin(list("fiu"))].tolist()
    if bad:
        raise InputDataError(f"plate {batch}/{plate}: {source}: feature(s) {', '.join(bad[:10])} are not numeric")


# --------------------------------------------------------------------------- validation


def qc_frame(
    df: pd.DataFrame, level: str, plate: str, expected_wells: int, allowed_all_nan: int, config: dict[str, Any],
    features: list[str] | None = None,
    values: np.ndarray | None = None,
) -> pd.DataFrame:
    """The table the ``profiles`` suite checks for one profile: its well and plate plus
    ``_qc_*`` columns (feature count, all-NaN features beyond those a zero MAD explains, missing
    required metadata, per-level row counts, |median| of the reference wells)."""
    feats = list(features) if features is not None else features_of(df)
    n = len(df)
    out = pd.DataFrame(
        {
            "Metadata_Plate": df["Metadata_Plate"].astype(str).to_numpy() if "Metadata_Plate" in df else [None] * n,
            "Metadata_Well": df["Metadata_Well"].astype(str).to_numpy() if "Metadata_Well" in df else [None] * n,
        }
    )
    out["_qc_level"] = level
    out["_qc_expected_plate"] = plate
    out["_qc_key"] = level + "/" + out["Metadata_Plate"].astype(str) + "/" + out["Metadata_Well"].astype(str)
    out["_qc_features"] = len(feats)
    if values is None:
        values = df[feats].to_numpy(dtype=np.float64) if feats else np.zeros((n, 0))
    all_nan = int(np.isnan(values).all(axis=0).sum()) if n else len(feats)
    out["_qc_excess_all_nan_features"] = max(0, all_nan - allowed_all_nan)
    required = ["Metadata_Plate", "Metadata_Well"] + (list(ANNOTATED_METADATA) if level != "aggregated" else [])
    out["_qc_missing_metadata"] = sum(c not in df.columns for c in required)
    if level != "aggregated" and "Metadata_pert_type" in df and "Metadata_broad_sample" in df:
        # a perturbation without annotation (empty wells of CRISPR/ORF plates have none to annotate)
        out["_qc_unannotated"] = (df["Metadata_broad_sample"].notna() & df["Metadata_pert_type"].isna()).to_numpy().astype(int)
    else:
        out["_qc_unannotated"] = 0
    out["_qc_rows"] = n
    out["_qc_expected_rows"] = expected_wells
    ref = REFERENCE.get(level)
    out["_qc_reference_abs_median"] = np.nan
    if ref is not None and feats and n:
        rows = np.ones(n, bool) if ref == "all" else negcon_mask(df, config)
        sub = values[rows]
        finite = np.isfinite(sub) | np.isnan(sub)
        usable = finite.all(axis=0) & ~np.isnan(sub).all(axis=0)
        if usable.any():
            with np.errstate(all="ignore"):
                med = np.nanmedian(sub[:, usable], axis=0)
            out["_qc_reference_abs_median"] = float(np.nanmax(np.abs(med)))
    return out


def validate_profiles(
    frames: dict[tuple[str, str], pd.DataFrame],
    batch: str,
    settings: Any,
    config: dict[str, Any] | None = None,
    allowed_all_nan: dict[tuple[str, str], int] | None = None,
    expected_wells: dict[str, int] | None = None,
    stage: str = "profiles",
    report_plate: str | None = None,
    raise_on_failure: bool = True,
    features: list[str] | None = None,
):
    """Run the ``profiles`` suite once over the QC tables of several profiles.

    ``frames`` maps (plate, level) → profile; ``features`` names the feature columns when they
    are not CellProfiler's (default: ``Cells_``/``Cytoplasm_``/``Nuclei_`` columns). Raises :class:`ValidationFailed` listing each
    failed expectation with example rows (level/plate/well) unless ``raise_on_failure`` is false.
    """
    from cpjump1.validation import run_suite

    config = config or load_config(settings)
    allowed_all_nan = allowed_all_nan or {}
    parts = []
    for (plate, level), df in frames.items():
        exp = (expected_wells or {}).get(plate, len(df))
        feats = [f for f in features if f in df.columns] if features is not None else None
        parts.append(qc_frame(df, level, plate, exp, allowed_all_nan.get((plate, level), 0), config, feats))
    table = pd.concat(parts, ignore_index=True)
    plates = sorted({p for p, _ in frames})
    vcfg = config.get("validation", {})
    return run_suite(
        table,
        vcfg.get("suite", "profiles"),
        batch=batch,
        plate=report_plate or (plates[0] if len(plates) == 1 else "_batch"),
        stage=stage,
        settings=settings,
        extra_context={
            "reference_median_tolerance": vcfg.get("reference_median_tolerance", 1e-3),
            "levels": sorted({lv for _, lv in frames}),
            "plates": plates,
        },
        row_id_columns=["_qc_level", "Metadata_Plate", "Metadata_Well"],
        raise_on_failure=raise_on_failure,
    )


def _zero_mad_features(reference: pd.DataFrame, feats: list[str]) -> int:
    """Features constant over the reference wells (MAD 0): mad_robustize makes them all-NaN."""
    if not feats or reference.empty:
        return 0
    v = reference[feats].to_numpy(dtype=np.float64)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return int((np.nanmax(v, axis=0) == np.nanmin(v, axis=0)).sum())


def expected_wells(settings: Any, batch: str, plate: str, config: dict[str, Any], found: int) -> int:
    if not config["annotate"].get("require_all_wells", True):
        return found
    cat = _catalog(settings)
    return len(cat.plate_map(batch, cat.plate(batch, plate).plate_map))


def load_for_validation(batch: str, plate: str, settings: Any):
    """For ``cpjump1 validate --stage profiles``: the QC table of every profile of the plate that
    exists (the aggregated ``<plate>.csv.gz`` and each level), checked with suite ``profiles``."""
    from cpjump1.validation import ValidationInput

    config = load_config(settings)
    # Validate the plate as it was profiled: a run with --allow-missing-wells (a synthetic plate
    # with a subset of the plate map) recorded that in its marker.
    plate_marker = _read_marker(_marker_url(settings, batch, plate, PLATE_MARKER), settings) or {}
    if plate_marker.get("require_all_wells") is False:
        config["annotate"]["require_all_wells"] = False
    frames, allowed = {}, {}
    for level in LEVELS:
        url = level_url(settings, batch, plate, level)
        if storage.exists(url, settings):
            frames[(plate, level)] = read_profile(url, settings)
    if not frames:
        raise InputDataError(
            f"plate {batch}/{plate}: no profile under {storage.Layout(settings.storage_root).profiles_dir(batch, plate)}; "
            "run cpjump1 aggregate / profiles first"
        )
    aug = frames.get((plate, "augmented"))
    if aug is not None:
        feats = features_of(aug)
        allowed[(plate, "normalized")] = _zero_mad_features(aug, feats)
        allowed[(plate, "normalized_negcon")] = _zero_mad_features(aug[negcon_mask(aug, config)], feats)
    exp = expected_wells(settings, batch, plate, config, len(next(iter(frames.values()))))
    parts = [qc_frame(df, lv, plate, exp, allowed.get((p, lv), 0), config) for (p, lv), df in frames.items()]
    return ValidationInput(
        df=pd.concat(parts, ignore_index=True),
        parameters={
            "reference_median_tolerance": config.get("validation", {}).get("reference_median_tolerance", 1e-3),
            "levels": [lv for _, lv in frames],
            "files": [level_url(settings, batch, plate, lv) for _, lv in frames],
        },
        suite=config.get("validation", {}).get("suite", "profiles"),
        row_id_columns=["_qc_level", "Metadata_Plate", "Metadata_Well"],
    )


# --------------------------------------------------------------------------- quality control


def quality_control(annotated: pd.DataFrame, batch: str, plate: str, out_dir: str, settings: Any, config: dict[str, Any]) -> dict[str, str]:
    """Per-plate QC as the seed's configs ask for it: a summary (cells per well, wells per
    perturbation type and control type) and plate-layout heatmaps (cell count and a few key
    features by row × column), written beside the profiles."""
    urls = {}
    for key, (url, data) in _qc_files(annotated, batch, plate, out_dir, config).items():
        with storage.atomic_write(url, settings, "wb") as fh:
            fh.write(data)
        urls[key] = url
    return urls


#: QC figures made in this process, by panel layout (see _qc_files)
_QC_FIGURES: dict[tuple[int, int, int], Any] = {}


def _qc_files(annotated: pd.DataFrame, batch: str, plate: str, out_dir: str, config: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """The QC files of :func:`quality_control` as (url, content)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = annotated.copy()
    wells = df["Metadata_Well"].astype(str)
    df["Metadata_Row"] = wells.str[0]
    df["Metadata_Col"] = wells.str[1:].astype(int)
    count_col = next((c for c in ("Metadata_Count_Cells", "Metadata_Object_Count") if c in df), None)
    counts = df[count_col].astype(float) if count_col else pd.Series(np.nan, index=df.index)
    per_type = df.groupby(df["Metadata_pert_type"].fillna("(none)"))["Metadata_Well"].count().to_dict() if "Metadata_pert_type" in df else {}
    per_control = df.groupby(df["Metadata_control_type"].fillna("(none)"))["Metadata_Well"].count().to_dict() if "Metadata_control_type" in df else {}
    summary = {
        "batch": batch,
        "plate": plate,
        "wells": int(len(df)),
        "cells_total": float(np.nansum(counts)) if count_col else None,
        "cells_per_well": {
            k: (float(getattr(counts, k)()) if count_col else None) for k in ("min", "median", "mean", "max")
        },
        "wells_per_pert_type": {str(k): int(v) for k, v in per_type.items()},
        "wells_per_control_type": {str(k): int(v) for k, v in per_control.items()},
        "count_column": count_col,
    }
    rows = "ABCDEFGHIJKLMNOP"
    candidates = ["__count__"] + [f for f in config.get("quality_control", {}).get("heatmap", {}).get("features", []) if f in df]
    if len(candidates) < 3:
        candidates += [f for f in features_of(df) if f not in candidates][: 3 - len(candidates)]
    # one figure, panels side by side in two columns; few tick labels (drawing is the cost).
    # The figure is made once per process and its images, colour scales and titles updated for
    # each plate: making axes and colour bars costs more than drawing them.
    ncol = 2
    nrow = (len(candidates) + ncol - 1) // ncol
    key = (nrow, ncol, len(candidates))
    made = _QC_FIGURES.get(key)
    if made is None:
        fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.3 * nrow), squeeze=False)
        fig.subplots_adjust(left=0.04, right=0.97, top=0.93, bottom=0.05, wspace=0.12, hspace=0.3)
        for ax in axes.ravel()[len(candidates):]:
            ax.set_axis_off()
        panels = []
        for ax in axes.ravel()[: len(candidates)]:
            im = ax.imshow(np.zeros((16, 24)), cmap="viridis", aspect="equal", interpolation="nearest")
            ax.set_xticks([0, 5, 11, 17, 23], ["1", "6", "12", "18", "24"], fontsize=7)
            ax.set_yticks(range(0, 16, 3), list(rows[::3]), fontsize=7)
            panels.append((ax, im, fig.colorbar(im, ax=ax, shrink=0.75)))
        made = _QC_FIGURES[key] = (fig, panels)
    fig, panels = made
    r_idx = df["Metadata_Row"].map({r: i for i, r in enumerate(rows)})
    ok = r_idx.notna() & df["Metadata_Col"].between(1, 24)
    for (ax, im, cb), feat in zip(panels, candidates, strict=True):
        grid = np.full((16, 24), np.nan)
        vals = counts if feat == "__count__" else df[feat].astype(float)
        grid[r_idx[ok].astype(int).to_numpy(), df["Metadata_Col"][ok].to_numpy() - 1] = vals[ok].to_numpy()
        im.set_data(grid)
        finite = grid[np.isfinite(grid)]
        im.set_clim(float(finite.min()), float(finite.max())) if finite.size else im.set_clim(0.0, 1.0)
        cb.update_normal(im)
        title = f"cell count ({count_col})" if feat == "__count__" else feat
        ax.set_title(title, fontsize=8)
    fig.suptitle(f"{batch} / {plate}: plate layout (rows A-P × columns 1-24)", fontsize=9)
    urls = {
        "summary": storage.join(out_dir, f"{plate}_qc_summary.json"),
        "wells": storage.join(out_dir, f"{plate}_qc_wells.csv"),
        "heatmaps": storage.join(out_dir, f"{plate}_qc_heatmaps.png"),
    }
    png = io.BytesIO()
    fig.savefig(png, dpi=80, format="png")
    well_table = df[[c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Col", "Metadata_pert_type", "Metadata_control_type") if c in df]].copy()
    well_table["cell_count"] = counts.to_numpy()
    return {
        "summary": (urls["summary"], json.dumps(summary, indent=2).encode()),
        "wells": (urls["wells"], well_table.to_csv(index=False).encode()),
        "heatmaps": (urls["heatmaps"], png.getvalue()),
    }


# --------------------------------------------------------------------------- stage


def _config_digest(config: dict[str, Any]) -> str:
    return storage.fingerprint({k: v for k, v in config.items() if not k.startswith("_")})


def _metadata_digest(settings: Any, batch: str, plate: str, config: dict[str, Any]) -> str:
    from cpjump1.catalog import PERTURBATION_TABLES

    cat = _catalog(settings)
    p = cat.plate(batch, plate)
    files = [cat.plate_map_path(batch, p.plate_map), cat.root / "external_metadata" / PERTURBATION_TABLES[p.perturbation]]
    bl = Path(settings.metadata_dir) / config["feature_select"].get("blocklist", "blocklist_features.txt")
    if bl.exists():
        files.append(bl)
    return storage.fingerprint([storage.file_digest(str(f)) for f in files], p.perturbation)


def _marker_url(settings: Any, batch: str, plate: str, name: str) -> str:
    return storage.join(storage.Layout(settings.storage_root).profiles_dir(batch, plate), name)


def _read_marker(url: str, settings: Any) -> dict | None:
    try:
        return json.loads(storage.read_text(url, settings))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_marker(url: str, fp: str, settings: Any, **extra: Any) -> None:
    with storage.atomic_write(url, settings, "w") as fh:
        json.dump({"fingerprint": fp, "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}, fh, indent=2)


def _pycytominer_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("pycytominer")


# --------------------------------------------------------------------------- fast path
#
# The plate and batch steps below compute what pycytominer 1.7.1 computes, with numpy on one
# float64 block per profile instead of pandas frames of thousands of columns. Definitions
# (read from pycytominer 1.7.1 and scipy, re-implemented here; the identity with pycytominer is
# what tests/test_profiles.py and benchmarks/bench_profiles.py check, file for file):
#
# * mad_robustize (pycytominer.operations.RobustMAD): ``(x - median) / (mad + epsilon)`` with
#   the column medians of the reference rows (NaN skipped) and ``mad`` = scipy's
#   ``median_abs_deviation(nan_policy="omit", scale=1/1.4826)``, i.e. the median of
#   ``|x - median|`` divided by ``1/1.4826``.
# * frequency_threshold: per feature, the ratio of the second most frequent value's count to
#   the most frequent one's (0 with fewer than two distinct values; NaN not counted) and the
#   number of distinct values over the number of rows; excluded when the ratio < freq_cut or
#   the unique ratio < unique_cut.
# * correlation_threshold: :func:`correlation_threshold` (same rule as pycytominer).
# * drop_na_columns: NaN fraction over all rows > na_cutoff.
# * blocklist: the blocklist names present among the columns.
# * Operations run in order, each on the features the previous ones kept.
#
# Between levels every profile is the table ``pandas.read_csv`` gives back from its ``%.5g``
# CSV text, as in the step-by-step recipe; text a level shares with the level it was selected
# from (feature selection keeps columns) is reused, not formatted again.


@dataclass
class Block:
    """A profile as ``pandas.read_csv`` reads it back from its CSV: metadata columns (a frame),
    then a float64 block of features; ``ints`` flags feature columns pandas reads as int64."""

    meta: pd.DataFrame
    features: list[str]
    X: np.ndarray
    ints: np.ndarray
    meta_lines: list[str] | None = None
    feat_lines: list[str] | None = None

    @property
    def columns(self) -> list[str]:
        return list(self.meta.columns) + list(self.features)

    def frame(self) -> pd.DataFrame:
        feats = pd.DataFrame(self.X, columns=self.features)
        for j in np.flatnonzero(self.ints):
            feats[self.features[j]] = feats[self.features[j]].astype(np.int64)
        return pd.concat([self.meta.reset_index(drop=True), feats], axis=1)


_COMPARTMENT_PREFIXES = ("Cells", "Nuclei", "Cytoplasm")


def block_of(df: pd.DataFrame) -> Block | None:
    """``df`` as a :class:`Block` when its columns are ``Metadata_*`` then numeric features in
    pycytominer's sense (``Cells``/``Nuclei``/``Cytoplasm`` prefixes); None otherwise (the
    pandas/pycytominer path then handles it)."""
    cols = list(df.columns)
    n_meta = 0
    while n_meta < len(cols) and str(cols[n_meta]).startswith("Metadata_"):
        n_meta += 1
    feats = cols[n_meta:]
    if not n_meta or not feats or not all(isinstance(c, str) and is_feature(c) for c in feats):
        return None
    if any(str(c).startswith(_COMPARTMENT_PREFIXES) for c in cols[:n_meta]):
        return None
    kinds = [df[c].dtype.kind for c in feats]
    if any(k not in "fiu" for k in kinds):
        return None
    X = np.ascontiguousarray(df[feats].to_numpy(dtype=np.float64))
    return Block(df.iloc[:, :n_meta].reset_index(drop=True), list(feats), X, np.array([k in "iu" for k in kinds], bool))


def _feature_lines(X: np.ndarray, ints: np.ndarray, fmt: str) -> list[str]:
    """Each row's feature fields as pandas' ``to_csv(float_format=fmt)`` writes them (NaN empty)."""
    spec = ",".join("%d" if i else fmt for i in ints.tolist())
    return [(spec % tuple(row)).replace("nan", "") for row in X.tolist()]


def _meta_lines(meta: pd.DataFrame, fmt: str) -> list[str] | None:
    text = meta.to_csv(index=False, header=False, float_format=fmt, lineterminator="\n")
    lines = text.split("\n")[:-1]
    return lines if len(lines) == len(meta) else None  # a quoted newline: not line-splittable


def csv_text(b: Block, fmt: str) -> str:
    """The CSV text of ``b``: what ``frame.to_csv(index=False, float_format=fmt)`` writes."""
    if b.meta_lines is None:
        b.meta_lines = _meta_lines(b.meta, fmt)
    if b.feat_lines is None:
        b.feat_lines = _feature_lines(b.X, b.ints, fmt)
    if b.meta_lines is None:
        return b.frame().to_csv(index=False, float_format=fmt, lineterminator="\n")
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(b.columns)
    parts = [header.getvalue()]
    parts.extend(m + "," + f + "\n" for m, f in zip(b.meta_lines, b.feat_lines, strict=True))
    return "".join(parts)


def roundtrip(b: Block, fmt: str) -> Block:
    """``b`` as ``pandas.read_csv`` gives it back from its CSV text (values rounded by ``fmt``,
    pandas' per-column type inference); the text is kept for writing."""
    if b.meta_lines is None:
        b.meta_lines = _meta_lines(b.meta, fmt)
    if b.feat_lines is None:
        b.feat_lines = _feature_lines(b.X, b.ints, fmt)
    if b.meta_lines is None:
        back = block_of(pd.read_csv(io.StringIO(csv_text(b, fmt))))
        if back is None:
            raise InputDataError("profile columns changed on reading back their CSV text")
        return back
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(list(b.meta.columns))
    meta = pd.read_csv(io.StringIO(header.getvalue() + "\n".join(b.meta_lines) + "\n"))
    feats = pd.read_csv(io.StringIO("\n".join(b.feat_lines) + "\n"), header=None, names=range(len(b.features)))
    kinds = feats.dtypes.map(lambda d: d.kind).to_numpy()
    if len(meta) != len(b.meta) or len(feats) != len(b.meta) or not all(k in "fiu" for k in kinds):
        raise InputDataError("profile rows or types changed on reading back their CSV text")
    X = np.ascontiguousarray(feats.to_numpy(dtype=np.float64))
    return Block(meta, list(b.features), X, np.array([k in "iu" for k in kinds], bool), b.meta_lines, b.feat_lines)


def select_columns(b: Block, keep: np.ndarray) -> Block:
    """The features ``keep`` (indices) of ``b``, reusing its text (read back identically)."""
    keep = np.asarray(keep, dtype=np.int64)
    lines = None
    if b.feat_lines is not None:
        if len(keep) == 0:
            lines = None
        elif len(keep) == len(b.features):
            lines = b.feat_lines
        else:
            pick = operator.itemgetter(*keep.tolist())
            if len(keep) == 1:
                lines = [pick(line.split(",")) for line in b.feat_lines]
            else:
                lines = [",".join(pick(line.split(","))) for line in b.feat_lines]
    return Block(b.meta, [b.features[k] for k in keep.tolist()], np.ascontiguousarray(b.X[:, keep]), b.ints[keep], b.meta_lines, lines)


def parquet_bytes(b: Block) -> bytes:
    """The Parquet twin of ``b`` (the frame ``pandas.read_csv`` gives for its CSV)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = pa.Table.from_pandas(b.meta, preserve_index=False)
    XF = np.asfortranarray(b.X)
    arrays = list(meta.columns)
    names = list(meta.column_names)
    for j, name in enumerate(b.features):
        col = XF[:, j]
        arrays.append(pa.array(col.astype(np.int64) if b.ints[j] else col, from_pandas=True))
        names.append(name)
    table = pa.Table.from_arrays(arrays, names=names)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _nan_quiet():
    import warnings

    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", RuntimeWarning)
    return ctx


def mad_robustize(X: np.ndarray, reference: np.ndarray, epsilon: float) -> np.ndarray:
    """pycytominer's mad_robustize of ``X`` against the rows ``reference`` (module notes)."""
    ref = X[reference]
    with np.errstate(all="ignore"):
        ctx = _nan_quiet()
        try:
            med = np.nanmedian(ref, axis=0)
            mad = np.nanmedian(np.abs(ref - med), axis=0) / (1 / 1.4826)
        finally:
            ctx.__exit__(None, None, None)
        return (X - med) / (mad + epsilon)


def frequency_exclusions(X: np.ndarray, freq_cut: float, unique_cut: float) -> np.ndarray:
    """Boolean mask of the columns pycytominer's frequency_threshold excludes."""
    n, p = X.shape
    S = np.sort(X, axis=0)  # NaN last
    valid = n - np.isnan(X).sum(axis=0)
    out = np.zeros(p, bool)
    for j in range(p):
        k = int(valid[j])
        if k == 0:
            out[j] = True
            continue
        s = S[:k, j]
        starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
        n_unique = len(starts)
        if n_unique < 2:
            freq = 0.0
        else:
            counts = np.diff(np.append(starts, k))
            top = np.partition(counts, n_unique - 2)[-2:]
            freq = int(min(top)) / int(max(top))
        out[j] = freq < freq_cut or (n_unique / n) < unique_cut
    return out


def select_features(b: Block, settings: Any, config: dict[str, Any]) -> np.ndarray | None:
    """Indices of the features of ``b`` that pycytominer.feature_select keeps with the config's
    operations (module notes); None when an operation needs the pycytominer path."""
    fs = config["feature_select"]
    ops = list(fs["operations"])
    if not set(ops) <= {"frequency_threshold", "correlation_threshold", "drop_na_columns", "blocklist"}:
        return None
    if fs.get("image_features", False) or fs.get("corr_method", "pearson") != "pearson":
        return None
    n, p = b.X.shape
    alive = np.ones(p, bool)
    columns = set(b.columns)
    for op in ops:
        idx = np.flatnonzero(alive)
        if op == "frequency_threshold":
            gone = idx[frequency_exclusions(b.X[:, idx], fs["freq_cut"], fs["unique_cut"])]
        elif op == "drop_na_columns":
            gone = idx[np.isnan(b.X[:, idx]).sum(axis=0) / n > fs["na_cutoff"]] if n else idx[:0]
        elif op == "correlation_threshold":
            x = b.X[:, idx]
            if np.isinf(x).any():
                return None
            names = [b.features[k] for k in idx.tolist()]
            dropped = set(_correlation_exclusions(x, names, fs["corr_threshold"]))
            gone = idx[[nm in dropped for nm in names]] if dropped else idx[:0]
        else:
            path = Path(settings.metadata_dir) / fs.get("blocklist", "blocklist_features.txt")
            if not path.exists():
                raise MetadataError(f"{path}: blocklist file not found (feature_select.blocklist in {config.get('_path')})")
            listed = [x for x in _blocklist(str(path)) if x in columns]
            if any(x in set(b.meta.columns) for x in listed):
                return None
            pos = {f: k for k, f in enumerate(b.features)}
            gone = np.array([pos[x] for x in listed], dtype=np.int64)
        alive[gone] = False
    return np.flatnonzero(alive)


def _correlation_exclusions(x: np.ndarray, features: list[str], threshold: float) -> list[str]:
    """pycytominer's correlation_threshold rule (Pearson, no infinite values) on the columns of ``x``."""
    if np.isnan(x).any():
        c = pairwise_complete_correlation(x)
    else:
        c = np.corrcoef(np.ascontiguousarray(x.T))  # the layout pycytominer hands to np.corrcoef
    total = pd.DataFrame(c, index=features, columns=features).abs().sum()
    order = total.sort_values().index
    pos = pd.Series(np.arange(len(order)), index=order).reindex(features).to_numpy()
    with np.errstate(invalid="ignore"):
        a, b = np.nonzero(np.tril(c > threshold, k=-1))
    chosen = np.where(pos[a] > pos[b], a, b)
    return list({features[k] for k in chosen.tolist()})


def annotate_block(
    level1: Block, batch: str, plate: str, settings: Any, config: dict[str, Any], source: str
) -> Block | None:
    """pycytominer.annotate (plate map, then the perturbation table) on the metadata of
    ``level1``; its features follow their rows. Same checks and errors as :func:`annotate`.
    None when the tables have columns the metadata-only merge cannot place exactly."""
    _annotate_checks(level1.meta, batch, plate, settings, config, source)
    a = config["annotate"]
    cat = _catalog(settings)
    p = cat.plate(batch, plate)
    platemap = platemap_table(settings, batch, p.plate_map)
    # pycytominer.load_platemap: every column not yet Metadata_-prefixed gets the prefix
    platemap.columns = pd.Index([c if not isinstance(c, str) or c.startswith("Metadata_") else f"Metadata_{c}" for c in platemap.columns])
    external = perturbation_table(settings, p.perturbation, config)
    if any(isinstance(c, str) and c.startswith(("Image", *_COMPARTMENT_PREFIXES)) for c in external.columns):
        return None
    external.columns = pd.Index([c if not isinstance(c, str) or c.startswith("Metadata_") else f"Metadata_{c}" for c in external.columns])
    row = "__cpjump1_row__"
    left = level1.meta.assign(**{row: np.arange(len(level1.meta))})
    join0, join1 = a["platemap_well_column"], a["well_column"]
    merged = platemap.merge(left, left_on=join0, right_on=join1, how="inner", suffixes=("_platemap", None))
    if join0 != join1:
        merged = merged.drop(join0, axis="columns")
    merge = "Metadata_" + a["external"]["merge_column"]
    merged = merged.merge(external, on=[merge], how="left", suffixes=(None, "_external")).reset_index(drop=True).drop_duplicates()
    merged = merged.rename(
        {"Image_Metadata_Plate": "Metadata_Plate", "Image_Metadata_Well": "Metadata_Well", "Image_Metadata_Site": "Metadata_Site"},
        axis="columns",
    )
    meta_cols = [c for c in merged.columns if str(c).startswith("Metadata_")]
    if [c for c in merged.columns if c not in meta_cols] != [row]:
        return None
    rows = merged[row].to_numpy()
    meta = merged[meta_cols].reset_index(drop=True)
    out = Block(meta, list(level1.features), np.ascontiguousarray(level1.X[rows]), level1.ints.copy())
    q = negcon_query(config)
    col = a.get("negcon_column", "Metadata_control_type")
    if col not in meta.columns or not meta.eval(q).to_numpy(bool).any():
        raise InputDataError(
            f"plate {batch}/{plate}: no negative control ({q}) among the wells of {source} "
            f"annotated with {cat.plate_map_path(batch, p.plate_map)}; cannot normalize to negative controls"
        )
    return out


def _frames_pandas(level1: pd.DataFrame, batch: str, plate: str, settings: Any, config: dict[str, Any], levels: list[str], src: str):
    """The per-plate levels through pandas and pycytominer (profiles the fast path cannot take)."""
    fmt = config["options"]["float_format"]

    def back(df: pd.DataFrame) -> pd.DataFrame:
        return pd.read_csv(io.StringIO(format_csv(df, fmt)))

    frames: dict[str, pd.DataFrame] = {"augmented": back(annotate(level1, batch, plate, settings, config, source=src))}
    q = negcon_query(config)
    feats = features_of(frames["augmented"])
    allowed: dict[str, int] = {}
    for lv, key in (("normalized", "normalize"), ("normalized_negcon", "normalize_negcon")):
        if lv in levels:
            c = config[key]
            samples = c.get("samples", "all" if lv == "normalized" else q)
            frames[lv] = back(normalize(frames["augmented"], samples=samples, method=c["method"], epsilon=c["mad_robustize_epsilon"]))
            ref = frames["augmented"] if samples == "all" else frames["augmented"][negcon_mask(frames["augmented"], config, samples)]
            allowed[lv] = _zero_mad_features(ref, feats)
    for lv, srclv in (("feature_select_plate", "normalized"), ("feature_select_negcon_plate", "normalized_negcon")):
        if lv in levels:
            frames[lv] = feature_select(frames[srclv], settings, config)
    return frames, allowed


def _frames_fast(level1: pd.DataFrame, batch: str, plate: str, settings: Any, config: dict[str, Any], levels: list[str], src: str):
    """The per-plate levels as :class:`Block` s (module notes); None when a profile needs the
    pandas path."""
    fmt = config["options"]["float_format"]
    b1 = block_of(level1)
    if b1 is None:
        return None
    aug = annotate_block(b1, batch, plate, settings, config, src)
    if aug is None:
        return None
    frames: dict[str, Block] = {"augmented": roundtrip(aug, fmt)}
    aug = frames["augmented"]
    q = negcon_query(config)
    allowed: dict[str, int] = {}
    for lv, key in (("normalized", "normalize"), ("normalized_negcon", "normalize_negcon")):
        if lv not in levels:
            continue
        c = config[key]
        if c["method"] != "mad_robustize" or c.get("image_features", False):
            return None
        samples = c.get("samples", "all" if lv == "normalized" else q)
        ref = np.ones(len(aug.meta), bool) if samples == "all" else aug.meta.eval(samples).to_numpy(bool)
        X = mad_robustize(aug.X, ref, float(c["mad_robustize_epsilon"]))
        frames[lv] = roundtrip(Block(aug.meta, aug.features, X, np.zeros(len(aug.features), bool), aug.meta_lines), fmt)
        allowed[lv] = _zero_mad_count(aug.X[ref])
    for lv, srclv in (("feature_select_plate", "normalized"), ("feature_select_negcon_plate", "normalized_negcon")):
        if lv in levels:
            keep = select_features(frames[srclv], settings, config)
            if keep is None:
                return None
            frames[lv] = select_columns(frames[srclv], keep)
    return frames, allowed


def _zero_mad_count(ref: np.ndarray) -> int:
    """Features constant over the reference rows (MAD 0): mad_robustize makes them all-NaN."""
    if ref.size == 0:
        return 0
    with np.errstate(all="ignore"):
        ctx = _nan_quiet()
        try:
            return int((np.nanmax(ref, axis=0) == np.nanmin(ref, axis=0)).sum())
        finally:
            ctx.__exit__(None, None, None)


# --------------------------------------------------------------------------- staged outputs


def _stage_path(url: str) -> str:
    if storage.is_remote(url):
        fd, tmp = tempfile.mkstemp(prefix="cpjump1-staged-", suffix="-" + storage.basename(url))
        os.close(fd)
        return tmp
    target = Path(url.removeprefix("file://"))
    target.parent.mkdir(parents=True, exist_ok=True)
    return str(target.with_name(f".{target.name}.staged-{uuid.uuid4().hex[:8]}"))


def _stage(staged: list[tuple[str, str]], url: str, data: bytes) -> None:
    """Write ``data`` under a temporary name for ``url``; :func:`_commit` moves it into place."""
    tmp = _stage_path(url)
    with open(tmp, "wb") as fh:
        fh.write(data)
    staged.append((tmp, url))


def _commit(staged: list[tuple[str, str]], settings: Any) -> None:
    for tmp, url in staged:
        if storage.is_remote(url):
            storage.put_file(tmp, url, settings)
            os.unlink(tmp)
        else:
            os.replace(tmp, url.removeprefix("file://"))


def _discard(staged: list[tuple[str, str]]) -> None:
    for tmp, _ in staged:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _stage_profile(staged: list[tuple[str, str]], obj: Block | pd.DataFrame, url: str, fmt: str, level: int) -> None:
    """The gzip CSV and its Parquet twin of one profile, staged."""
    if isinstance(obj, Block):
        text = csv_text(obj, fmt)
        twin = parquet_bytes(obj)
    else:
        text = format_csv(obj, fmt)
        sink = io.BytesIO()
        obj.to_parquet(sink, index=False)
        twin = sink.getvalue()
    _stage(staged, url.removesuffix(".csv.gz") + ".parquet", twin)
    _stage(staged, url, gzip.compress(text.encode("utf-8"), compresslevel=level, mtime=0))


# --------------------------------------------------------------------------- plate step


def _plate_levels(config: dict[str, Any], steps: list[str]) -> list[str]:
    levels = ["augmented"]
    if "normalize" in steps:
        levels.append("normalized")
    if "normalize_negcon" in steps:
        levels.append("normalized_negcon")
    do_fs = "plate" in config["feature_select"].get("levels", ["plate"])
    if do_fs and "feature_select" in steps and "normalize" in steps:
        levels.append("feature_select_plate")
    if do_fs and "feature_select_negcon" in steps and "normalize_negcon" in steps:
        levels.append("feature_select_negcon_plate")
    return levels


@dataclass
class _PlateJob:
    batch: str
    plate: str
    src: str
    fp: str
    marker: str
    levels: list[str]
    outputs: dict[str, str]
    steps: list[str]


def _plate_job(batch: str, plate: str, settings: Any, config: dict[str, Any]) -> _PlateJob:
    steps = batch_steps(config, batch)
    src = level_url(settings, batch, plate, "aggregated")
    twin = level_url(settings, batch, plate, "aggregated", ".parquet")
    has_csv = storage.exists(src, settings)
    if not has_csv and not storage.exists(twin, settings):
        raise InputDataError(f"plate {batch}/{plate}: aggregated profile {src} not found; run cpjump1 aggregate first")
    fp = storage.fingerprint(
        VERSION, storage.file_stamp(src if has_csv else twin, settings), _config_digest(config),
        _metadata_digest(settings, batch, plate, config), _pycytominer_version(), steps,
    )
    levels = _plate_levels(config, steps)
    outputs = {lv: level_url(settings, batch, plate, lv) for lv in levels}
    return _PlateJob(batch, plate, src, fp, _marker_url(settings, batch, plate, PLATE_MARKER), levels, outputs, steps)


def _plate_is_complete(job: _PlateJob, settings: Any) -> bool:
    m = _read_marker(job.marker, settings)
    return bool(m and m.get("fingerprint") == job.fp and all(storage.exists(u, settings) for u in job.outputs.values()))


def _compute_plate(job: _PlateJob, settings: Any, config: dict[str, Any]) -> dict[str, Any]:
    """One plate's levels computed, their files and QC files staged (not yet in place), and the
    QC table the profiles suite checks. Runs in a worker process when plates run in parallel."""
    t0 = time.time()
    batch, plate = job.batch, job.plate
    fmt = config["options"]["float_format"]
    level1 = read_profile(job.src, settings)
    check_input(level1, batch, plate, job.src)
    res = _frames_fast(level1, batch, plate, settings, config, job.levels, job.src)
    if res is None:
        log.info("plate %s/%s: profiles through pandas/pycytominer (layout outside the fast path)", batch, plate)
        res = _frames_pandas(level1, batch, plate, settings, config, job.levels, job.src)
    frames, allowed = res
    exp = expected_wells(settings, batch, plate, config, len(level1))
    tables = []
    for lv, obj in frames.items():
        if isinstance(obj, Block):
            tables.append(qc_frame(obj.meta, lv, plate, exp, allowed.get(lv, 0), config, features=obj.features, values=obj.X))
        else:
            tables.append(qc_frame(obj, lv, plate, exp, allowed.get(lv, 0), config))
    staged: list[tuple[str, str]] = []
    try:
        level = config["options"].get("compresslevel", 1)
        for lv, obj in frames.items():
            _stage_profile(staged, obj, job.outputs[lv], fmt, level)
        qc_urls = {}
        if "quality_control" in job.steps:
            aug = frames["augmented"]
            if isinstance(aug, Block):
                wanted = list(dict.fromkeys(config.get("quality_control", {}).get("heatmap", {}).get("features", []) + aug.features[:3]))
                pos = {f: k for k, f in enumerate(aug.features)}
                cols = [f for f in wanted if f in pos]
                aug = pd.concat([aug.meta, pd.DataFrame(aug.X[:, [pos[f] for f in cols]], columns=cols)], axis=1)
            out_dir = storage.Layout(settings.storage_root).profiles_dir(batch, plate)
            for key, (url, data) in _qc_files(aug, batch, plate, out_dir, config).items():
                _stage(staged, url, data)
                qc_urls[f"qc_{key}"] = url
    except BaseException:
        _discard(staged)
        raise
    return {"plate": plate, "staged": staged, "qc": pd.concat(tables, ignore_index=True), "qc_urls": qc_urls, "seconds": time.time() - t0}


def _compute_plate_safe(args):
    job, settings_dict, config = args
    from cpjump1.settings import get_settings

    try:
        return _compute_plate(job, get_settings(**settings_dict), config)
    except Exception as exc:  # noqa: BLE001  (reported by the parent, which finishes the other plates)
        return {"plate": job.plate, "error": exc}


def _suite(table: pd.DataFrame, plates: list[str], levels: list[str], batch: str, settings: Any, config: dict[str, Any], report_plate: str, raise_on_failure: bool):
    from cpjump1.validation import run_suite

    vcfg = config.get("validation", {})
    return run_suite(
        table, vcfg.get("suite", "profiles"), batch=batch, plate=report_plate, stage="profiles", settings=settings,
        extra_context={"reference_median_tolerance": vcfg.get("reference_median_tolerance", 1e-3), "levels": sorted(set(levels)), "plates": sorted(plates)},
        row_id_columns=["_qc_level", "Metadata_Plate", "Metadata_Well"], raise_on_failure=raise_on_failure,
    )


def _copy_report(report, batch: str, plate: str, settings: Any) -> None:
    """The suite's JSON and Data Docs HTML of a run over several plates, also under ``plate``'s QC folder."""
    qc_dir = storage.Layout(settings.storage_root).qc_dir("profiles", batch, plate)
    for src in (report.json_path, report.html_path):
        data = storage.read_bytes(src, settings)
        with storage.atomic_write(storage.join(qc_dir, storage.basename(src)), settings, "wb") as fh:
            fh.write(data)


def _finish_plates(results: list[dict[str, Any]], jobs: dict[str, _PlateJob], batch: str, settings: Any, config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Validate the computed plates with one run of the profiles suite (per plate only when that
    run fails, to tell the plates apart), move the files of every valid plate into place and
    write its marker. Raises the first error after the other plates are finished."""
    from cpjump1.errors import ValidationFailed

    done = [r for r in results if "error" not in r]
    errors = [r for r in results if "error" in r]
    out: dict[str, dict[str, str]] = {}
    failures: list[str] = []
    if done:
        plates = [r["plate"] for r in done]
        levels = sorted({lv for p in plates for lv in jobs[p].levels})
        table = pd.concat([r["qc"] for r in done], ignore_index=True)
        report_plate = plates[0] if len(plates) == 1 else "_plates"
        report = _suite(table, plates, levels, batch, settings, config, report_plate, raise_on_failure=False)
        passed = {p: report for p in plates} if report.success else {}
        if not report.success and len(plates) > 1:
            for r in done:
                rep = _suite(r["qc"], [r["plate"]], jobs[r["plate"]].levels, batch, settings, config, r["plate"], raise_on_failure=False)
                if rep.success:
                    passed[r["plate"]] = rep
                else:
                    failures.append(rep.summary())
        elif not report.success:
            failures.append(report.summary())
        for r in done:
            p = r["plate"]
            if p not in passed:
                _discard(r["staged"])
                continue
            _commit(r["staged"], settings)
            if passed[p].plate != p:
                _copy_report(passed[p], batch, p, settings)
            job = jobs[p]
            _write_marker(
                job.marker, job.fp, settings, stage="profiles/plate", levels=job.levels, seconds=round(r["seconds"], 2),
                require_all_wells=bool(config["annotate"].get("require_all_wells", True)),
            )
            out[p] = {**job.outputs, **r["qc_urls"]}
            log.info("plate %s/%s: %s in %.1f s", batch, p, ", ".join(job.levels), r["seconds"])
    for r in errors[1:]:
        log.error("plate %s/%s: %s", batch, r["plate"], r["error"])
    if errors:
        raise errors[0]["error"]
    if failures:
        raise ValidationFailed("\n".join(failures))
    return out


def run_plates(batch: str, plates: list[str], settings: Any, config: dict[str, Any] | None = None, force: bool = False, jobs: int = 1) -> dict[str, dict[str, str]]:
    """The per-plate profiles of ``plates``: each computed (in ``jobs`` worker processes),
    staged, validated with the profiles suite and only then moved into place."""
    config = config or load_config(settings)
    todo: dict[str, _PlateJob] = {}
    out: dict[str, dict[str, str]] = {}
    for p in plates:
        job = _plate_job(batch, p, settings, config)
        if not force and _plate_is_complete(job, settings):
            log.info("plate %s/%s: profiles are complete; skipped", batch, p)
            out[p] = dict(job.outputs)
        else:
            todo[p] = job
    if not todo:
        return out
    from tqdm.auto import tqdm

    results: list[dict[str, Any]] = []
    if jobs > 1 and len(todo) > 1:
        import multiprocessing

        sd = settings.model_dump()
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("fork")) as ex:
            futures = [ex.submit(_compute_plate_safe, (job, sd, config)) for job in todo.values()]
            import great_expectations  # noqa: F401  (imported here while the workers compute)

            for fut in tqdm(futures, desc=f"{batch} plates", unit="plate", disable=None):
                results.append(fut.result())
    else:
        for job in tqdm(list(todo.values()), desc=f"{batch} plates", unit="plate", disable=None):
            try:
                results.append(_compute_plate(job, settings, config))
            except Exception as exc:  # noqa: BLE001
                results.append({"plate": job.plate, "error": exc})
    out.update(_finish_plates(results, todo, batch, settings, config))
    return out


def run_plate(batch: str, plate: str, settings: Any, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, str]:
    """The per-plate profiles (annotate, normalize ×2, plate-level feature selection ×2, QC)."""
    return run_plates(batch, [plate], settings, config, force)[plate]


# --------------------------------------------------------------------------- batch step


def _int_like(X: np.ndarray) -> np.ndarray:
    """Columns whose ``%.5g`` text pandas reads back as int64: every value finite, integral and
    written without an exponent (|v| < 1e5)."""
    if X.shape[0] == 0:
        return np.zeros(X.shape[1], bool)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(X) & (X == np.floor(X)) & (np.abs(X) < 1e5)).all(axis=0)


def _batch_select(parts: list[pd.DataFrame], settings: Any, config: dict[str, Any], fmt: str) -> list[tuple[Block, str]] | None:
    """Batch-level feature selection over ``parts`` (one profile per plate) as Blocks, with the
    CSV text of each plate's output; None when the profiles need the pandas path."""
    blocks = [block_of(df) for df in parts]
    if any(b is None for b in blocks) or any(b.features != blocks[0].features for b in blocks):
        return None
    meta = pd.concat([b.meta for b in blocks], ignore_index=True, sort=False)
    if any(str(c).startswith(_COMPARTMENT_PREFIXES) for c in meta.columns):
        return None
    ints = np.logical_and.reduce([b.ints for b in blocks])
    combined = Block(meta, list(blocks[0].features), np.concatenate([b.X for b in blocks]), ints)
    keep = select_features(combined, settings, config)
    if keep is None:
        return None
    sel = select_columns(combined, keep)
    meta_lines = _meta_lines(sel.meta, fmt)
    if meta_lines is None:
        return None
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(list(sel.meta.columns))
    meta_header = header.getvalue()
    out = []
    start = 0
    for b in blocks:
        stop = start + len(b.meta)
        X = sel.X[start:stop]
        ml = meta_lines[start:stop]
        part = Block(sel.meta.iloc[start:stop].reset_index(drop=True), sel.features, X, sel.ints.copy(), ml)
        text = csv_text(part, fmt)
        # the frame pandas.read_csv gives for this plate's file (its own type inference)
        back_meta = pd.read_csv(io.StringIO(meta_header + "\n".join(ml) + "\n"))
        out.append((Block(back_meta, sel.features, X, sel.ints | _int_like(X)), text))
        start = stop
    return out


def run_batch(batch: str, settings: Any, plates: list[str] | None = None, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, dict[str, str]]:
    """Batch-level feature selection: all plates' ``_normalized`` (and ``_normalized_negcon``)
    profiles concatenated (pandas' column union), features selected once, written per plate
    as ``*_batch`` after the profiles suite passed on all of them."""
    config = config or load_config(settings)
    steps = batch_steps(config, batch)
    if "batch" not in config["feature_select"].get("levels", []):
        log.info("batch %s: batch-level feature selection not configured; nothing to do", batch)
        return {}
    plates = list(plates or _catalog(settings).batch(batch).plates)
    work = []
    if "feature_select" in steps and "normalize" in steps:
        work.append(("normalized", "feature_select_batch"))
    if "feature_select_negcon" in steps and "normalize_negcon" in steps:
        work.append(("normalized_negcon", "feature_select_negcon_batch"))
    if not work:
        return {}
    inputs = {(p, src): level_url(settings, batch, p, src) for p in plates for src, _ in work}
    for (p, src), url in inputs.items():
        if not storage.exists(url, settings) and not storage.exists(url.removesuffix(".csv.gz") + ".parquet", settings):
            raise InputDataError(f"batch {batch}: plate {p}: {url} not found; run cpjump1 profiles --step plate for it first")
    stamps = {f"{p}/{s}": storage.file_stamp(u.removesuffix(".csv.gz") + ".parquet", settings) for (p, s), u in inputs.items()}
    fp = storage.fingerprint(VERSION, stamps, _config_digest(config), _pycytominer_version(), plates, work)
    outputs = {p: {dst: level_url(settings, batch, p, dst) for _, dst in work} for p in plates}
    markers = {p: _marker_url(settings, batch, p, BATCH_MARKER) for p in plates}
    if not force and all((_read_marker(markers[p], settings) or {}).get("fingerprint") == fp for p in plates) and all(
        storage.exists(u, settings) for d in outputs.values() for u in d.values()
    ):
        log.info("batch %s: batch-level feature selection is complete; skipped", batch)
        return outputs
    t0 = time.time()
    fmt = config["options"]["float_format"]
    level = config["options"].get("compresslevel", 1)
    tables: list[pd.DataFrame] = []
    staged: list[tuple[str, str]] = []
    try:
        for src, dst in work:
            parts = [read_profile(inputs[(p, src)], settings) for p in plates]
            for p, df in zip(plates, parts, strict=True):
                if "Metadata_Plate" in df and set(df["Metadata_Plate"].astype(str)) != {p}:
                    raise InputDataError(f"batch {batch}: {inputs[(p, src)]} holds rows of plate(s) {sorted(set(df['Metadata_Plate'].astype(str)))}, expected {p}")
            fast = _batch_select(parts, settings, config, fmt)
            if fast is not None:
                for p, (b, text) in zip(plates, fast, strict=True):
                    exp = expected_wells(settings, batch, p, config, len(b.meta))
                    tables.append(qc_frame(b.meta, dst, p, exp, 0, config, features=b.features, values=b.X))
                    _stage(staged, outputs[p][dst].removesuffix(".csv.gz") + ".parquet", parquet_bytes(b))
                    _stage(staged, outputs[p][dst], gzip.compress(text.encode("utf-8"), compresslevel=level, mtime=0))
                n_kept = len(fast[0][0].features)
            else:
                log.info("batch %s: %s through pandas/pycytominer (layout outside the fast path)", batch, dst)
                combined = pd.concat(parts, ignore_index=True, sort=False)
                meta = [c for c in combined.columns if not is_feature(c)]
                combined = combined[meta + features_of(combined)]
                selected = feature_select(combined, settings, config)
                selected = selected[meta + features_of(selected)]
                bounds = np.cumsum([0] + [len(x) for x in parts])
                for i, p in enumerate(plates):
                    part = selected.iloc[bounds[i] : bounds[i + 1]].reset_index(drop=True)
                    text = format_csv(part, fmt)
                    back = pd.read_csv(io.StringIO(text))
                    exp = expected_wells(settings, batch, p, config, len(back))
                    tables.append(qc_frame(back, dst, p, exp, 0, config))
                    sink = io.BytesIO()
                    back.to_parquet(sink, index=False)
                    _stage(staged, outputs[p][dst].removesuffix(".csv.gz") + ".parquet", sink.getvalue())
                    _stage(staged, outputs[p][dst], gzip.compress(text.encode("utf-8"), compresslevel=level, mtime=0))
                n_kept = len(features_of(selected))
            log.info("batch %s: %s: %d of %d features kept over %d plates", batch, dst, n_kept, len(features_of(parts[0])), len(plates))
            del parts
        _suite(pd.concat(tables, ignore_index=True), plates, [dst for _, dst in work], batch, settings, config, "_batch", raise_on_failure=True)
    except BaseException:
        _discard(staged)
        raise
    _commit(staged, settings)
    for p in plates:
        _write_marker(markers[p], fp, settings, stage="profiles/batch", plates=len(plates), seconds=round(time.time() - t0, 2))
    log.info("batch %s: batch-level feature selection of %d plates in %.1f s", batch, len(plates), time.time() - t0)
    return outputs



def run_profiles(
    batch: str,
    settings: Any,
    plates: list[str] | None = None,
    force: bool = False,
    step: str = "all",
    jobs: int = 1,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Profiles of ``plates`` (default: every plate of the batch).

    ``step="plate"``: per-plate levels (the Airflow DAG runs this per plate); ``step="batch"``:
    batch-level feature selection (once per batch, after all plates); ``step="all"``: both.
    ``jobs`` > 1 runs plates in parallel processes.
    """
    config = config or load_config(settings)
    cat = _catalog(settings)
    plates = list(plates or cat.batch(batch).plates)
    for p in plates:
        cat.plate(batch, p)
    out: dict[str, Any] = {}
    if step in ("plate", "all"):
        out.update(run_plates(batch, plates, settings, config, force, jobs))
    if step in ("batch", "all"):
        for p, d in run_batch(batch, settings, plates, config, force).items():
            out.setdefault(p, {}).update(d)
    return out


@click.command("profiles")
@click.option("--batch", required=True, help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plates", default=None, help="Comma-separated plate barcodes (default: all plates of the batch).")
@click.option("--plate", "plate_list", multiple=True, help="A plate barcode (repeatable; same as --plates).")
@click.option(
    "--step",
    "--level",
    "step",
    type=click.Choice(["plate", "batch", "all"]),
    default="all",
    show_default=True,
    help="plate: per-plate levels; batch: batch-level feature selection over the plates; all: both.",
)
@click.option("--jobs", type=int, default=1, show_default=True, help="Plates processed in parallel.")
@click.option("--storage-root", default=None, help="Override CPJUMP1_STORAGE_ROOT.")
@click.option("--config", "config_path", default=None, help="Profiling config (default: pipelines/profiling.yml).")
@click.option("--allow-missing-wells", is_flag=True, help="Accept profiles with fewer wells than the plate map (demo plates).")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete.")
def command(batch, plates, plate_list, step, jobs, storage_root, config_path, allow_missing_wells, force) -> None:
    """pycytominer profiles of a batch's plates (seed file names, %.5g, Parquet twins, QC)."""
    from cpjump1.settings import get_settings

    settings = get_settings(storage_root=storage_root)
    config = load_config(settings, config_path)
    if allow_missing_wells:
        config["annotate"]["require_all_wells"] = False
    chosen = [p for p in (plates.split(",") if plates else []) if p] + list(plate_list)
    out = run_profiles(batch, settings, plates=chosen or None, force=force, step=step, jobs=jobs, config=config)
    for plate, files in out.items():
        for k, v in files.items():
            click.echo(f"{plate} {k}: {v}")


__all__ = [
    "LEVELS",
    "annotate",
    "normalize",
    "spherize",
    "feature_select",
    "negcon_query",
    "load_config",
    "validate_profiles",
    "quality_control",
    "load_for_validation",
    "run_plate",
    "run_batch",
    "run_profiles",
    "Cpjump1Error",
]
