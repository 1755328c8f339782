"""Benchmark stage: Percent Replicating, Percent Matching and mAP of CPJUMP1 profiles.

Methods (CPJUMP1 paper: Chandrasekaran et al., Nature Methods 2024; metric code in
:mod:`cpjump1.metrics`, mAP through copairs 0.5.5):

* plates are grouped into **experiments** by Batch x Perturbation x Cell_type x Time x Density
  x Antibiotics x Time_delay x Times_imaged (``experiment-metadata.tsv``, read through
  :mod:`cpjump1.catalog`);
* **Percent Replicating** per experiment: median pairwise Pearson correlation of each
  perturbation's wells across the experiment's plates against the 95th percentile of a null
  of equally many wells from different perturbations;
* **Percent Matching** between each compound experiment and each CRISPR / ORF experiment of
  the same batch and cell type: compound-gene pairs through the compound's annotated
  ``target_list``; median cross-correlation of matched pairs against random non-matching pairs;
* **mAP** (copairs): replicate retrieval against same-plate negative controls (cosine), and
  compound-to-gene retrieval on consensus profiles; permutation p-values, Benjamini-Hochberg,
  fraction retrieved at q < 0.05.

Bad input (a single-plate experiment, perturbations without replicates, NaN features,
feature sets that differ across plates) is handled by a rule named in ``tables/issues.csv``
and ``report.md``; nothing is silently turned into a number. Outputs are written atomically
and the folder is finished with a completion marker; a rerun with the same inputs is skipped.

Entry points: :func:`run_benchmark` (Airflow DAG, Python) and the click ``command``
(``cpjump1 benchmark``).
"""

from __future__ import annotations

import io
import logging
import math
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import metrics, storage
from cpjump1.errors import InputDataError

log = logging.getLogger(__name__)

#: Bump when the outputs' meaning changes (part of the completion fingerprint).
BENCHMARK_VERSION = "1"

MODALITIES = {"cellprofiler": "CellProfiler", "deepprofiler": "DeepProfiler"}

#: Preferred profile levels for CellProfiler, best first (seed file names).
CELLPROFILER_SUFFIXES = (
    "_normalized_feature_select_negcon_batch",
    "_normalized_feature_select_negcon_plate",
)
PROFILE_EXTENSIONS = (".parquet", ".csv.gz", ".csv")

EXPERIMENT_KEYS = ("Batch", "Perturbation", "Cell_type", "Time", "Density", "Antibiotics", "Time_delay", "Times_imaged")

#: A well with more than this fraction of NaN features is dropped (then features with any NaN).
MAX_NAN_FRACTION_PER_WELL = 0.5


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class ProfileSource:
    """One plate's profile file."""

    batch: str
    plate: str
    url: str


def _strip_ext(name: str) -> str:
    for ext in PROFILE_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _is_profile_file(name: str) -> bool:
    return name.endswith(PROFILE_EXTENSIONS) and not name.startswith(".")


def _plate_of(url: str) -> tuple[str | None, str]:
    """(batch guess, plate) from ``…/<batch>/<plate>/<plate><suffix>.<ext>``."""
    name = storage.basename(url)
    folder = storage.basename(storage.parent(url))
    grand = storage.basename(storage.parent(storage.parent(url)))
    stem = _strip_ext(name)
    if folder and stem.startswith(folder):
        return grand or None, folder
    return folder or None, stem.split("_")[0]


def _glob(root: str, settings: Any) -> list[str]:
    fs, path = storage.filesystem(root, settings)
    found = fs.glob(path.rstrip("/") + "/**")
    proto = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    out = []
    for f in found:
        if not _is_profile_file(f.rsplit("/", 1)[-1]):
            continue
        out.append(f"{proto}://{f}" if storage.is_remote(root) else f)
    return sorted(out)


def _select(files: list[str], modality: str) -> list[str]:
    """Keep the files of the modality's profile level (one per plate, best level first)."""
    if modality == "deepprofiler":
        return [f for f in files if "_spherized" in storage.basename(f)]
    by_plate: dict[tuple[str | None, str], dict[str, str]] = {}
    for f in files:
        stem = _strip_ext(storage.basename(f))
        for suffix in CELLPROFILER_SUFFIXES:
            if stem.endswith(suffix):
                by_plate.setdefault(_plate_of(f), {}).setdefault(suffix, f)
                # parquet twins are listed before csv by PROFILE_EXTENSIONS order below
    chosen = []
    for _key, levels in sorted(by_plate.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        for suffix in CELLPROFILER_SUFFIXES:
            if suffix in levels:
                chosen.append(levels[suffix])
                break
    return chosen


def _prefer_parquet(files: list[str]) -> list[str]:
    stems = {}
    for f in files:
        key = _strip_ext(f)
        rank = next(i for i, e in enumerate(PROFILE_EXTENSIONS) if f.endswith(e))
        if key not in stems or rank < stems[key][0]:
            stems[key] = (rank, f)
    return sorted(v[1] for v in stems.values())


def discover_profiles(paths: Sequence[str], modality: str, settings: Any, catalog: Any) -> list[ProfileSource]:
    """The profile files to benchmark: explicit files as given, roots searched recursively.

    For CellProfiler a root yields one file per plate, ``<plate>_normalized_feature_select_negcon_batch``
    else ``…_negcon_plate``; for DeepProfiler the ``*_spherized*`` files. The batch of a plate is
    its grandparent folder when that is a known batch, else the unique batch of the barcode
    in the catalog.
    """
    if modality not in MODALITIES:
        raise InputDataError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    files: list[str] = []
    for p in paths:
        fs, path = storage.filesystem(p, settings)
        if not fs.exists(path):
            raise InputDataError(f"{p}: no such profiles file or folder")
        if fs.isdir(path):
            found = _select(_prefer_parquet(_glob(p, settings)), modality)
            if not found:
                want = "*_spherized*" if modality == "deepprofiler" else " or ".join(
                    f"<plate>{s}{{.parquet,.csv.gz}}" for s in CELLPROFILER_SUFFIXES
                )
                raise InputDataError(f"{p}: no {MODALITIES[modality]} profiles found (looked for {want})")
            files.extend(found)
        else:
            files.append(p)
    sources = []
    seen: dict[tuple[str, str], str] = {}
    for f in files:
        batch_guess, plate = _plate_of(f)
        batch = _resolve_batch(batch_guess, plate, f, catalog)
        if (batch, plate) in seen:
            raise InputDataError(f"plate {batch}/{plate} given twice: {seen[(batch, plate)]} and {f}")
        seen[(batch, plate)] = f
        sources.append(ProfileSource(batch, plate, f))
    return sources


def _resolve_batch(batch_guess: str | None, plate: str, url: str, catalog: Any) -> str:
    if batch_guess and batch_guess in catalog.batches:
        catalog.plate(batch_guess, plate)  # raises UnknownNameError naming the plate
        return batch_guess
    batches = [b for b, info in catalog.batches.items() if plate in info.plates]
    if len(batches) == 1:
        return batches[0]
    if not batches:
        raise InputDataError(f"{url}: plate {plate!r} is not in experiment-metadata.tsv of any batch")
    raise InputDataError(
        f"{url}: plate {plate!r} is in several batches ({', '.join(batches)}); "
        "put the file under <batch>/<plate>/ so the batch is known"
    )


# --------------------------------------------------------------------------- loading


@dataclass
class PlateProfiles:
    source: ProfileSource
    meta: pd.DataFrame  # Metadata_Plate, Metadata_Well, Metadata_broad_sample, Metadata_gene, is_negcon, is_treated
    X: pd.DataFrame  # features (float32), index aligned with meta


def _read_table(url: str, settings: Any) -> pd.DataFrame:
    with storage.open_file(url, "rb", settings) as fh:
        data = fh.read()
    buf = io.BytesIO(data)
    try:
        if url.endswith(".parquet"):
            return pd.read_parquet(buf)
        return pd.read_csv(buf, compression="gzip" if url.endswith(".gz") else None, low_memory=False)
    except Exception as exc:  # corrupt file, wrong format
        raise InputDataError(f"{url}: cannot read profiles: {exc}") from exc


def _blank(series: pd.Series) -> pd.Series:
    s = series.astype("string").fillna("").str.strip()
    return s.mask(s.str.lower().isin(["nan", "none"]), "")


def load_plate(source: ProfileSource, settings: Any, catalog: Any) -> PlateProfiles:
    """Read one plate's profiles and annotate what the metrics need.

    Missing ``Metadata_broad_sample`` / ``Metadata_control_type`` / ``Metadata_gene`` are
    filled from the plate map and perturbation metadata through ``Metadata_Well``.
    Negative controls: ``Metadata_control_type == "negcon"``; on compound plates also the
    wells without ``broad_sample`` (DMSO). Other wells without ``broad_sample`` are neither
    treated nor controls and are not used.
    """
    df = _read_table(source.url, settings)
    plate_info = catalog.plate(source.batch, source.plate)
    meta_cols = [c for c in df.columns if str(c).startswith("Metadata_")]
    feat_cols = [c for c in df.columns if not str(c).startswith("Metadata_")]
    if not feat_cols:
        raise InputDataError(f"{source.url}: no feature columns (every column starts with Metadata_)")
    dtypes = df.dtypes
    bad = [c for c in feat_cols if not pd.api.types.is_numeric_dtype(dtypes[c])]
    if bad:
        raise InputDataError(f"{source.url}: non-numeric feature column(s): {', '.join(map(str, bad[:5]))}")
    if "Metadata_Plate" in df:
        plates = set(_blank(df["Metadata_Plate"]).unique()) - {""}
        if plates and plates != {source.plate}:
            raise InputDataError(
                f"{source.url}: Metadata_Plate is {', '.join(sorted(plates))} but the file is for plate {source.plate}"
            )
    meta = pd.DataFrame(index=df.index)
    meta["Metadata_Plate"] = source.plate
    meta["Metadata_Batch"] = source.batch
    if "Metadata_Well" in df:
        meta["Metadata_Well"] = _blank(df["Metadata_Well"])
        dup = meta["Metadata_Well"][meta["Metadata_Well"].duplicated() & (meta["Metadata_Well"] != "")]
        if len(dup):
            raise InputDataError(f"{source.url}: well(s) listed twice: {', '.join(dup.unique()[:10])}")
    else:
        meta["Metadata_Well"] = ""
    wells = None
    need_map = any(c not in meta_cols for c in ("Metadata_broad_sample", "Metadata_control_type")) or (
        plate_info.perturbation != "compound" and "Metadata_gene" not in meta_cols
    )
    if need_map:
        if "Metadata_Well" not in df:
            raise InputDataError(
                f"{source.url}: needs Metadata_broad_sample and Metadata_control_type, or Metadata_Well to "
                "annotate them from the plate map"
            )
        wells = {w.well: w for w in catalog.wells(source.batch, source.plate)}
    for col, attr in (("Metadata_broad_sample", "broad_sample"), ("Metadata_control_type", "control_type"), ("Metadata_gene", "gene")):
        if col in df:
            meta[col] = _blank(df[col])
        elif wells is not None:
            meta[col] = [getattr(wells[w], attr) if w in wells else "" for w in meta["Metadata_Well"]]
        else:
            meta[col] = ""
    negcon = meta["Metadata_control_type"].str.lower() == "negcon"
    if plate_info.perturbation == "compound":
        negcon |= meta["Metadata_broad_sample"] == ""
    meta["is_negcon"] = negcon.to_numpy(bool)
    meta["is_treated"] = (~negcon & (meta["Metadata_broad_sample"] != "")).to_numpy(bool)
    values = df[feat_cols].to_numpy(np.float32, copy=True)  # Arrow-backed frames can give read-only views
    values[~np.isfinite(values)] = np.nan
    X = pd.DataFrame(values, columns=feat_cols)
    return PlateProfiles(source, meta.reset_index(drop=True), X)


# --------------------------------------------------------------------------- experiments


@dataclass
class Issue:
    """One bad-input finding and the rule applied to it."""

    level: str  # "warning" (handled, numbers still computed) or "skipped" (metric not computed)
    experiment: str
    plate: str
    what: str
    detail: str


@dataclass
class Experiment:
    key: dict[str, Any]
    name: str
    plates: list[PlateProfiles]
    meta: pd.DataFrame | None = None
    X: np.ndarray | None = None
    features: list[str] = field(default_factory=list)
    status: str = "ok"

    @property
    def perturbation(self) -> str:
        return str(self.key["Perturbation"])


def experiment_name(key: dict[str, Any], several_batches: bool) -> str:
    parts = [str(key["Perturbation"]), str(key["Cell_type"]), f"{key['Time']}h"]
    if str(key["Density"]) not in ("100", ""):
        parts.append(f"density{key['Density']}")
    if str(key["Antibiotics"]) not in ("absent", ""):
        parts.append(str(key["Antibiotics"]))
    if str(key["Time_delay"]) not in ("Day0", ""):
        parts.append(str(key["Time_delay"]))
    if str(key["Times_imaged"]) not in ("1", ""):
        parts.append(f"imaged{key['Times_imaged']}x")
    name = "_".join(parts)
    return f"{key['Batch']}:{name}" if several_batches else name


def group_experiments(plates: list[PlateProfiles], catalog: Any) -> list[Experiment]:
    """Group plates into experiments by the EXPERIMENT_KEYS of experiment-metadata.tsv."""
    groups: dict[tuple, list[PlateProfiles]] = {}
    keys: dict[tuple, dict[str, Any]] = {}
    for p in plates:
        info = catalog.plate(p.source.batch, p.source.plate)
        key = {
            "Batch": info.batch,
            "Perturbation": info.perturbation,
            "Cell_type": info.cell_type,
            "Time": info.time,
            "Density": info.density,
            "Antibiotics": info.antibiotics,
            "Time_delay": info.time_delay,
            "Times_imaged": info.times_imaged,
        }
        t = tuple(key[k] for k in EXPERIMENT_KEYS)
        groups.setdefault(t, []).append(p)
        keys[t] = key
    several = len({k[0] for k in groups}) > 1
    out = [Experiment(key=keys[t], name=experiment_name(keys[t], several), plates=sorted(g, key=lambda p: p.source.plate)) for t, g in groups.items()]
    return sorted(out, key=lambda e: (e.key["Batch"], e.perturbation, e.key["Cell_type"], e.key["Time"], e.name))


def prepare_experiment(exp: Experiment, issues: list[Issue]) -> None:
    """Concatenate an experiment's plates on their common features and clean NaN, explicitly.

    Rules (each logged in ``issues``): features missing on some plate are dropped (only the
    intersection is comparable); wells with more than half their features NaN are dropped;
    then features with any remaining NaN are dropped; wells with zero variance are dropped.
    """
    feature_sets = [list(p.X.columns) for p in exp.plates]
    common = set(feature_sets[0]).intersection(*feature_sets[1:])
    union = set().union(*feature_sets)
    if common != union:
        for p, fs in zip(exp.plates, feature_sets, strict=True):
            missing = len(union) - len(set(fs) & union)
            if missing or len(fs) != len(common):
                issues.append(
                    Issue(
                        "warning",
                        exp.name,
                        p.source.plate,
                        "feature sets differ across plates",
                        f"{len(fs)} features, {len(set(fs) - common)} not on every plate of the experiment; "
                        f"metrics use the {len(common)} common features",
                    )
                )
    if not common:
        exp.status = "no common features"
        issues.append(Issue("skipped", exp.name, "", "no common features", "the plates share no feature column"))
        return
    features = [f for f in feature_sets[0] if f in common]
    meta = pd.concat([p.meta for p in exp.plates], ignore_index=True)
    X = pd.concat([p.X[features] for p in exp.plates], ignore_index=True).to_numpy(np.float64)
    nan = np.isnan(X)
    if nan.any():
        frac = nan.mean(axis=1)
        bad_rows = frac > MAX_NAN_FRACTION_PER_WELL
        if bad_rows.any():
            for plate, sub in meta[bad_rows].groupby("Metadata_Plate"):
                issues.append(
                    Issue(
                        "warning",
                        exp.name,
                        str(plate),
                        "NaN features",
                        f"{len(sub)} well(s) with > {MAX_NAN_FRACTION_PER_WELL:.0%} NaN features dropped: "
                        + ", ".join(sub["Metadata_Well"].astype(str).head(10)),
                    )
                )
            keep = ~bad_rows
            meta, X = meta[keep].reset_index(drop=True), X[keep]
        col_nan = np.isnan(X).any(axis=0)
        if col_nan.any():
            names = [f for f, b in zip(features, col_nan, strict=True) if b]
            issues.append(
                Issue(
                    "warning",
                    exp.name,
                    "",
                    "NaN features",
                    f"{len(names)} feature(s) with NaN in some well dropped: {', '.join(names[:5])}"
                    + (" …" if len(names) > 5 else ""),
                )
            )
            features = [f for f, b in zip(features, col_nan, strict=True) if not b]
            X = X[:, ~col_nan]
    if not features:
        exp.status = "no usable features"
        issues.append(Issue("skipped", exp.name, "", "NaN features", "no feature is free of NaN"))
        return
    flat = X.std(axis=1) == 0
    if flat.any():
        issues.append(
            Issue("warning", exp.name, "", "constant wells", f"{int(flat.sum())} well(s) with identical values in every feature dropped")
        )
        meta, X = meta[~flat].reset_index(drop=True), X[~flat]
    exp.meta, exp.X, exp.features = meta, X.astype(np.float32), features
    if len(exp.plates) < 2:
        exp.status = "single plate"
        issues.append(
            Issue(
                "skipped",
                exp.name,
                exp.plates[0].source.plate,
                "single-plate experiment",
                "replicates are compared across an experiment's plates; Percent Replicating and replicate mAP "
                "are not computed (matching still uses its wells)",
            )
        )


# --------------------------------------------------------------------------- metrics per experiment


def _attrs(exp: Experiment, modality: str) -> dict[str, Any]:
    return {
        "Modality": MODALITIES[modality],
        "Perturbation": exp.perturbation,
        "Cell_type": exp.key["Cell_type"],
        "Time": exp.key["Time"],
    }


def _extra(exp: Experiment) -> dict[str, Any]:
    return {
        "Batch": exp.key["Batch"],
        "Density": exp.key["Density"],
        "Antibiotics": exp.key["Antibiotics"],
        "Time_delay": exp.key["Time_delay"],
        "Times_imaged": exp.key["Times_imaged"],
        "experiment": exp.name,
        "n_plates": len(exp.plates),
        "plates": " ".join(p.source.plate for p in exp.plates),
    }


@dataclass
class Results:
    pr: list[dict] = field(default_factory=list)
    rep_corr: list[pd.DataFrame] = field(default_factory=list)
    nulls: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    pm: list[dict] = field(default_factory=list)
    match_corr: list[pd.DataFrame] = field(default_factory=list)
    pm_nulls: dict[str, tuple[np.ndarray, np.ndarray, float, float]] = field(default_factory=dict)
    map_rows: list[pd.DataFrame] = field(default_factory=list)
    map_summary: list[dict] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)


def replicate_metrics(exp: Experiment, modality: str, null_size: int, seed: int, res: Results) -> None:
    """Percent Replicating and replicate-retrieval mAP of one prepared experiment."""
    attrs, extra = _attrs(exp, modality), _extra(exp)
    row: dict[str, Any] = {**attrs, "n_perturbations": 0, "null_95th": math.nan, "percent_replicating": math.nan, **extra}
    row.update(n_wells=0, n_features=len(exp.features), n_unreplicated=0, null_replicates=0, status=exp.status)
    if exp.status != "ok":
        res.pr.append(row)
        res.map_summary.append({**attrs, "metric": "replicate_retrieval", **extra, "n_perturbations": 0, "n_retrieved": 0,
                                "fraction_retrieved": math.nan, "mean_mAP": math.nan, "status": exp.status})
        return
    meta, X = exp.meta, exp.X
    treated = meta["is_treated"].to_numpy()
    labels = meta.loc[treated, "Metadata_broad_sample"].to_numpy()
    Z = metrics.standardize_rows(X[treated])
    pr = metrics.percent_replicating(Z, labels, null_size=null_size, seed=seed)
    row.update(
        n_perturbations=pr.n_perturbations,
        null_95th=pr.null_95th,
        percent_replicating=pr.percent_replicating,
        n_wells=int(treated.sum()),
        n_unreplicated=pr.n_unreplicated,
        null_replicates=pr.modal_replicates,
    )
    if pr.n_unreplicated:
        singles = pr.table.loc[pr.table["n_replicates"] < 2, "label"].astype(str).tolist()
        res.issues.append(
            Issue("warning", exp.name, "", "perturbations without replicates",
                  f"{len(singles)} perturbation(s) with a single well excluded from Percent Replicating and mAP: "
                  + ", ".join(singles[:10]) + (" …" if len(singles) > 10 else ""))
        )
    if pr.n_perturbations == 0:
        row["status"] = "no replicated perturbations"
        res.issues.append(Issue("skipped", exp.name, "", "no replicated perturbations", "no perturbation has two wells"))
    res.pr.append(row)
    t = pr.table.rename(columns={"label": "Metadata_broad_sample"})
    t.insert(0, "Modality", attrs["Modality"])
    t.insert(1, "Perturbation", attrs["Perturbation"])
    t.insert(2, "Cell_type", attrs["Cell_type"])
    t.insert(3, "Time", attrs["Time"])
    t = t[["Modality", "Perturbation", "Cell_type", "Time", "Metadata_broad_sample", "median_replicate_correlation",
           "n_replicates", "null_95th", "replicating"]]
    t["experiment"] = exp.name
    t["Batch"] = exp.key["Batch"]
    res.rep_corr.append(t)
    if pr.modal_replicates:
        res.nulls[exp.name] = (pr.nulls[pr.modal_replicates], pr.null_95th)

    # mAP: treated wells query replicates vs same-plate negative controls
    use = treated | meta["is_negcon"].to_numpy()
    sub = meta.loc[use, ["Metadata_broad_sample", "Metadata_Plate", "is_negcon"]].reset_index(drop=True)
    summary = {**attrs, "metric": "replicate_retrieval", **extra, "n_perturbations": 0, "n_retrieved": 0,
               "fraction_retrieved": math.nan, "mean_mAP": math.nan, "status": "ok"}
    plates_without_negcon = sorted(set(sub["Metadata_Plate"]) - set(sub.loc[sub["is_negcon"], "Metadata_Plate"]))
    if plates_without_negcon:
        res.issues.append(Issue("warning", exp.name, " ".join(plates_without_negcon), "no negative controls",
                                "plate(s) without negative-control wells: their wells have no negatives for mAP"))
    ap = metrics.replicate_average_precision(
        sub, X[use], label_col="Metadata_broad_sample", plate_col="Metadata_Plate", negcon_col="is_negcon"
    )
    m = metrics.mean_average_precision(ap, "Metadata_broad_sample", null_size=null_size, seed=seed)
    if len(m):
        m.insert(0, "Modality", attrs["Modality"])
        m.insert(1, "metric", "replicate_retrieval")
        m.insert(2, "experiment", exp.name)
        m.insert(3, "Perturbation", attrs["Perturbation"])
        m.insert(4, "Cell_type", attrs["Cell_type"])
        m.insert(5, "Time", attrs["Time"])
        m["Batch"] = exp.key["Batch"]
        res.map_rows.append(m)
        summary.update(n_perturbations=len(m), n_retrieved=int(m["retrieved"].sum()),
                       fraction_retrieved=float(m["retrieved"].mean()), mean_mAP=float(m["mean_average_precision"].mean()))
    else:
        summary["status"] = "no perturbation with replicates and negative controls"
    res.map_summary.append(summary)


def load_targets(catalog: Any) -> dict[str, list[str]]:
    """broad_sample -> annotated target genes (``target_list``, pipe-separated)."""
    table = catalog.compound_targets()
    out: dict[str, list[str]] = {}
    for bs, tl in zip(table["broad_sample"], table["target_list"], strict=True):
        genes = [g.strip() for g in str(tl or "").split("|") if g.strip() and g.strip().lower() != "nan"]
        out.setdefault(str(bs), [])
        out[str(bs)] = sorted(set(out[str(bs)]) | set(genes))
    return out


def matching_metrics(comp: Experiment, gen: Experiment, targets: dict[str, list[str]], modality: str,
                     null_size: int, seed: int, res: Results) -> None:
    """Percent Matching and compound-to-gene mAP between a compound and a genetic experiment."""
    name = f"{comp.name} ~ {gen.name}"
    row: dict[str, Any] = {
        "Modality": MODALITIES[modality],
        "Batch": comp.key["Batch"],
        "Cell_type": comp.key["Cell_type"],
        "Compound_Time": comp.key["Time"],
        "Genetic_Perturbation": gen.perturbation,
        "Genetic_Time": gen.key["Time"],
        "compound_experiment": comp.name,
        "genetic_experiment": gen.name,
        "n_pairs": 0,
        "n_compounds": 0,
        "null_95th": math.nan,
        "null_5th": math.nan,
        "percent_matching": math.nan,
        "percent_anti_matching": math.nan,
        "n_features": 0,
        "status": "ok",
    }
    if comp.meta is None or gen.meta is None:
        row["status"] = "experiment not usable"
        res.pm.append(row)
        return
    common = [f for f in comp.features if f in set(gen.features)]
    if len(common) < len(set(comp.features) | set(gen.features)):
        res.issues.append(Issue("warning", name, "", "feature sets differ across experiments",
                                f"{len(comp.features)} vs {len(gen.features)} features; matching uses the {len(common)} common ones"))
    row["n_features"] = len(common)
    if not common:
        row["status"] = "no common features"
        res.issues.append(Issue("skipped", name, "", "no common features", "the two experiments share no feature"))
        res.pm.append(row)
        return
    ci = [comp.features.index(f) for f in common]
    gi = [gen.features.index(f) for f in common]
    cmask = comp.meta["is_treated"].to_numpy()
    gmeta = gen.meta
    gmask = gmeta["is_treated"].to_numpy() & (gmeta["Metadata_gene"] != "").to_numpy()
    Xc, Xg = comp.X[cmask][:, ci], gen.X[gmask][:, gi]
    clabels = comp.meta.loc[cmask, "Metadata_broad_sample"].to_numpy()
    glabels = gmeta.loc[gmask, "Metadata_gene"].to_numpy()
    pm = metrics.percent_matching(metrics.standardize_rows(Xc), clabels, metrics.standardize_rows(Xg), glabels, targets,
                                  null_size=null_size, seed=seed)
    row.update(n_pairs=pm.n_pairs, n_compounds=pm.n_compounds, null_95th=pm.null_95th, null_5th=pm.null_5th,
               percent_matching=pm.percent_matching, percent_anti_matching=pm.percent_anti_matching)
    if pm.n_pairs == 0:
        row["status"] = "no compound-gene pair"
        res.issues.append(Issue("skipped", name, "", "no compound-gene pair",
                                "no compound of the experiment targets a gene of the genetic experiment"))
    res.pm.append(row)
    if len(pm.table):
        t = pm.table.rename(columns={"compound": "Metadata_broad_sample", "gene": "Metadata_gene"})
        t.insert(0, "Modality", MODALITIES[modality])
        t.insert(1, "compound_experiment", comp.name)
        t.insert(2, "genetic_experiment", gen.name)
        res.match_corr.append(t)
        res.pm_nulls[name] = (pm.null, pm.table["median_cross_correlation"].to_numpy(), pm.null_95th, pm.null_5th)

    # mAP of compound -> gene retrieval on consensus (median) profiles
    summary = {"Modality": MODALITIES[modality], "Perturbation": f"compound~{gen.perturbation}", "Cell_type": comp.key["Cell_type"],
               "Time": f"{comp.key['Time']}~{gen.key['Time']}", "metric": "compound_gene_matching", "Batch": comp.key["Batch"],
               "experiment": name, "n_plates": len(comp.plates) + len(gen.plates),
               "plates": " ".join(p.source.plate for p in comp.plates + gen.plates),
               "n_perturbations": 0, "n_retrieved": 0, "fraction_retrieved": math.nan, "mean_mAP": math.nan, "status": "ok"}
    if pm.n_pairs:
        cons_c = pd.DataFrame(Xc, columns=common).groupby(clabels, sort=True).median()
        cons_g = pd.DataFrame(Xg, columns=common).groupby(glabels, sort=True).median()
        ap = metrics.matching_average_precision(cons_c, cons_g, targets)
        m = metrics.mean_average_precision(ap, "compound", null_size=null_size, seed=seed)
        if len(m):
            m = m.rename(columns={"compound": "Metadata_broad_sample"})
            m.insert(0, "Modality", MODALITIES[modality])
            m.insert(1, "metric", "compound_gene_matching")
            m.insert(2, "experiment", name)
            m.insert(3, "Perturbation", summary["Perturbation"])
            m.insert(4, "Cell_type", comp.key["Cell_type"])
            m.insert(5, "Time", summary["Time"])
            m["Batch"] = comp.key["Batch"]
            res.map_rows.append(m)
            summary.update(n_perturbations=len(m), n_retrieved=int(m["retrieved"].sum()),
                           fraction_retrieved=float(m["retrieved"].mean()), mean_mAP=float(m["mean_average_precision"].mean()))
    else:
        summary["status"] = "no compound-gene pair"
    res.map_summary.append(summary)


# --------------------------------------------------------------------------- outputs


PR_COLUMNS = ["Modality", "Perturbation", "Cell_type", "Time", "n_perturbations", "null_95th", "percent_replicating"]
REP_COLUMNS = ["Modality", "Perturbation", "Cell_type", "Time", "Metadata_broad_sample", "median_replicate_correlation"]


def _frame(rows: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df if len(df.columns) else pd.DataFrame(columns=list(columns))


def build_tables(res: Results) -> dict[str, pd.DataFrame]:
    pr = _frame(res.pr, PR_COLUMNS)
    rep = pd.concat(res.rep_corr, ignore_index=True) if res.rep_corr else pd.DataFrame(columns=REP_COLUMNS)
    pm = _frame(res.pm, ["Modality", "Cell_type", "n_pairs", "percent_matching"])
    mc = pd.concat(res.match_corr, ignore_index=True) if res.match_corr else pd.DataFrame(
        columns=["Modality", "compound_experiment", "genetic_experiment", "Metadata_broad_sample", "Metadata_gene",
                 "median_cross_correlation", "matching", "anti_matching"])
    mp = pd.concat(res.map_rows, ignore_index=True) if res.map_rows else pd.DataFrame(
        columns=["Modality", "metric", "experiment", "Perturbation", "Cell_type", "Time", "Metadata_broad_sample",
                 "mean_average_precision", "p_value", "corrected_p_value", "retrieved"])
    ms = _frame(res.map_summary, ["Modality", "metric", "experiment", "fraction_retrieved"])
    issues = pd.DataFrame([vars(i) for i in res.issues], columns=["level", "experiment", "plate", "what", "detail"])
    return {
        "percent_replicating": pr,
        "replicate_correlation": rep,
        "percent_matching": pm,
        "matching_correlation": mc,
        "map": mp,
        "map_summary": ms,
        "issues": issues,
    }


def _plot_figures(res: Results, tables: dict[str, pd.DataFrame], folder: Path) -> list[str]:
    """Write the PNG figures into the local ``folder``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    pr = tables["percent_replicating"]
    rep = tables["replicate_correlation"]
    exps = [e for e in pr["experiment"] if e in res.nulls] if len(pr) else []
    if exps:
        ncol = min(3, len(exps))
        nrow = math.ceil(len(exps) / ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
        for ax, e in zip(axes.ravel(), exps, strict=False):
            null, thr = res.nulls[e]
            vals = rep.loc[rep["experiment"] == e, "median_replicate_correlation"].dropna()
            bins = np.linspace(min(null.min(), vals.min() if len(vals) else 0), max(null.max(), vals.max() if len(vals) else 1), 40)
            ax.hist(null, bins=bins, density=True, alpha=0.5, color="grey", label="null")
            ax.hist(vals, bins=bins, density=True, alpha=0.6, color="tab:blue", label="replicates")
            ax.axvline(thr, color="k", ls="--", lw=1, label="null 95th")
            p = pr.loc[pr["experiment"] == e, "percent_replicating"].iloc[0]
            ax.set_title(f"{e}\nPR = {p:.1f}%", fontsize=9)
            ax.set_xlabel("median replicate correlation", fontsize=8)
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(exps):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / "replicate_correlation.png", dpi=110)
        plt.close(fig)
        names.append("replicate_correlation.png")
    ok = pr.dropna(subset=["percent_replicating"]) if len(pr) else pr
    if len(ok):
        fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(ok) + 1.2))
        ax.barh(ok["experiment"], ok["percent_replicating"], color="tab:blue")
        for y, v in enumerate(ok["percent_replicating"]):
            ax.text(v + 1, y, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlim(0, 110)
        ax.set_xlabel("Percent Replicating (%)")
        ax.invert_yaxis()
        ax.set_title(f"Percent Replicating by experiment ({ok['Modality'].iloc[0]})", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "percent_replicating.png", dpi=110)
        plt.close(fig)
        names.append("percent_replicating.png")
    mp = tables["map"]
    if len(mp):
        metrics_present = list(dict.fromkeys(mp["metric"]))
        fig, axes = plt.subplots(1, len(metrics_present), figsize=(5.5 * len(metrics_present), 4.2), squeeze=False)
        for ax, met in zip(axes.ravel(), metrics_present, strict=True):
            sub = mp[mp["metric"] == met]
            for e, g in sub.groupby("experiment", sort=False):
                ax.scatter(g["mean_average_precision"], -np.log10(g["corrected_p_value"].astype(float)), s=9, alpha=0.6, label=e)
            ax.axhline(-np.log10(metrics.ALPHA), color="k", ls="--", lw=1)
            ax.set_xlabel("mAP")
            ax.set_ylabel("−log10 corrected p-value")
            ax.set_title(met.replace("_", " "), fontsize=10)
            if sub["experiment"].nunique() <= 12:
                ax.legend(fontsize=6, markerscale=1.5)
        fig.tight_layout()
        fig.savefig(folder / "map_pvalue.png", dpi=110)
        plt.close(fig)
        names.append("map_pvalue.png")
    pm = tables["percent_matching"]
    okm = pm.dropna(subset=["percent_matching"]) if len(pm) else pm
    if len(okm):
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(okm) + 1.2))
        lab = okm["compound_experiment"] + " ~ " + okm["genetic_experiment"]
        ax.barh(lab, okm["percent_matching"], color="tab:green", label="> null 95th")
        ax.barh(lab, okm["percent_anti_matching"], left=okm["percent_matching"], color="tab:orange", label="< null 5th")
        ax.set_xlabel("Percent Matching (%)")
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "percent_matching.png", dpi=110)
        plt.close(fig)
        names.append("percent_matching.png")
    return names


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.1f}"
    return str(x)


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_"
    return df.map(_fmt).to_markdown(index=False)


def render_report(tables: dict[str, pd.DataFrame], figures: list[str], sources: list[ProfileSource], modality: str,
                  null_size: int, seed: int, elapsed: float) -> str:
    pr, pm, ms, issues = tables["percent_replicating"], tables["percent_matching"], tables["map_summary"], tables["issues"]
    lines = [
        f"# CPJUMP1 benchmark — {MODALITIES[modality]}",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `cpjump1 benchmark` "
        f"(null size {null_size}, seed {seed}, {elapsed:.1f} s). {len(sources)} plate(s):",
        "",
        ", ".join(f"{s.batch}/{s.plate}" for s in sources),
        "",
        "Methods: CPJUMP1 paper (Chandrasekaran et al., Nature Methods 2024); mAP with copairs 0.5.5. "
        "Percent Replicating = percent of perturbations whose median pairwise Pearson correlation across the "
        "experiment's plates exceeds the 95th percentile of a null of equally many wells from different "
        "perturbations. Percent Matching = percent of compound–gene pairs (compound target annotations) whose "
        "median cross-correlation exceeds the 95th percentile of random non-matching pairs (anti-matching: below "
        "the 5th). mAP: replicate retrieval against same-plate negative controls (cosine), and compound→gene "
        "retrieval on consensus profiles; permutation p-values, Benjamini–Hochberg per experiment, retrieved = "
        "q < 0.05.",
        "",
        "## Percent Replicating",
        "",
        _md(pr[[c for c in ["experiment", "n_plates", "n_perturbations", "n_unreplicated", "null_95th", "percent_replicating", "status"] if c in pr]]),
        "",
        "Table: [tables/percent_replicating.csv](tables/percent_replicating.csv); per perturbation: "
        "[tables/replicate_correlation.csv](tables/replicate_correlation.csv).",
        "",
    ]
    if "replicate_correlation.png" in figures:
        lines += ["![replicate correlation against its null](figures/replicate_correlation.png)", ""]
    if "percent_replicating.png" in figures:
        lines += ["![Percent Replicating by experiment](figures/percent_replicating.png)", ""]
    lines += ["## Percent Matching", ""]
    if len(pm):
        lines += [_md(pm[["compound_experiment", "genetic_experiment", "n_pairs", "null_95th", "percent_matching", "percent_anti_matching", "status"]]), ""]
    else:
        lines += ["Not computed: Percent Matching needs a compound experiment and a CRISPR or ORF experiment of the "
                  "same batch and cell type among the inputs.", ""]
    lines += ["Table: [tables/percent_matching.csv](tables/percent_matching.csv); per pair: "
              "[tables/matching_correlation.csv](tables/matching_correlation.csv).", ""]
    if "percent_matching.png" in figures:
        lines += ["![Percent Matching](figures/percent_matching.png)", ""]
    lines += ["## mAP", "", _md(ms[[c for c in ["metric", "experiment", "n_perturbations", "n_retrieved", "fraction_retrieved", "mean_mAP", "status"] if c in ms]]), "",
              "Tables: [tables/map.csv](tables/map.csv) (per perturbation), [tables/map_summary.csv](tables/map_summary.csv).", ""]
    if "map_pvalue.png" in figures:
        lines += ["![mAP against -log10 p](figures/map_pvalue.png)", ""]
    lines += ["## Input problems and how they were handled", ""]
    lines += [_md(issues) if len(issues) else "None found: every experiment had several plates, replicated "
              "perturbations, identical feature sets and no NaN.", "", "Table: [tables/issues.csv](tables/issues.csv).", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stage


@dataclass
class BenchmarkOutputs:
    out: str
    skipped: bool
    tables: dict[str, str]
    figures: list[str]
    report: str
    summary: dict[str, Any]


def _fingerprint(sources: list[ProfileSource], modality: str, null_size: int, seed: int, settings: Any) -> str:
    stamps = [(s.batch, s.plate, s.url, storage.file_stamp(s.url, settings)) for s in sources]
    return storage.fingerprint(BENCHMARK_VERSION, modality, null_size, seed, stamps)


def run_benchmark(
    profiles: str | Sequence[str],
    out: str,
    settings: Any,
    modality: str = "cellprofiler",
    null_size: int = 1000,
    seed: int = 0,
    force: bool = False,
) -> BenchmarkOutputs:
    """Benchmark profiles: Percent Replicating, Percent Matching and mAP, with tables, figures and a report.

    ``profiles`` are profile files and/or roots (searched recursively; see
    :func:`discover_profiles`); ``out`` a local folder or URL that receives ``tables/``,
    ``figures/``, ``report.md`` and a completion marker. A rerun whose inputs and parameters
    match the marker returns without recomputing (``force`` recomputes).
    """
    from cpjump1.catalog import load_catalog

    if null_size < 20:
        raise InputDataError(f"--null-size {null_size} is too small for a 95th percentile (use ≥ 20)")
    if isinstance(profiles, str):
        profiles = [profiles]
    catalog = load_catalog(settings.metadata_dir)
    sources = discover_profiles(list(profiles), modality, settings, catalog)
    fp = _fingerprint(sources, modality, null_size, seed, settings)
    table_urls = {n: storage.join(out, "tables", f"{n}.csv") for n in
                  ("percent_replicating", "replicate_correlation", "percent_matching", "matching_correlation", "map", "map_summary", "issues")}
    report_url = storage.join(out, "report.md")
    if not force and storage.marker_matches(out, fp, settings):
        marker = storage.read_marker(out, settings) or {}
        log.info("benchmark outputs in %s are complete for these inputs; skipping", out)
        return BenchmarkOutputs(out, True, table_urls, marker.get("figures", []), report_url, marker.get("summary", {}))
    started = time.perf_counter()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):  # type: ignore[no-redef]
            return x
    plates = [load_plate(s, settings, catalog) for s in tqdm(sources, desc="reading profiles", leave=False)]
    log.info("read %d plate(s) of %s profiles", len(plates), MODALITIES[modality])
    experiments = group_experiments(plates, catalog)
    res = Results()
    for exp in experiments:
        prepare_experiment(exp, res.issues)
        for p in exp.plates:  # the experiment holds the (cleaned) values now
            p.X = p.X.iloc[:0]
    for exp in tqdm(experiments, desc="replicates", leave=False):
        log.info("experiment %s: %d plate(s)", exp.name, len(exp.plates))
        replicate_metrics(exp, modality, null_size, seed, res)
    targets = load_targets(catalog)
    pairs = [(c, g) for c in experiments if c.perturbation == "compound" for g in experiments
             if g.perturbation in ("crispr", "orf") and g.key["Cell_type"] == c.key["Cell_type"] and g.key["Batch"] == c.key["Batch"]]
    for c, g in tqdm(pairs, desc="matching", leave=False):
        log.info("matching %s ~ %s", c.name, g.name)
        matching_metrics(c, g, targets, modality, null_size, seed, res)
    tables = build_tables(res)
    elapsed = time.perf_counter() - started
    storage.remove(storage.join(out, storage.MARKER_NAME), settings)
    for name, url in table_urls.items():
        with storage.atomic_write(url, settings, mode="w") as fh:
            tables[name].to_csv(fh, index=False, float_format="%.6g")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cpjump1-figures-") as tmp:
        figures = _plot_figures(res, tables, Path(tmp))
        for f in figures:
            storage.put_file(Path(tmp) / f, storage.join(out, "figures", f), settings)
    report = render_report(tables, figures, sources, modality, null_size, seed, elapsed)
    with storage.atomic_write(report_url, settings, mode="w") as fh:
        fh.write(report)
    summary = summarize(tables)
    storage.write_marker(out, fp, settings, figures=figures, summary=summary, plates=[f"{s.batch}/{s.plate}" for s in sources])
    log.info("benchmark written to %s in %.1f s", out, time.perf_counter() - started)
    return BenchmarkOutputs(out, False, table_urls, figures, report_url, summary)


def summarize(tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Headline numbers (for logs, the marker and the DAG's XCom)."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v

    pr = tables["percent_replicating"]
    pm = tables["percent_matching"]
    ms = tables["map_summary"]
    return {
        "percent_replicating": {r["experiment"]: clean(float(r["percent_replicating"])) for _, r in pr.iterrows()} if len(pr) else {},
        "percent_matching": {f"{r['compound_experiment']} ~ {r['genetic_experiment']}": clean(float(r["percent_matching"]))
                             for _, r in pm.iterrows()} if len(pm) else {},
        "map_fraction_retrieved": {f"{r['metric']}:{r['experiment']}": clean(float(r["fraction_retrieved"]))
                                   for _, r in ms.iterrows()} if len(ms) else {},
        "issues": int(len(tables["issues"])),
    }


# --------------------------------------------------------------------------- synthetic profiles (tests, benchmarks)


def write_synthetic_profiles(
    root: str | Path,
    batch: str,
    plates: Iterable[str],
    catalog: Any,
    n_features: int = 300,
    seed: int = 0,
    signal: float = 1.0,
    fraction_active: float = 0.6,
    suffix: str = CELLPROFILER_SUFFIXES[0],
) -> list[Path]:
    """Write synthetic well-level profiles in the seed layout ``<root>/<batch>/<plate>/<plate><suffix>.csv.gz``.

    For tests and benchmarks only (every file says so in ``Metadata_synthetic``). Wells follow
    the real plate maps; a fraction of perturbations has a reproducible effect; genes have an
    effect vector shared by their CRISPR guides and ORFs, and compounds that target a gene
    carry part of that gene's vector, so replicate and matching signal exist by construction.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    feats = [f"Cells_Synthetic_Feature_{i:04d}" for i in range(n_features)]
    targets = load_targets(catalog)
    effects: dict[str, np.ndarray] = {}

    def effect(key: str, active_p: float) -> np.ndarray:
        if key not in effects:
            r = np.random.default_rng([seed, zlib.crc32(key.encode())])
            effects[key] = r.normal(size=n_features) * signal if r.random() < active_p else np.zeros(n_features)
        return effects[key]

    written = []
    for plate in plates:
        info = catalog.plate(batch, plate)
        rows = []
        for w in catalog.wells(batch, plate):
            rows.append((w.well, w.broad_sample, w.control_type, w.gene, w.pert_type))
        meta = pd.DataFrame(rows, columns=["Metadata_Well", "Metadata_broad_sample", "Metadata_control_type", "Metadata_gene", "Metadata_pert_type"])
        X = rng.normal(size=(len(meta), n_features))
        for i, r in enumerate(meta.itertuples(index=False)):
            if r.Metadata_control_type == "negcon" or not r.Metadata_broad_sample:
                continue
            if info.perturbation == "compound":
                v = effect(f"cpd:{r.Metadata_broad_sample}", fraction_active)
                tg = [g for g in targets.get(r.Metadata_broad_sample, [])][:1]
                if tg:
                    v = v + 0.8 * effect(f"gene:{tg[0]}", fraction_active)
            else:
                v = effect(f"gene:{r.Metadata_gene}", fraction_active) * (1 if info.perturbation == "orf" else -1)
                v = v + 0.5 * effect(f"{info.perturbation}:{r.Metadata_broad_sample}", fraction_active)
            X[i] += v
        df = pd.concat([meta.assign(Metadata_Plate=plate, Metadata_synthetic=True), pd.DataFrame(X, columns=feats)], axis=1)
        path = root / batch / plate / f"{plate}{suffix}.csv.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        df.to_csv(tmp, index=False, float_format="%.5g", compression="gzip")
        tmp.replace(path)
        written.append(path)
    return written


# --------------------------------------------------------------------------- CLI


@click.command("benchmark")
@click.option("--profiles", "profiles", multiple=True, help="Profile files or roots (repeatable; extra arguments are profiles too).")
@click.argument("more_profiles", nargs=-1)
@click.option("--out", default=None, help="Output folder or URL (default: <storage root>/benchmark/<modality>).")
@click.option("--modality", type=click.Choice(sorted(MODALITIES)), default="cellprofiler", show_default=True)
@click.option("--null-size", type=int, default=1000, show_default=True, help="Draws in each null distribution.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--metadata-dir", default=None, help="CPJUMP1 metadata folder (default: settings).")
@click.option("--storage-root", default=None, help="Storage root (default: settings).")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete for these inputs.")
def command(profiles: tuple[str, ...], more_profiles: tuple[str, ...], out: str | None, modality: str, null_size: int,
            seed: int, metadata_dir: str | None, storage_root: str | None, force: bool) -> None:
    """Percent Replicating, Percent Matching and mAP of profiles, with tables, figures and report.md."""
    from cpjump1.settings import get_settings

    settings = get_settings(metadata_dir=metadata_dir, storage_root=storage_root)
    paths = list(profiles) + list(more_profiles)
    if not paths:
        paths = [storage.join(settings.storage_root, "profiles" if modality == "cellprofiler" else "deep_profiles")]
    out = out or storage.Layout(settings.storage_root).benchmark_dir(modality)
    result = run_benchmark(paths, out, settings, modality=modality, null_size=null_size, seed=seed, force=force)
    s = result.summary
    click.echo(f"{'skipped (complete)' if result.skipped else 'wrote'} {result.out}")
    for name, v in s.get("percent_replicating", {}).items():
        click.echo(f"  Percent Replicating  {name}: {'n/a' if v is None else f'{v:.1f}%'}")
    for name, v in s.get("percent_matching", {}).items():
        click.echo(f"  Percent Matching     {name}: {'n/a' if v is None else f'{v:.1f}%'}")
    for name, v in s.get("map_fraction_retrieved", {}).items():
        click.echo(f"  mAP retrieved        {name}: {'n/a' if v is None else f'{100 * v:.1f}%'}")
    if s.get("issues"):
        click.echo(f"  {s['issues']} input problem(s) handled: see {storage.join(result.out, 'tables', 'issues.csv')}")
