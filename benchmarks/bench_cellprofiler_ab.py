"""Interleaved A/B: CellProfiler run by hand and the ``analysis`` stage on the same sites,
alternating (hand, stage, hand, stage, …), so that drifting machine state falls on both sides.

    uv run --frozen --no-sync python benchmarks/bench_cellprofiler_ab.py [--sites 4 --size 256 --rounds 2]

Uses the helpers of ``bench_cellprofiler.py`` (synthetic plate, illum stage, the by-hand
command). Prints each run's wall seconds and CellProfiler's summed module CPU/wall seconds (from
its log), and the means per side; writes ``benchmarks/results/cellprofiler_ab.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cellprofiler_ab.json"))
    args = ap.parse_args()

    import bench_cellprofiler as b

    from cpjump1 import cellprofiler as cp

    for key in [k for k in os.environ if k.startswith("CPJUMP1_")]:
        del os.environ[key]
    out: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "loadavg_start": os.getloadavg()}
    runs = []
    with tempfile.TemporaryDirectory(prefix="cp-ab-") as tmp:
        tmp_path = Path(tmp)
        os.chdir(tmp_path)
        plate = "BR00117006"
        s = b.make_plate(tmp_path, plate, wells=1, sites=args.sites, size=args.size, shards=1)
        cp.run_illum(b.BATCH, plate, s, progress=False)
        for i in range(2 * args.rounds):
            if i % 2 == 0:
                d = b.direct_cellprofiler(s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp_path, tag=f"-{i}")
                run = {"kind": "hand", "wall": d["wall"], "module_wall": d["module_wall"], "module_cpu": d["module_cpu"]}
            else:
                t0 = time.perf_counter()
                r = cp.run_analysis(b.BATCH, plate, 0, s, progress=False, force=True)
                wall = time.perf_counter() - t0
                mw, mc, _ = b.module_seconds(Path(r.files[cp.LOG_NAME]).read_text())
                run = {"kind": "stage", "wall": wall, "cp_wall": r.seconds["cellprofiler"], "module_wall": mw,
                       "module_cpu": mc}
            runs.append(run)
            print(run, flush=True)
    out["runs"] = runs
    out["loadavg_end"] = os.getloadavg()
    for kind in ("hand", "stage"):
        mine = [r for r in runs if r["kind"] == kind]
        out[f"mean_{kind}"] = {k: statistics.mean(r[k] for r in mine) for k in ("wall", "module_wall", "module_cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("mean_hand", "mean_stage")}, indent=1))


if __name__ == "__main__":
    main()
