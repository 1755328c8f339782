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

import functools
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import storage
from cpjump1.aggregate import is_feature, read_profile, write_profile
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

    from cpjump1.catalog import PERTURBATION_TABLES

    config = config or load_config(settings)
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


@functools.cache
def _blocklist(path: str) -> tuple[str, ...]:
    lines = [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]
    return tuple(x for x in lines if x != "blocklist")


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
    if np.isnan(x).any():
        c = pairwise_complete_correlation(x)
    else:
        c = np.corrcoef(x.T)
    total = pd.DataFrame(c, index=features, columns=features).abs().sum()
    order = total.sort_values().index
    pos = pd.Series(np.arange(len(order)), index=order).reindex(features).to_numpy()
    with np.errstate(invalid="ignore"):
        a, b = np.nonzero(np.tril(c > threshold, k=-1))
    chosen = np.where(pos[a] > pos[b], a, b)
    return list({features[k] for k in chosen.tolist()})


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
    # one figure, panels side by side in two columns; few tick labels (drawing is the cost)
    ncol = 2
    nrow = (len(candidates) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 3.3 * nrow), squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.97, top=0.93, bottom=0.05, wspace=0.12, hspace=0.3)
    for ax in axes.ravel()[len(candidates):]:
        ax.set_axis_off()
    for ax, feat in zip(axes.ravel(), candidates):
        grid = np.full((16, 24), np.nan)
        vals = counts if feat == "__count__" else df[feat].astype(float)
        r_idx = df["Metadata_Row"].map({r: i for i, r in enumerate(rows)})
        ok = r_idx.notna() & df["Metadata_Col"].between(1, 24)
        grid[r_idx[ok].astype(int).to_numpy(), df["Metadata_Col"][ok].to_numpy() - 1] = vals[ok].to_numpy()
        im = ax.imshow(grid, cmap="viridis", aspect="equal", interpolation="nearest")
        ax.set_xticks([0, 5, 11, 17, 23], ["1", "6", "12", "18", "24"], fontsize=7)
        ax.set_yticks(range(0, 16, 3), list(rows[::3]), fontsize=7)
        title = f"cell count ({count_col})" if feat == "__count__" else feat
        ax.set_title(title, fontsize=8)
        fig.colorbar(im, ax=ax, shrink=0.75)
    fig.suptitle(f"{batch} / {plate}: plate layout (rows A-P × columns 1-24)", fontsize=9)
    urls = {
        "summary": storage.join(out_dir, f"{plate}_qc_summary.json"),
        "wells": storage.join(out_dir, f"{plate}_qc_wells.csv"),
        "heatmaps": storage.join(out_dir, f"{plate}_qc_heatmaps.png"),
    }
    with storage.atomic_path(urls["heatmaps"], settings) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    well_table = df[[c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Row", "Metadata_Col", "Metadata_pert_type", "Metadata_control_type") if c in df]].copy()
    well_table["cell_count"] = counts.to_numpy()
    with storage.atomic_write(urls["wells"], settings, "w") as fh:
        well_table.to_csv(fh, index=False)
    with storage.atomic_write(urls["summary"], settings, "w") as fh:
        json.dump(summary, fh, indent=2)
    return urls


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


def run_plate(batch: str, plate: str, settings: Any, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, str]:
    """The per-plate profiles (annotate, normalize ×2, plate-level feature selection ×2, QC)."""
    import pycytominer  # noqa: F401  (import errors surface before any work)

    config = config or load_config(settings)
    steps = batch_steps(config, batch)
    src = level_url(settings, batch, plate, "aggregated")
    if not storage.exists(src, settings) and not storage.exists(level_url(settings, batch, plate, "aggregated", ".parquet"), settings):
        raise InputDataError(f"plate {batch}/{plate}: aggregated profile {src} not found; run cpjump1 aggregate first")
    stamp_url = src if storage.exists(src, settings) else level_url(settings, batch, plate, "aggregated", ".parquet")
    fp = storage.fingerprint(
        VERSION, storage.file_stamp(stamp_url, settings), _config_digest(config), _metadata_digest(settings, batch, plate, config),
        _pycytominer_version(), steps,
    )
    marker = _marker_url(settings, batch, plate, PLATE_MARKER)
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
    outputs = {lv: level_url(settings, batch, plate, lv) for lv in levels}
    m = _read_marker(marker, settings)
    if not force and m and m.get("fingerprint") == fp and all(storage.exists(u, settings) for u in outputs.values()):
        log.info("plate %s/%s: profiles are complete; skipped", batch, plate)
        return outputs
    t0 = time.time()
    fmt = config["options"]["float_format"]
    level1 = read_profile(src, settings)
    check_input(level1, batch, plate, src)
    # Every level is computed from the previous level *as read back from its CSV*, validated
    # together, and only then written.
    from cpjump1.aggregate import format_csv

    def roundtrip(df: pd.DataFrame) -> pd.DataFrame:
        import io

        return pd.read_csv(io.StringIO(format_csv(df, fmt)))

    frames: dict[str, pd.DataFrame] = {}
    frames["augmented"] = roundtrip(annotate(level1, batch, plate, settings, config, source=src))
    q = negcon_query(config)
    allowed: dict[tuple[str, str], int] = {}
    feats = features_of(frames["augmented"])
    if "normalized" in levels:
        c = config["normalize"]
        frames["normalized"] = roundtrip(normalize(frames["augmented"], samples=c.get("samples", "all"), method=c["method"], epsilon=c["mad_robustize_epsilon"]))
        allowed[(plate, "normalized")] = _zero_mad_features(frames["augmented"], feats)
    if "normalized_negcon" in levels:
        c = config["normalize_negcon"]
        frames["normalized_negcon"] = roundtrip(normalize(frames["augmented"], samples=c.get("samples", q), method=c["method"], epsilon=c["mad_robustize_epsilon"]))
        allowed[(plate, "normalized_negcon")] = _zero_mad_features(frames["augmented"][negcon_mask(frames["augmented"], config, c.get("samples", q))], feats)
    if "feature_select_plate" in levels:
        frames["feature_select_plate"] = feature_select(frames["normalized"], settings, config)
    if "feature_select_negcon_plate" in levels:
        frames["feature_select_negcon_plate"] = feature_select(frames["normalized_negcon"], settings, config)
    exp = expected_wells(settings, batch, plate, config, len(level1))
    validate_profiles({(plate, lv): df for lv, df in frames.items()}, batch, settings, config, allowed, {plate: exp})
    level = config["options"].get("compresslevel", 1)
    for lv, df in frames.items():
        write_profile(df, outputs[lv], settings, fmt, compresslevel=level)
    if "quality_control" in steps:
        outputs.update({f"qc_{k}": v for k, v in quality_control(frames["augmented"], batch, plate, storage.Layout(settings.storage_root).profiles_dir(batch, plate), settings, config).items()})
    _write_marker(
        marker, fp, settings, stage="profiles/plate", levels=levels, seconds=round(time.time() - t0, 2),
        require_all_wells=bool(config["annotate"].get("require_all_wells", True)),
    )
    log.info("plate %s/%s: %s in %.1f s", batch, plate, ", ".join(levels), time.time() - t0)
    return outputs


def run_batch(batch: str, settings: Any, plates: list[str] | None = None, config: dict[str, Any] | None = None, force: bool = False) -> dict[str, dict[str, str]]:
    """Batch-level feature selection: all plates' ``_normalized`` (and ``_normalized_negcon``)
    profiles concatenated, features selected once, written per plate as ``*_batch``."""
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
    frames: dict[tuple[str, str], pd.DataFrame] = {}
    for src, dst in work:
        parts = [read_profile(inputs[(p, src)], settings) for p in plates]
        for p, df in zip(plates, parts, strict=True):
            if "Metadata_Plate" in df and set(df["Metadata_Plate"].astype(str)) != {p}:
                raise InputDataError(f"batch {batch}: {inputs[(p, src)]} holds rows of plate(s) {sorted(set(df['Metadata_Plate'].astype(str)))}, expected {p}")
        combined = pd.concat(parts, ignore_index=True, sort=False)
        meta = [c for c in combined.columns if not is_feature(c)]
        combined = combined[meta + features_of(combined)]
        selected = feature_select(combined, settings, config)
        selected = selected[meta + features_of(selected)]
        bounds = np.cumsum([0] + [len(x) for x in parts])
        for i, p in enumerate(plates):
            frames[(p, dst)] = selected.iloc[bounds[i] : bounds[i + 1]].reset_index(drop=True)
        log.info("batch %s: %s: %d of %d features kept over %d plates", batch, dst, len(features_of(selected)), len(features_of(combined)), len(plates))
        del combined, parts
    exp = {p: expected_wells(settings, batch, p, config, len(frames[(p, work[0][1])])) for p in plates}
    validate_profiles(frames, batch, settings, config, expected_wells=exp)
    level = config["options"].get("compresslevel", 1)
    for (p, dst), df in frames.items():
        write_profile(df, outputs[p][dst], settings, fmt, compresslevel=level)
    for p in plates:
        _write_marker(markers[p], fp, settings, stage="profiles/batch", plates=len(plates), seconds=round(time.time() - t0, 2))
    log.info("batch %s: batch-level feature selection of %d plates in %.1f s", batch, len(plates), time.time() - t0)
    return outputs


def _plate_worker(args):
    batch, plate, settings_dict, config, force = args
    from cpjump1.settings import get_settings

    return plate, run_plate(batch, plate, get_settings(**settings_dict), config, force)


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
        if jobs > 1 and len(plates) > 1:
            sd = settings.model_dump()
            with ProcessPoolExecutor(max_workers=jobs) as ex:
                for plate, res in ex.map(_plate_worker, [(batch, p, sd, config, force) for p in plates]):
                    out[plate] = res
        else:
            from tqdm.auto import tqdm

            for p in tqdm(plates, desc=f"{batch} plates", unit="plate", disable=None):
                out[p] = run_plate(batch, p, settings, config, force)
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
