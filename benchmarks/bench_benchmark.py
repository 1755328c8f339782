"""Speed and memory of the benchmark stage, side by side with what a user would otherwise write.

Cases (each variant runs in its own Python process so that its peak RSS is its own):

* ``real``: the 7 real U2OS compound plates in ../shared/cpjump1/profiles (skipped if absent);
* ``synthetic51``: all 51 plates of 2020_11_04_CPJUMP1 as synthetic profiles with the real
  plate maps and the real feature count (compound, CRISPR and ORF, so Percent Matching and
  compound-gene mAP run too).

Variants:

* ``cpjump1``: ``run_benchmark`` (Percent Replicating, Percent Matching, both mAPs, tables,
  figures, report);
* ``baseline``: the straightforward implementation a user writes from the paper's notebooks:
  per experiment a full well-by-well ``DataFrame.corr()``, a Python loop of ``null_size``
  random draws for the null, the same for matching, and plain copairs
  (``copairs.map.average_precision`` with ``distance="cosine"`` + ``mean_average_precision``)
  on each experiment's whole table. It computes the same metrics and writes only CSVs.

    uv run --frozen --no-sync python benchmarks/bench_benchmark.py [--cases real,synthetic51] [--null-size 1000]

Prints a Markdown table (wall s, CPU s, peak RSS) with ratios baseline / cpjump1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "cpjump1"
BATCH = "2020_11_04_CPJUMP1"


# --------------------------------------------------------------------------- baseline (what a user writes)


def baseline(profile_root: str, out: str, null_size: int, seed: int) -> dict:
    """Percent Replicating / Matching with pandas and loops, mAP with plain copairs, per experiment."""
    import numpy as np
    import pandas as pd
    from copairs.map import average_precision, mean_average_precision
    from copairs.matching import assign_reference_index

    from cpjump1.benchmark import load_targets
    from cpjump1.catalog import load_catalog

    cat = load_catalog(REPO / "metadata")
    rng = np.random.default_rng(seed)
    exp_meta = cat.experiment_metadata()
    frames = []
    for f in sorted(Path(profile_root).glob("*/*/*_normalized_feature_select_negcon_batch.csv.gz")):
        frames.append(pd.read_csv(f))
    df = pd.concat(frames, ignore_index=True)
    df = df.merge(
        exp_meta.rename(columns={"Assay_Plate_Barcode": "Metadata_Plate"})[
            ["Metadata_Plate", "Perturbation", "Cell_type", "Time", "Density", "Antibiotics"]
        ].drop_duplicates("Metadata_Plate"),
        on="Metadata_Plate",
    )
    feats = [c for c in df.columns if not c.startswith("Metadata_") and c not in exp_meta.columns]
    df["Metadata_broad_sample"] = df["Metadata_broad_sample"].fillna("")
    df["negcon"] = (df["Metadata_control_type"] == "negcon") | (df["Metadata_broad_sample"] == "")
    keys = ["Perturbation", "Cell_type", "Time", "Density", "Antibiotics"]
    pr_rows, map_rows, pm_rows = [], [], []
    consensus = {}
    for key, exp in df.groupby(keys):
        trt = exp[~exp["negcon"]].reset_index(drop=True)
        corr = trt[feats].T.corr()  # wells x wells
        cm = corr.to_numpy()
        reps = {}
        for bs, g in trt.groupby("Metadata_broad_sample"):
            idx = g.index.to_numpy()
            if len(idx) > 1:
                sub = cm[np.ix_(idx, idx)]
                reps[bs] = np.median(sub[np.triu_indices(len(idx), 1)])
        k = int(trt.groupby("Metadata_broad_sample").size().mode()[0])
        null = []
        while len(null) < null_size:
            idx = rng.choice(len(trt), k, replace=False)
            if trt.loc[idx, "Metadata_broad_sample"].nunique() == k:
                sub = cm[np.ix_(idx, idx)]
                null.append(np.median(sub[np.triu_indices(k, 1)]))
        thr = np.percentile(null, 95)
        pr_rows.append((*key, 100 * np.mean(np.array(list(reps.values())) > thr)))
        # plain copairs on the whole experiment
        m = exp.reset_index(drop=True)
        m = assign_reference_index(m, "negcon", reference_col="Metadata_Reference_Index", default_value=-1)
        ap = average_precision(
            m[["Metadata_broad_sample", "Metadata_Plate", "Metadata_Reference_Index"]],
            m[feats].to_numpy(),
            pos_sameby=["Metadata_broad_sample", "Metadata_Reference_Index"],
            pos_diffby=[],
            neg_sameby=["Metadata_Plate"],
            neg_diffby=["Metadata_broad_sample", "Metadata_Reference_Index"],
            progress_bar=False,
        )
        ap = ap[~m["negcon"].to_numpy()]
        res = mean_average_precision(ap, ["Metadata_broad_sample"], null_size=null_size, threshold=0.05, seed=seed, progress_bar=False)
        map_rows.append((*key, res["below_corrected_p"].mean()))
        label = "Metadata_gene" if key[0] != "compound" else "Metadata_broad_sample"
        consensus[key] = (trt, cm, label)
    # Percent Matching: compound vs genetic experiments of the same cell type
    targets = load_targets(cat)
    for ck, (ct, _, _) in consensus.items():
        if ck[0] != "compound":
            continue
        for gk, (gt, _, _) in consensus.items():
            if gk[0] == "compound" or gk[1] != ck[1]:
                continue
            gt2 = gt[gt["Metadata_gene"].fillna("") != ""]
            cross = np.corrcoef(ct[feats].to_numpy(), gt2[feats].to_numpy())[: len(ct), len(ct):]
            cgroups = ct.groupby("Metadata_broad_sample").indices
            ggroups = gt2.reset_index(drop=True).groupby("Metadata_gene").indices
            matched = [
                np.median(cross[np.ix_(ci, ggroups[g])])
                for c, ci in cgroups.items()
                for g in targets.get(c, [])
                if g in ggroups
            ]
            null = []
            cl, gl = list(cgroups), list(ggroups)
            while len(null) < null_size:
                c, g = cl[rng.integers(len(cl))], gl[rng.integers(len(gl))]
                if g not in targets.get(c, []):
                    null.append(np.median(cross[np.ix_(cgroups[c], ggroups[g])]))
            pm_rows.append((ck, gk, 100 * np.mean(np.array(matched) > np.percentile(null, 95)) if matched else np.nan))
    Path(out).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(pr_rows).to_csv(Path(out) / "percent_replicating.csv", index=False)
    pd.DataFrame(map_rows).to_csv(Path(out) / "map.csv", index=False)
    pd.DataFrame(pm_rows).to_csv(Path(out) / "percent_matching.csv", index=False)
    return {"percent_replicating": {str(r[:5]): r[5] for r in pr_rows}, "map_fraction": {str(r[:5]): r[5] for r in map_rows}}


# --------------------------------------------------------------------------- one measured run (child process)


def child(variant: str, root: str, null_size: int, seed: int) -> None:
    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as out:
        if variant == "cpjump1":
            from cpjump1.benchmark import run_benchmark
            from cpjump1.settings import get_settings

            res = run_benchmark([root], out, get_settings(metadata_dir=str(REPO / "metadata")), null_size=null_size, seed=seed, force=True)
            summary = res.summary
        else:
            summary = baseline(root, out, null_size, seed)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "rss_mb": rss_mb, "summary": summary}, default=str))


def measure(variant: str, root: str, null_size: int, seed: int, timeout: int = 1800) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--root", root, "--null-size", str(null_size), "--seed", str(seed)]
    env = dict(os.environ, TQDM_DISABLE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"wall": time.perf_counter() - t0, "cpu": float("nan"), "rss_mb": float("nan"), "error": f"timeout {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"wall": time.perf_counter() - t0, "cpu": float("nan"), "rss_mb": float("nan"), "error": proc.stderr[-2000:]}


def make_synthetic(root: Path, n_features: int, seed: int) -> None:
    from cpjump1.benchmark import write_synthetic_profiles
    from cpjump1.catalog import load_catalog

    cat = load_catalog(REPO / "metadata")
    write_synthetic_profiles(root, BATCH, cat.batch(BATCH).plates, cat, n_features=n_features, seed=seed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="real,synthetic51")
    ap.add_argument("--null-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--features", type=int, default=904, help="synthetic feature count (real plates: 904)")
    ap.add_argument("--variants", default="cpjump1,baseline")
    ap.add_argument("--synthetic-root", default=None, help="reuse synthetic profiles written earlier by this script")
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.root, args.null_size, args.seed)
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node()} "
          f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}), null size {args.null_size}")
    print("| case | variant | wall s | CPU s | peak RSS MiB | headline |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            if case == "real":
                if not (SHARED / "profiles").is_dir():
                    print(f"| real | – | skipped: {SHARED} absent | | | |")
                    continue
                root = str(SHARED / "profiles")
            else:
                if args.synthetic_root and Path(args.synthetic_root, BATCH).is_dir():
                    root = args.synthetic_root
                else:
                    root_p = Path(args.synthetic_root or Path(tmp) / "synthetic51")
                    t0 = time.perf_counter()
                    make_synthetic(root_p, args.features, args.seed)
                    print(f"<!-- synthetic 51-plate batch written in {time.perf_counter() - t0:.0f} s (not timed below) -->")
                    root = str(root_p)
            for variant in args.variants.split(","):
                r = measure(variant, root, args.null_size, args.seed)
                results[(case, variant)] = r
                if "error" in r:
                    print(f"| {case} | {variant} | failed: {r['error'][-300:]!r} | | | |")
                    continue
                s = r["summary"]
                head = ""
                if variant == "cpjump1":
                    pr = ", ".join(f"{k} {v:.1f}%" for k, v in s.get("percent_replicating", {}).items() if v is not None)
                    head = f"PR: {pr}"[:200]
                print(f"| {case} | {variant} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_mb']:.0f} | {head} |")
            a, b = results.get((case, "cpjump1")), results.get((case, "baseline"))
            if a and b and "error" not in a and "error" not in b:
                print(f"| {case} | ratio baseline/cpjump1 | {b['wall'] / a['wall']:.2f}x | {b['cpu'] / a['cpu']:.2f}x "
                      f"| {b['rss_mb'] / a['rss_mb']:.2f}x | |")


if __name__ == "__main__":
    main()
