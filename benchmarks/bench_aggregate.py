"""Benchmark: well medians of a plate's single cells, ours (cpjump1.aggregate.well_medians,
streamed well by well) side by side with pycytominer.aggregate(operation="median") on the same
single-cell Parquet file.

    uv run --frozen --no-sync python benchmarks/bench_aggregate.py \
        [--wells 384 --sites 9 --features 3000 --cells 10,20 --ours-cells 150,300]

For every cells-per-site value a synthetic plate is generated in chunks (one well at a time,
``cpjump1.aggregate.write_synthetic_single_cells``, float64, the layout ``cpjump1 aggregate``
writes). Each tool runs in its own subprocess so that its peak RSS (``ru_maxrss`` of that
child, interpreter and imports included) is its own; the child also reports the time of the
aggregation itself (read + medians). ``--cells`` sizes run both tools and compare the medians
(must be identical); ``--ours-cells`` sizes run ours only (pycytominer would need the whole
plate in memory: 384×9×300 cells × 3000 float64 features ≈ 25 GB, more than this machine's
24 GiB, so its RSS there is reported as a linear extrapolation from the measured sizes and
labelled as such). The single-cell files are deleted after each size. Also timed: the shard
CSV → single-cell Parquet step (``cpjump1 aggregate`` end to end) on a smaller plate
(``--shard-wells``), which has no pycytominer counterpart. Results:
``benchmarks/results/aggregate.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = """
import sys, time
from cpjump1.aggregate import well_medians
t = time.perf_counter()
df = well_medians(sys.argv[1], progress=False)
el = time.perf_counter() - t
df.to_parquet(sys.argv[2])
print(el)
"""

PYCYTOMINER = """
import sys, time
import pandas as pd
import pycytominer
t = time.perf_counter()
cells = pd.read_parquet(sys.argv[1])
out = pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], operation="median")
el = time.perf_counter() - t
out.to_parquet(sys.argv[2])
print(el)
"""


def run_child(code: str, *args: str) -> dict:
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"ok": False, "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}", "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    return {"ok": True, "aggregate_s": float(out.strip().splitlines()[-1]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def compare(a: Path, b: Path) -> float:
    import numpy as np
    import pandas as pd

    x, y = pd.read_parquet(a), pd.read_parquet(b)
    feats = [c for c in y.columns if c.startswith(("Cells_", "Cytoplasm_", "Nuclei_"))]
    x = x.set_index("Metadata_Well").loc[y["Metadata_Well"], feats].to_numpy()
    return float(np.nanmax(np.abs(x - y[feats].to_numpy())))


def shard_step(workdir: Path, wells: int, sites: int, cells: int, features: int) -> dict:
    from cpjump1 import aggregate, storage
    from cpjump1.catalog import WELLS_384
    from cpjump1.settings import get_settings

    s = get_settings(storage_root=str(workdir / "shards"))
    folder = storage.Layout(s.storage_root).analysis_dir("B", "P")
    t = time.perf_counter()
    aggregate.write_synthetic_shards(folder, "P", list(WELLS_384[:wells]), sites=sites, cells_per_site=cells, n_features=features, shards=4, settings=s)
    gen = time.perf_counter() - t
    csv_mb = sum(f.stat().st_size for f in Path(folder).rglob("*.csv")) / 2**20
    code = (
        "import sys,time\nfrom cpjump1.settings import get_settings\nfrom cpjump1.aggregate import run_aggregate\n"
        "t=time.perf_counter(); run_aggregate('B','P',get_settings(storage_root=sys.argv[1])); print(time.perf_counter()-t)\n"
    )
    res = run_child(code, s.storage_root)
    res.update({"cells": wells * sites * cells, "features": features, "csv_mb": round(csv_mb, 1), "generate_s": round(gen, 1)})
    shutil.rmtree(workdir / "shards", ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wells", type=int, default=384)
    ap.add_argument("--sites", type=int, default=9)
    ap.add_argument("--features", type=int, default=3000)
    ap.add_argument("--cells", default="10,20", help="cells per site where both tools run")
    ap.add_argument("--ours-cells", default="150,300", help="cells per site where only ours runs")
    ap.add_argument("--shard-wells", type=int, default=16, help="wells of the CSV-shard plate (0: skip)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "aggregate.json"))
    args = ap.parse_args()

    from cpjump1.aggregate import write_synthetic_single_cells
    from cpjump1.catalog import WELLS_384

    wells = list(WELLS_384[: args.wells])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-aggregate-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    both = [int(c) for c in args.cells.split(",") if c]
    ours_only = [int(c) for c in args.ours_cells.split(",") if c]
    for cps in both + ours_only:
        path = work / f"cells_{cps}.parquet"
        need = args.wells * args.sites * cps * args.features * 8 * 1.05
        free = shutil.disk_usage(work).free
        if need > 0.8 * free:
            rows.append({"cells_per_site": cps, "skipped": f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
            continue
        t = time.perf_counter()
        info = write_synthetic_single_cells(path, "P", wells, sites=args.sites, cells_per_site=cps, n_features=args.features, seed=0)
        gen = time.perf_counter() - t
        row = {"cells_per_site": cps, "cells": info["cells"], "features": info["features"], "file_gb": round(path.stat().st_size / 2**30, 2), "generate_s": round(gen, 1)}
        print(f"[{cps} cells/site] generated {row['cells']} cells in {gen:.0f} s", flush=True)
        row["ours"] = run_child(OURS, str(path), str(work / "ours.parquet"))
        print(f"  ours: {row['ours']}", flush=True)
        if cps in both:
            row["pycytominer"] = run_child(PYCYTOMINER, str(path), str(work / "pcm.parquet"))
            print(f"  pycytominer: {row['pycytominer']}", flush=True)
            if row["ours"]["ok"] and row["pycytominer"]["ok"]:
                row["max_abs_difference"] = compare(work / "ours.parquet", work / "pcm.parquet")
                row["speedup"] = round(row["pycytominer"]["aggregate_s"] / row["ours"]["aggregate_s"], 2)
                row["rss_ratio"] = round(row["ours"]["peak_rss_mb"] / row["pycytominer"]["peak_rss_mb"], 3)
        path.unlink()
        rows.append(row)
    measured = [r for r in rows if r.get("pycytominer", {}).get("ok")]
    if len(measured) >= 2:
        (x0, y0), (x1, y1) = [(r["cells"], r["pycytominer"]["peak_rss_mb"]) for r in measured[:2]]
        slope = (y1 - y0) / (x1 - x0)
        for r in rows:
            if "ours" in r and "pycytominer" not in r:
                r["pycytominer_rss_mb_extrapolated"] = round(y0 + slope * (r["cells"] - x0))
    shard = shard_step(work, args.shard_wells, args.sites, 50, args.features) if args.shard_wells else None
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, load average at end {os.getloadavg()[0]:.1f}",
        "sizes": rows,
        "shard_csv_to_parquet": shard,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| cells/site | cells | features | ours s | ours RSS MB | pycytominer s | pycytominer RSS MB | speed-up | RSS ratio | max diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ours" not in r:
            print(f"| {r['cells_per_site']} | skipped: {r['skipped']} |")
            continue
        p = r.get("pycytominer", {})
        pr = f"{p['aggregate_s']:.1f}" if p.get("ok") else ("—" if not p else f"failed: {p['error']}")
        prss = f"{p['peak_rss_mb']:.0f}" if p.get("ok") else (f"~{r['pycytominer_rss_mb_extrapolated']} (extrapolated)" if "pycytominer_rss_mb_extrapolated" in r else "—")
        print(
            f"| {r['cells_per_site']} | {r['cells']} | {r['features']} | {r['ours']['aggregate_s']:.1f} | {r['ours']['peak_rss_mb']:.0f} | {pr} | {prss} | "
            f"{r.get('speedup', '—')} | {r.get('rss_ratio', '—')} | {r.get('max_abs_difference', '—')} |"
        )
    if shard:
        print(f"\nshard CSVs → single cells + medians: {shard}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
