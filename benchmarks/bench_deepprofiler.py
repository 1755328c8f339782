"""Speed of the deep_profiles stage on CPU, side by side with running DeepProfiler by hand.

Both variants profile the same synthetic plate (the fixture of ``tests/test_deepprofiler.py``:
16-bit TIFFs, illumination functions, load_data_with_illum.csv, Nuclei.csv shards) with the
same seeded EfficientNet-B0 test checkpoint, 96-px crops, ``pool5`` features:

* ``cpjump1``: ``run_deep_profiles`` end to end (illumination correction and project build,
  checkpoint guard, ``python -m deepprofiler … profile``, npz count check, well means,
  annotate, mad_robustize, spherize, CSV + Parquet, provenance);
* ``deepprofiler``: what a user runs by hand on the already prepared project: only
  ``python -m deepprofiler --root … --config … --exp … profile`` (a fresh experiment
  folder, so every site is profiled), timed as a subprocess.

    uv run --frozen --no-sync python benchmarks/bench_deepprofiler.py [--wells 4] [--sites 3] [--size 540] [--cells 30]

Prints a Markdown table (wall s, sites/s, crops/s, ms per crop) with the ratio
cpjump1 / deepprofiler, and writes the JSON to benchmarks/results/bench_deepprofiler.json.
A GPU figure needs TensorFlow 2.15 on Python <= 3.11, which the lent GPU machines lack.
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
sys.path.insert(0, str(REPO / "tests"))

from test_deepprofiler import BATCH, PLATE, write_fixture_plate  # noqa: E402

from cpjump1 import deepprofiler as dp  # noqa: E402

ALL_WELLS = ("A01", "A02", "A03", "A09", "A04", "A17", "B01", "B03")  # A02, A09, A17, B03: DMSO (negcon)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wells", type=int, default=4)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--size", type=int, default=540)
    ap.add_argument("--cells", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    wells = ALL_WELLS[: max(4, args.wells)]  # at least two negative controls for spherize
    tmp = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    try:
        fixture = write_fixture_plate(tmp / "root", wells=wells, sites=args.sites, size=args.size, cells=args.cells)
        settings = fixture["settings"]
        ckpt = tmp / "seeded-b0-s0.h5"
        t0 = time.time()
        dp.build_checkpoint(str(ckpt), settings, seed=0)
        build_s = time.time() - t0

        t0 = time.time()
        result = dp.run_deep_profiles(BATCH, PLATE, settings, checkpoint=str(ckpt), workdir=tmp / "project",
                                      progress=False, keep_images=True, allow_missing_wells=True)
        stage_s = time.time() - t0
        prov = result.provenance

        # DeepProfiler by hand on the same prepared project, fresh experiment folder.
        exp = "by-hand"
        ckdir = tmp / "project" / "outputs" / exp / "checkpoint"
        ckdir.mkdir(parents=True)
        shutil.copy(ckpt, ckdir / prov["config"]["profile"]["checkpoint"])
        cmd = [settings.deepprofiler_python, "-m", "deepprofiler", "--root", str(tmp / "project"), "--config",
               dp.CONFIG_NAME, "--exp", exp, "--gpu", "0", "profile"]
        t0 = time.time()
        subprocess.run(cmd, cwd=tmp / "project", check=True, capture_output=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        bare_s = time.time() - t0
        npz = list((tmp / "project" / "outputs" / exp / "features").rglob("*.npz"))
        assert len(npz) == prov["sites"], (len(npz), prov["sites"])

        sites, crops = prov["sites"], prov["cells"]
        rows = {
            "cpjump1 run_deep_profiles": stage_s,
            "deepprofiler profile (by hand)": bare_s,
        }
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}",
            "command": "python benchmarks/bench_deepprofiler.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "plate": {"wells": len(wells), "sites": sites, "crops": crops, "image": f"{args.size}x{args.size}",
                      "box_size": prov["box_size"], "feature_layer": prov["feature_layer"]},
            "checkpoint_build_s": round(build_s, 2),
            "stage_breakdown_s": prov.get("timings_s"),
            "wall_s": {k: round(v, 2) for k, v in rows.items()},
            "ratio_cpjump1_over_deepprofiler": round(stage_s / bare_s, 2),
        }
        print(f"\nplate: {len(wells)} wells x {args.sites} sites = {sites} sites, {crops} crops "
              f"({args.size}x{args.size}, box {prov['box_size']}); machine: {report['machine']}\n")
        print("| variant | wall s | sites/s | crops/s | ms/crop |")
        print("|---|---:|---:|---:|---:|")
        for name, wall in rows.items():
            print(f"| {name} | {wall:.1f} | {sites / wall:.3f} | {crops / wall:.1f} | {1000 * wall / crops:.1f} |")
        print(f"\nratio cpjump1 / deepprofiler: {stage_s / bare_s:.2f}; stage breakdown (s): {prov.get('timings_s')}; "
              f"checkpoint build {build_s:.1f} s")
        out = REPO / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_deepprofiler.json").write_text(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
