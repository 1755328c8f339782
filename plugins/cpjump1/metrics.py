"""Pure metric functions of the benchmark stage: Percent Replicating, Percent Matching, mAP.

Method definitions follow the CPJUMP1 paper (Chandrasekaran et al., "Three million images and
morphological profiles of cells treated with matched chemical and genetic perturbations",
Nature Methods 2024) and, for mean average precision, the copairs library (Kalinin et al.,
"A versatile information retrieval framework for evaluating profile strength and similarity",
bioRxiv 2024; copairs 0.5.5, whose ``average_precision``, ``multilabel.average_precision``
and ``mean_average_precision`` compute the AP values, permutation p-values and the
Benjamini-Hochberg correction here).

Everything works on *pairs of rows* of a row-standardised matrix, never on a full
well-by-well correlation matrix, so memory grows with the number of pairs that the metric
needs (replicate pairs, null draws, matched pairs), not with the square of the number of
wells. The mAP computations are chunked for the same reason.

All functions are pure: arrays and DataFrames in, arrays and DataFrames out; no I/O.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

#: Significance level for "retrieved" perturbations (q < 0.05 after BH), as in the paper.
ALPHA = 0.05

#: Pairs per similarity batch handed to copairs (its default, 20000, gathers 2 x 20000 rows of
#: every feature per thread; 4096 keeps that under ~30 MB at 900 float32 features).
PAIR_BATCH = 4096

#: Largest compound-wells x gene-wells correlation block held at once (float64: 200 MB).
CROSS_BLOCK_MAX = 25_000_000


class MetricInputError(ValueError):
    """Inputs a metric cannot use (too few rows, NaN features...); the message says which."""


# --------------------------------------------------------------------------- correlations


def standardize_rows(X: np.ndarray) -> np.ndarray:
    """Centre and scale every row so that ``Z[i] @ Z[j] / n_features`` is Pearson's r.

    Rows with zero variance cannot be correlated: they become NaN (and so yield NaN
    correlations that the callers report, never a silent 0).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise MetricInputError(f"expected a 2-D matrix, got shape {X.shape}")
    if np.isnan(X).any():
        raise MetricInputError("the feature matrix contains NaN; drop or impute them first")
    Z = X - X.mean(axis=1, keepdims=True)
    sd = np.sqrt((Z**2).mean(axis=1, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        Z = np.where(sd > 0, Z / np.where(sd > 0, sd, 1.0), np.nan)
    return Z


def pair_correlations(
    Z: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    Z_right: np.ndarray | None = None,
    batch_size: int = 4096,
) -> np.ndarray:
    """Pearson correlations of the row pairs ``(left[i], right[i])`` of standardised matrices.

    ``Z_right`` (default ``Z``) lets the right rows come from another matrix with the same
    features (cross-modality matching). Computed in batches of ``batch_size`` pairs so that
    memory stays bounded.
    """
    Zr = Z if Z_right is None else Z_right
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    out = np.empty(len(left), dtype=np.float64)
    p = Z.shape[1]
    for start in range(0, len(left), batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = np.einsum("ij,ij->i", Z[left[sl]], Zr[right[sl]]) / p
    return out


def _upper_pairs(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k, k=1)


def median_pairwise_correlation(Z: np.ndarray, rows: Sequence[int]) -> float:
    """Median of the Pearson correlations of all pairs among ``rows`` (NaN for < 2 rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) < 2:
        return float("nan")
    a, b = _upper_pairs(len(rows))
    return float(np.median(pair_correlations(Z, rows[a], rows[b])))


def median_cross_correlation(Za: np.ndarray, rows_a: Sequence[int], Zb: np.ndarray, rows_b: Sequence[int]) -> float:
    """Median of the Pearson correlations of every row of ``rows_a`` with every row of ``rows_b``."""
    rows_a = np.asarray(rows_a, dtype=np.int64)
    rows_b = np.asarray(rows_b, dtype=np.int64)
    if len(rows_a) == 0 or len(rows_b) == 0:
        return float("nan")
    left = np.repeat(rows_a, len(rows_b))
    right = np.tile(rows_b, len(rows_a))
    return float(np.median(pair_correlations(Za, left, right, Z_right=Zb)))


def _groups(labels: Sequence) -> dict[object, np.ndarray]:
    """label -> row indices, in order of first appearance."""
    codes, uniques = pd.factorize(pd.Series(list(labels), dtype=object), sort=False)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(uniques))
    split = np.split(order, np.cumsum(counts)[:-1]) if len(uniques) else []
    return {u: rows for u, rows in zip(uniques, split, strict=True)}


# --------------------------------------------------------------------------- Percent Replicating


def replicate_null(
    Z: np.ndarray,
    labels: Sequence,
    n_replicates: int,
    null_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Null distribution of Percent Replicating (CPJUMP1 paper, Methods).

    ``null_size`` draws of ``n_replicates`` rows, each row from a *different* perturbation;
    each draw contributes the median of its pairwise Pearson correlations. Returns an empty
    array when fewer than ``n_replicates`` distinct perturbations exist.
    """
    codes = pd.factorize(pd.Series(list(labels), dtype=object))[0]
    if n_replicates < 2 or len(np.unique(codes)) < n_replicates:
        return np.empty(0)
    n = len(codes)
    draws = np.empty((0, n_replicates), dtype=np.int64)
    for _ in range(1000):  # rejection sampling, vectorised; terminates fast in practice
        need = null_size - len(draws)
        if need <= 0:
            break
        cand = rng.integers(0, n, size=(max(need * 2, 16), n_replicates))
        lab = np.sort(codes[cand], axis=1)
        ok = (np.diff(lab, axis=1) != 0).all(axis=1)
        draws = np.vstack([draws, cand[ok][:need]])
    if len(draws) < null_size:
        raise MetricInputError("could not draw a null of distinct perturbations")
    a, b = _upper_pairs(n_replicates)
    corr = pair_correlations(Z, draws[:, a].ravel(), draws[:, b].ravel())
    return np.median(corr.reshape(null_size, len(a)), axis=1)


@dataclass
class ReplicateResult:
    """Per-perturbation replicate correlations and the experiment's Percent Replicating."""

    table: pd.DataFrame  # label, n_replicates, median_replicate_correlation, null_95th, replicating
    nulls: dict[int, np.ndarray] = field(default_factory=dict)
    percent_replicating: float = float("nan")
    n_perturbations: int = 0
    n_unreplicated: int = 0
    null_95th: float = float("nan")
    modal_replicates: int = 0


def percent_replicating(
    Z: np.ndarray,
    labels: Sequence,
    null_size: int = 1000,
    seed: int = 0,
    percentile: float = 95.0,
) -> ReplicateResult:
    """Percent Replicating of one experiment (CPJUMP1 paper; Way et al. 2022 Cell Systems).

    ``Z`` holds the standardised profiles of the experiment's treated wells (negative
    controls already removed), ``labels`` their perturbation. For every perturbation with at
    least two wells, the median pairwise Pearson correlation of its wells is compared with
    the ``percentile``-th percentile of :func:`replicate_null` built with the same number of
    wells; Percent Replicating is the percentage of perturbations above it. Perturbations
    with one well are counted in ``n_unreplicated`` and excluded from the denominator.
    """
    if len(Z) != len(labels):
        raise MetricInputError(f"{len(Z)} profiles but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    groups = _groups(labels)
    rows = []
    for label, idx in groups.items():
        rows.append(
            {
                "label": label,
                "n_replicates": len(idx),
                "median_replicate_correlation": median_pairwise_correlation(Z, idx),
            }
        )
    table = pd.DataFrame(rows, columns=["label", "n_replicates", "median_replicate_correlation"])
    replicated = table["n_replicates"] >= 2
    nulls: dict[int, np.ndarray] = {}
    thresholds: dict[int, float] = {}
    for k in sorted(table.loc[replicated, "n_replicates"].unique()):
        null = replicate_null(Z, labels, int(k), null_size, rng)
        nulls[int(k)] = null
        finite = null[np.isfinite(null)]
        thresholds[int(k)] = float(np.percentile(finite, percentile)) if len(finite) else float("nan")
    table["null_95th"] = table["n_replicates"].map(thresholds).astype(float)
    evaluable = replicated & table["median_replicate_correlation"].notna() & table["null_95th"].notna()
    above = (table["median_replicate_correlation"] > table["null_95th"]).astype("boolean")
    table["replicating"] = above.where(evaluable, pd.NA)
    result = ReplicateResult(table=table, nulls=nulls)
    result.n_perturbations = int(evaluable.sum())
    result.n_unreplicated = int((~replicated).sum())
    if result.n_perturbations:
        result.percent_replicating = float(100.0 * table.loc[evaluable, "replicating"].astype(bool).mean())
        modal = int(table.loc[evaluable, "n_replicates"].mode().min())
        result.modal_replicates = modal
        result.null_95th = thresholds[modal]
    return result


# --------------------------------------------------------------------------- Percent Matching


@dataclass
class MatchingResult:
    """Matched compound-gene pairs, their null and the Percent Matching."""

    table: pd.DataFrame  # compound, gene, median_cross_correlation, matching, anti_matching
    null: np.ndarray = field(default_factory=lambda: np.empty(0))
    null_95th: float = float("nan")
    null_5th: float = float("nan")
    percent_matching: float = float("nan")
    percent_anti_matching: float = float("nan")
    n_pairs: int = 0
    n_compounds: int = 0


def percent_matching(
    Zc: np.ndarray,
    compound_labels: Sequence,
    Zg: np.ndarray,
    gene_labels: Sequence,
    targets: dict[object, Iterable[str]],
    null_size: int = 1000,
    seed: int = 0,
) -> MatchingResult:
    """Percent Matching between a compound and a genetic experiment (CPJUMP1 paper).

    A compound and a gene *match* when the gene is in the compound's annotated targets. For
    every matched pair the statistic is the median Pearson correlation between the
    compound's wells and the gene's wells (rows of ``Zc`` and ``Zg``, standardised over the
    same features). The null is ``null_size`` random compound-gene pairs that do not match.
    Percent Matching is the percentage of matched pairs above the null's 95th percentile;
    ``percent_anti_matching`` the percentage below its 5th percentile (a knockout can
    oppose a compound's effect, an overexpression mimic it; the paper looks at both tails).
    """
    if Zc.shape[1] != Zg.shape[1]:
        raise MetricInputError("compound and genetic profiles must share the same features")
    cgroups = _groups(compound_labels)
    ggroups = _groups(gene_labels)
    tsets = {c: {str(g) for g in targets.get(c, ())} for c in cgroups}
    # Correlations between every compound well and every gene well, computed once when the
    # block is small (two experiments of a few plates: ~1500 x 1500), else pair by pair.
    cross = None
    if Zc.shape[0] * Zg.shape[0] <= CROSS_BLOCK_MAX:
        cross = (Zc @ Zg.T) / Zc.shape[1]

    def stat(c: object, g: object) -> float:
        if cross is not None:
            return float(np.median(cross[np.ix_(cgroups[c], ggroups[g])]))
        return median_cross_correlation(Zc, cgroups[c], Zg, ggroups[g])

    rows = []
    for c in cgroups:
        for g in sorted(tsets[c]):
            if g in ggroups:
                rows.append({"compound": c, "gene": g, "median_cross_correlation": stat(c, g)})
    table = pd.DataFrame(rows, columns=["compound", "gene", "median_cross_correlation"])
    result = MatchingResult(table=table)
    result.n_pairs = len(table)
    result.n_compounds = int(table["compound"].nunique()) if len(table) else 0
    clist, glist = list(cgroups), list(ggroups)
    non_matching_possible = any(g not in tsets[c] for c in clist for g in glist) if clist and glist else False
    if not len(table) or not non_matching_possible:
        table["matching"] = np.nan
        table["anti_matching"] = np.nan
        return result
    rng = np.random.default_rng(seed)
    null = []
    tries = 0
    while len(null) < null_size and tries < null_size * 50:
        tries += 1
        c = clist[rng.integers(len(clist))]
        g = glist[rng.integers(len(glist))]
        if g in tsets[c]:
            continue
        null.append(stat(c, g))
    null_arr = np.asarray(null, dtype=float)
    finite = null_arr[np.isfinite(null_arr)]
    result.null = null_arr
    if len(finite):
        result.null_95th = float(np.percentile(finite, 95))
        result.null_5th = float(np.percentile(finite, 5))
    table["matching"] = table["median_cross_correlation"] > result.null_95th
    table["anti_matching"] = table["median_cross_correlation"] < result.null_5th
    result.percent_matching = float(100.0 * table["matching"].mean())
    result.percent_anti_matching = float(100.0 * table["anti_matching"].mean())
    return result


# --------------------------------------------------------------------------- mAP (copairs)


def _silence_copairs() -> None:
    logging.getLogger("copairs").setLevel(logging.WARNING)


def _unit_rows(feats: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so that cosine similarity is a plain dot product.

    Rows of zeros stay zeros (similarity 0), the same value copairs' cosine gives after its
    own NaN-free normalisation would not exist; callers drop constant wells beforehand.
    """
    feats = np.asarray(feats, dtype=np.float64)
    norm = np.linalg.norm(feats, axis=1, keepdims=True)
    return (feats / np.where(norm > 0, norm, 1.0)).astype(np.float32)


def _dot_similarity(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine similarity of paired unit rows (copairs accepts a callable ``distance``)."""
    return np.einsum("ij,ij->i", x, y)


def replicate_average_precision(
    meta: pd.DataFrame,
    feats: np.ndarray,
    label_col: str = "label",
    plate_col: str = "plate",
    negcon_col: str = "is_negcon",
    max_pairs: int = 2_000_000,
) -> pd.DataFrame:
    """Average precision of replicate retrieval with copairs (``copairs.map.average_precision``).

    Each treated well queries the other wells of its plate's negative controls and its own
    replicates (any plate): positives are wells of the same perturbation, negatives the
    negative-control wells *on the same plate* (cosine similarity), as in the CPJUMP1
    paper's mAP of phenotypic activity. Negative-control wells are not queries.

    Memory is bounded by splitting the perturbations into chunks whose (positive + negative)
    pair count stays under ``max_pairs``; a query's AP depends only on its own positives and
    its own plate's negative controls, so chunking does not change any value.
    Returns one row per treated well with ``average_precision``, ``n_pos_pairs``,
    ``n_total_pairs`` (wells without a replicate get NaN AP and 0 positive pairs).
    """
    from copairs.map import average_precision
    from copairs.matching import UnpairedException

    _silence_copairs()
    meta = meta.reset_index(drop=True)
    feats = _unit_rows(feats)
    is_neg = meta[negcon_col].astype(bool).to_numpy()
    neg_per_plate = meta.loc[is_neg, plate_col].value_counts()
    trt = meta.loc[~is_neg]
    groups = trt.groupby(label_col, sort=False).indices
    labels = list(groups)
    # cost of one perturbation: its positive pairs + its wells x negcons on their plates
    cost = []
    for lab in labels:
        rows = trt.index[groups[lab]]
        k = len(rows)
        negs = int(sum(neg_per_plate.get(p, 0) for p in meta.loc[rows, plate_col]))
        cost.append(k * (k - 1) // 2 + negs)
    out = []
    chunk: list = []
    running = 0

    def flush(chunk_labels: list) -> None:
        rows = np.concatenate([trt.index[groups[lab]] for lab in chunk_labels])
        plates = meta.loc[rows, plate_col].unique()
        neg_rows = meta.index[is_neg & meta[plate_col].isin(plates).to_numpy()]
        sub_idx = np.concatenate([rows, neg_rows])
        sub = meta.loc[sub_idx, [label_col, plate_col]].reset_index(drop=True)
        sub["_query"] = np.concatenate([np.ones(len(rows), bool), np.zeros(len(neg_rows), bool)])
        # negative controls: unique reference index so they never pair with one another
        sub["_ref"] = -1
        sub.loc[~sub["_query"], "_ref"] = np.arange((~sub["_query"]).sum())
        sub[label_col] = sub[label_col].astype(str)
        sub.loc[~sub["_query"], label_col] = "__negcon__"
        try:
            ap = average_precision(
                sub,
                feats[sub_idx],
                pos_sameby=[label_col, "_ref"],
                pos_diffby=[],
                neg_sameby=[plate_col],
                neg_diffby=[label_col, "_ref"],
                distance=_dot_similarity,
                batch_size=PAIR_BATCH,
                progress_bar=False,
            )
        except UnpairedException:
            ap = sub.assign(average_precision=np.nan, n_pos_pairs=0, n_total_pairs=0)
        ap["_row"] = sub_idx
        out.append(ap.loc[ap["_query"]])

    for lab, c in zip(labels, cost, strict=True):
        if chunk and running + c > max_pairs:
            flush(chunk)
            chunk, running = [], 0
        chunk.append(lab)
        running += c
    if chunk:
        flush(chunk)
    if not out:
        return pd.DataFrame(columns=["_row", label_col, plate_col, "average_precision", "n_pos_pairs", "n_total_pairs"])
    res = pd.concat(out, ignore_index=True)
    res = res.drop(columns=["_query", "_ref"]).sort_values("_row").reset_index(drop=True)
    res[label_col] = meta.loc[res["_row"], label_col].to_numpy()
    return res


def mean_average_precision(
    ap: pd.DataFrame,
    label_col: str,
    null_size: int = 1000,
    seed: int = 0,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """mAP per ``label_col`` with permutation p-values and BH correction (copairs).

    Wraps ``copairs.map.mean_average_precision``: the mAP of a group is the mean of its
    rows' AP; the p-value compares it with ``null_size`` random rankings of the same numbers
    of positives and pairs; ``corrected_p_value`` is Benjamini-Hochberg over the groups
    given; ``retrieved`` is ``corrected_p_value < alpha``. copairs' null cache goes into a
    temporary folder, not the user's home.
    """
    from copairs.map import mean_average_precision as copairs_map

    _silence_copairs()
    valid = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)].copy()
    cols = [label_col, "mean_average_precision", "p_value", "corrected_p_value", "retrieved"]
    if valid.empty:
        return pd.DataFrame(columns=cols)
    valid[label_col] = valid[label_col].astype(str)
    with tempfile.TemporaryDirectory(prefix="cpjump1-copairs-") as cache:
        res = copairs_map(
            valid[[label_col, "average_precision", "normalized_average_precision", "n_pos_pairs", "n_total_pairs"]]
            if "normalized_average_precision" in valid
            else valid.assign(normalized_average_precision=np.nan),
            sameby=[label_col],
            null_size=null_size,
            threshold=alpha,
            seed=seed,
            progress_bar=False,
            cache_dir=cache,
        )
    res["retrieved"] = res["corrected_p_value"] < alpha
    return res[cols].reset_index(drop=True)


def matching_average_precision(
    compound_profiles: pd.DataFrame,
    gene_profiles: pd.DataFrame,
    targets: dict[object, Iterable[str]],
) -> pd.DataFrame:
    """AP of compound-to-gene retrieval (CPJUMP1 paper), scored by copairs' AP kernel.

    ``compound_profiles`` (index: compound) and ``gene_profiles`` (index: gene) are
    consensus profiles (median of the replicate wells) over the same feature columns. Each
    compound queries the gene profiles once per annotated target present: the positive is
    that target gene, the negatives are the genes that are *none* of the compound's targets
    (cosine similarity) -- the pairs copairs' ``multilabel.average_precision`` forms with
    ``pos_sameby=[targets]``, ``neg_diffby=[targets]``. The pairs are built here from the
    small compound x gene similarity matrix (copairs' multilabel search joins every pair of
    rows in DuckDB, ~30x slower on a 51-plate batch), and the ranked lists are scored by
    ``copairs.compute.ap_contiguous``, the function copairs' own AP uses. Returns one row
    per (compound, target gene present) with ``average_precision``, ``n_pos_pairs`` and
    ``n_total_pairs`` (the configuration of its permutation null).
    """
    from copairs import compute

    cols = ["compound", "gene", "average_precision", "n_pos_pairs", "n_total_pairs"]
    genes = [str(g) for g in gene_profiles.index]
    gpos = {g: j for j, g in enumerate(genes)}
    if not genes or compound_profiles.empty:
        return pd.DataFrame(columns=cols)
    C = _unit_rows(compound_profiles.to_numpy(float))
    G = _unit_rows(gene_profiles.to_numpy(float))
    S = C @ G.T
    gene_arr = np.array(genes, dtype=object)
    lists, counts, keys = [], [], []
    for i, c in enumerate(compound_profiles.index):
        t = {str(g) for g in targets.get(c, ())}
        present = [g for g in sorted(t) if g in gpos]
        if not present:
            continue
        neg = np.flatnonzero(~np.isin(gene_arr, list(t)))
        if not len(neg):
            continue
        for g in present:
            idx = np.concatenate([[gpos[g]], neg])
            rel = np.zeros(len(idx), dtype=np.uint32)
            rel[0] = 1
            order = np.argsort(-S[i, idx], kind="stable")
            lists.append(rel[order])
            counts.append(len(idx))
            keys.append((c, g))
    if not lists:
        return pd.DataFrame(columns=cols)
    ap, confs = compute.ap_contiguous(np.concatenate(lists), np.asarray(counts, dtype=np.uint32))
    out = pd.DataFrame(keys, columns=["compound", "gene"])
    out["average_precision"] = ap
    out["n_pos_pairs"] = confs[:, 0]
    out["n_total_pairs"] = confs[:, 1]
    return out
