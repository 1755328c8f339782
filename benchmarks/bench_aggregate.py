"""Benchmark: well medians of a plate's single cells, ours (cpjump1.aggregate.well_medians,
streamed well by well) side by side with pycytominer.aggregate(operation="median") on the same
single cells.

    uv run --frozen --no-sync python benchmarks/bench_aggregate.py \
        [--wells 384 --sites 9 --features 3000 --cells 25,50 --ours-cells 150,300]

For every cells-per-site value a synthetic plate is generated in chunks (one well at a time,
``cpjump1.aggregate.write_synthetic_single_cells``, float64, exactly the layout ``cpjump1
aggregate`` writes: a row group per well, required uncompressed PLAIN float64 features).

What each side does (each in its own subprocess, so that its peak RSS — ``ru_maxrss`` of that
child, interpreter and imports included — is its own; times are taken inside the child):

* ours: ``well_medians(file)``: opens the stage's single-cell file, reads one well at a time
  (the next one read ahead in a thread) and takes the medians on the machine's cores.
* pycytominer: ``pandas.read_parquet`` + ``pycytominer.aggregate(strata=[Metadata_Plate,
  Metadata_Well], operation="median")``. It reads a copy of the same cells written by
  ``DataFrame.to_parquet`` with pandas' defaults (snappy, one big row group): that is the file a
  pycytominer user would have, and pandas reads it ~2.5× faster than the per-well row groups of
  ours, so pycytominer is not slowed by our layout. The child also reports the read and the
  ``aggregate`` call separately (``read_s``, ``aggregate_only_s``).

``--cells`` sizes run both tools and compare the medians (must be identical); ``--ours-cells``
sizes run ours only (pycytominer needs the whole plate in memory: 384×9×300 cells × 3000 float64
features ≈ 25 GB, more than this machine's 24 GiB; its RSS there is a linear extrapolation from
the measured sizes, labelled as such). Files are deleted after each size unless ``--keep``
(``--workdir`` then reuses them on the next run). Also timed: ``cpjump1 aggregate`` end to end
(shard CSVs → DuckDB joins → single-cell file with the medians taken in the same pass) on a
smaller plate (``--shard-wells``), which has no pycytominer counterpart. Results:
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
r = time.perf_counter()
out = pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"], operation="median")
el = time.perf_counter() - t
out.to_parquet(sys.argv[2])
print(r - t, el - (r - t))
print(el)
"""

PANDAS_COPY = """
import sys
import pandas as pd
pd.read_parquet(sys.argv[1]).to_parquet(sys.argv[2], index=False)
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
    lines = out.strip().splitlines()
    res = {"ok": True, "aggregate_s": float(lines[-1]), "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    if len(lines) > 1 and len(lines[-2].split()) == 2:
        res["read_s"], res["aggregate_only_s"] = map(float, lines[-2].split())
    return res


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
    ap.add_argument("--cells", default="25,50", help="cells per site where both tools run")
    ap.add_argument("--ours-cells", default="150,300", help="cells per site where only ours runs")
    ap.add_argument("--shard-wells", type=int, default=16, help="wells of the CSV-shard plate (0: skip)")
    ap.add_argument("--workdir", default=None, help="scratch folder (files there are reused)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files for the next run")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "aggregate.json"))
    args = ap.parse_args()

    from cpjump1.aggregate import write_synthetic_single_cells
    from cpjump1.catalog import WELLS_384

    load_start = [round(x, 2) for x in os.getloadavg()]
    wells = list(WELLS_384[: args.wells])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-aggregate-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    both = [int(c) for c in args.cells.split(",") if c]
    ours_only = [int(c) for c in args.ours_cells.split(",") if c]
    for cps in both + ours_only:
        path = work / f"cells_{cps}.parquet"
        need = args.wells * args.sites * cps * args.features * 8 * 1.05 * (2 if cps in both else 1)
        free = shutil.disk_usage(work).free
        if not path.exists() and need > 0.8 * free:
            rows.append({"cells_per_site": cps, "skipped": f"needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
            continue
        t = time.perf_counter()
        meta = work / f"cells_{cps}.json"
        spec = {"wells": args.wells, "sites": args.sites, "cells_per_site": cps, "features": args.features}
        if path.exists() and meta.exists() and json.loads(meta.read_text()).get("spec") == spec:
            info = json.loads(meta.read_text())["info"]
            gen = None
        else:
            info = write_synthetic_single_cells(path, "P", wells, sites=args.sites, cells_per_site=cps, n_features=args.features, seed=0)
            gen = round(time.perf_counter() - t, 1)
            meta.write_text(json.dumps({"spec": spec, "info": info}))
        row = {"cells_per_site": cps, "cells": info["cells"], "features": info["features"], "file_gb": round(path.stat().st_size / 2**30, 2), "generate_s": gen}
        print(f"[{cps} cells/site] {row['cells']} cells ({'generated in %.0f s' % gen if gen is not None else 'reused'})", flush=True)
        row["ours"] = run_child(OURS, str(path), str(work / "ours.parquet"))
        print(f"  ours: {row['ours']}", flush=True)
        if cps in both:
            copy = work / f"cells_{cps}.pandas.parquet"
            if not copy.exists():
                done = subprocess.run([sys.executable, "-c", PANDAS_COPY, str(path), str(copy) + ".tmp"], check=False)
                if done.returncode == 0:
                    Path(str(copy) + ".tmp").rename(copy)
            if copy.exists():
                row["pycytominer_file_gb"] = round(copy.stat().st_size / 2**30, 2)
                row["pycytominer"] = run_child(PYCYTOMINER, str(copy), str(work / "pcm.parquet"))
            else:
                row["pycytominer"] = {"ok": False, "error": "could not write the pandas copy (memory?)"}
            print(f"  pycytominer: {row['pycytominer']}", flush=True)
            if row["ours"]["ok"] and row["pycytominer"]["ok"]:
                row["max_abs_difference"] = compare(work / "ours.parquet", work / "pcm.parquet")
                row["speedup"] = round(row["pycytominer"]["aggregate_s"] / row["ours"]["aggregate_s"], 2)
                row["rss_ratio"] = round(row["ours"]["peak_rss_mb"] / row["pycytominer"]["peak_rss_mb"], 3)
            if not args.keep:
                copy.unlink(missing_ok=True)
        if not args.keep:
            path.unlink()
            meta.unlink(missing_ok=True)
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
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "sizes": rows,
        "shard_csv_to_parquet": shard,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| cells/site | cells | features | ours s | ours RSS MB | pycytominer s (read + aggregate) | pycytominer RSS MB | speed-up | RSS ratio | max diff |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "ours" not in r:
            print(f"| {r['cells_per_site']} | skipped: {r['skipped']} |")
            continue
        p = r.get("pycytominer", {})
        if p.get("ok"):
            pr = f"{p['aggregate_s']:.2f} ({p.get('read_s', float('nan')):.2f} + {p.get('aggregate_only_s', float('nan')):.2f})"
        else:
            pr = "—" if not p else f"failed: {p['error']}"
        prss = f"{p['peak_rss_mb']:.0f}" if p.get("ok") else (f"~{r['pycytominer_rss_mb_extrapolated']} (extrapolated)" if "pycytominer_rss_mb_extrapolated" in r else "—")
        ours = f"{r['ours']['aggregate_s']:.2f}" if r["ours"]["ok"] else f"failed: {r['ours']['error']}"
        print(
            f"| {r['cells_per_site']} | {r['cells']} | {r['features']} | {ours} | {r['ours']['peak_rss_mb']:.0f} | {pr} | {prss} | "
            f"{r.get('speedup', '—')} | {r.get('rss_ratio', '—')} | {r.get('max_abs_difference', '—')} |"
        )
    if shard:
        print(f"\nshard CSVs → single cells + medians: {shard}")
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
