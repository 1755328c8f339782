"""CellProfiler stages: seconds per site, and the stage's overhead over running CellProfiler by hand.

What a user would otherwise do is run CellProfiler directly on a LoadData CSV::

    python -m cellprofiler -c -r -p analysis.cppipe --data-file load_data_with_illum.csv -o out

This script runs exactly that command (the baseline) and ``cpjump1.cellprofiler.run_analysis``
side by side on the same synthetic plate and reports:

* CellProfiler seconds per site at 256 px and 1080 px (8 channels; plus the real 6-channel
  JUMP site when ``../shared/cpjump1`` is present), split into the fixed start-up cost of one
  CellProfiler call (interpreter, JVM, Bio-Formats warm-up) and the per-site module time read
  from CellProfiler's own log;
* the stage's overhead on a plate of >= 16 sites: (stage wall time - CellProfiler wall time)
  / CellProfiler wall time, with the stage's parts (load_data/fingerprint, staging,
  reading + checks, publishing, marker) and, separately, the Great Expectations suite; and the
  stage's wall time against the baseline's;
* with ``--fixed-cost N``: CellProfiler's time outside its modules split into a fixed cost per
  call and a cost per site (by hand on 1 and on N sites), i.e. what one more shard costs;
* with ``--compare-bf``: the cost of measuring texture and colocalization on the two
  out-of-focus bright-field planes too (the pipeline with and without them, same sites).

Usage (heavy: run under the team's CPU lock, ``flock /tmp/team/cpu.lock …``)::

    uv run --frozen --no-sync python benchmarks/bench_cellprofiler.py --skip 256 1080 jump --fixed-cost 4
    uv run --frozen --no-sync python benchmarks/bench_cellprofiler.py --skip overhead 256 --sites-1080 1
    uv run --frozen --no-sync python benchmarks/bench_cellprofiler.py --skip overhead 1080 jump --sites-256 4 --compare-bf

Results are printed as a Markdown table and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "plugins"))

from cpjump1 import cellprofiler as cp  # noqa: E402
from cpjump1 import storage  # noqa: E402
from cpjump1.settings import get_settings  # noqa: E402

BATCH = "2020_11_04_CPJUMP1"
JUMP_SITE = REPO.parent / "shared" / "cpjump1" / "external" / "pe2loaddata_testdata" / "Version1"
_LINE = re.compile(r"Image # (\d+), module (\S+) # \d+: CPU_time = ([0-9.]+) secs, Wall_time = ([0-9.]+) secs")


def module_seconds(log_text: str) -> tuple[float, float, int]:
    """Sum of per-module wall and CPU seconds, and the number of image sets, from a CellProfiler log."""
    wall = cpu = 0.0
    sets = set()
    for m in _LINE.finditer(log_text):
        sets.add(int(m.group(1)))
        cpu += float(m.group(3))
        wall += float(m.group(4))
    return wall, cpu, len(sets)


def per_module_cpu(log_text: str) -> dict[str, float]:
    """CPU seconds per module name (summed over image sets and repeated modules) from a CellProfiler log."""
    out: dict[str, float] = {}
    for m in _LINE.finditer(log_text):
        out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(3))
    return out


def without_out_of_focus_bf(text: str) -> str:
    """The analysis pipeline as it was before texture and colocalization covered the two
    out-of-focus bright-field planes (LowZBF, HighZBF): the variant the cost is measured against."""
    header, modules = cp.parse_pipeline(text)
    for m in modules:
        if m.name in ("MeasureTexture", "MeasureColocalization"):
            m.settings = [
                (k, ", ".join(i for i in v.split(", ") if i not in ("CorrLowZBF", "CorrHighZBF")))
                if k == "Select images to measure" else (k, v)
                for k, v in m.settings
            ]
    return cp.render_pipeline(header, modules)


def make_plate(root: Path, plate: str, wells: int, sites: int, size: int, shards: int):
    from cpjump1.load_data import run_load_data
    from cpjump1.synthetic import run_synthesize

    s = get_settings(storage_root=str(root / "data"))
    run_synthesize(BATCH, plate, s, wells=wells, sites=sites, size=size, seed=7, progress=False)
    run_load_data(BATCH, plate, s, shards=shards)
    return s


def direct_cellprofiler(
    s, plate: str, pipeline_name: str, csv_name: str, workdir: Path, rows=None, variant=None, tag: str = ""
) -> dict:
    """The baseline: CellProfiler run by hand on the plate's CSV (or on ``rows`` of it), with the
    pipeline adapted to its channels (and rewritten by ``variant`` when given)."""
    layout = storage.Layout(s.storage_root)
    csv_path = Path(layout.load_data_dir(BATCH, plate)) / csv_name
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if rows is not None:
        csv_path = workdir / f"direct-{pipeline_name}-rows.csv"
        table.iloc[rows].to_csv(csv_path, index=False)
    pipe = workdir / f"{pipeline_name}{tag}.cppipe"
    text = cp.pipeline_text(pipeline_name, cp.channels_of(table.columns), s)
    pipe.write_text(variant(text) if variant else text)
    out = workdir / f"direct-{pipeline_name}{tag}"
    cmd = [s.cellprofiler_python, "-m", "cellprofiler", "-c", "-r", "-p", str(pipe), "--data-file", str(csv_path), "-o", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, JAVA_TOOL_OPTIONS=cp.JAVA_HEAP),
        preexec_fn=cp._die_with_parent,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"direct CellProfiler failed:\n{proc.stderr[-3000:]}")
    mod_wall, mod_cpu, n = module_seconds(proc.stderr)
    return {"wall": wall, "module_wall": mod_wall, "module_cpu": mod_cpu, "sites": n,
            "modules_cpu": per_module_cpu(proc.stderr)}


def _row(label: str, channels: int, size: int, d: dict) -> dict:
    return {
        "case": label, "channels": channels, "size": size, "sites": d["sites"],
        "cp_wall_s": d["wall"], "module_wall_per_site_s": d["module_wall"] / d["sites"],
        "module_cpu_per_site_s": d["module_cpu"] / d["sites"], "startup_s": d["wall"] - d["module_wall"],
        "wall_per_site_s": d["wall"] / d["sites"],
        "modules_cpu_per_site_s": {k: round(v / d["sites"], 3) for k, v in sorted(d.get("modules_cpu", {}).items())},
    }


def per_site_case(tmp: Path, label: str, size: int, sites: int, compare_bf: bool = False) -> tuple[dict, dict | None]:
    """CellProfiler by hand on a synthetic plate; with ``compare_bf`` also the pipeline without the
    out-of-focus bright-field planes in texture and colocalization, on the same plate."""
    plate = {256: "BR00118049", 1080: "BR00118050"}.get(size, "BR00118039")
    s = make_plate(tmp / label, plate, wells=1, sites=sites, size=size, shards=1)
    cp.run_illum(BATCH, plate, s, progress=False)
    d = direct_cellprofiler(s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp / label)
    row = _row(label, 8, size, d)
    if not compare_bf:
        return row, None
    v = direct_cellprofiler(s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp / label,
                            variant=without_out_of_focus_bf, tag="-no-oof-bf")
    mods = ("MeasureTexture", "MeasureColocalization")
    bf = {
        "size": size, "sites": d["sites"],
        "with_oof_bf_cpu_per_site_s": d["module_cpu"] / d["sites"],
        "without_oof_bf_cpu_per_site_s": v["module_cpu"] / v["sites"],
        "with_oof_bf_wall_s": d["wall"], "without_oof_bf_wall_s": v["wall"],
        "modules_with_s": {m: d["modules_cpu"].get(m, 0.0) / d["sites"] for m in mods},
        "modules_without_s": {m: v["modules_cpu"].get(m, 0.0) / v["sites"] for m in mods},
    }
    bf["extra_cpu_ratio"] = bf["with_oof_bf_cpu_per_site_s"] / bf["without_oof_bf_cpu_per_site_s"] - 1
    return row, bf


def jump_site_case(tmp: Path) -> dict | None:
    if not JUMP_SITE.is_dir():
        return None
    s = get_settings(storage_root=str(tmp / "jump" / "data"))
    plate, batch = "BR00121482", "jump"
    layout = storage.Layout(s.storage_root)
    folder = Path(layout.load_data_dir(batch, plate))
    folder.mkdir(parents=True)
    table = pd.read_csv(JUMP_SITE / "load_data_version1.csv", dtype=str)
    for col in [c for c in table.columns if c.startswith("PathName_Orig")]:
        table[col] = str(JUMP_SITE / "images")
    table.to_csv(folder / cp.LOAD_DATA_CSV, index=False)
    for ch in cp.channels_of(table.columns):
        table[f"FileName_Illum{ch}"] = f"{plate}_Illum{ch}.npy"
        table[f"PathName_Illum{ch}"] = layout.illum_dir(batch, plate)
    table.to_csv(folder / cp.LOAD_DATA_WITH_ILLUM_CSV, index=False)
    cp.run_illum(batch, plate, s, progress=False)
    res = cp.run_analysis(batch, plate, 0, s, progress=False, validate=False)
    log_text = Path(res.files[cp.LOG_NAME]).read_text()
    mod_wall, mod_cpu, n = module_seconds(log_text)
    counts = res.counts
    return {
        "case": "real JUMP site (6 ch, near-empty field)", "channels": 6, "size": 1080, "sites": n,
        "cp_wall_s": res.seconds["cellprofiler"], "module_wall_per_site_s": mod_wall / n,
        "module_cpu_per_site_s": mod_cpu / n, "startup_s": res.seconds["cellprofiler"] - mod_wall,
        "wall_per_site_s": res.seconds["cellprofiler"] / n, "objects": counts.get("Nuclei"),
    }


def overhead_case(
    tmp: Path, wells: int, sites: int, shards: int, size: int = 256, direct: bool = True
) -> tuple[dict, dict | None]:
    """The stage on every shard of a plate, timed in parts; CellProfiler by hand on shard 0's rows.

    The split: *CellProfiler* is the wall time of the ``cellprofiler`` subprocess inside the stage
    (interpreter + JVM start, Bio-Formats warm-up, modules, export), exactly what a user running
    it by hand would also wait for; *plumbing* is everything else the stage does (reading
    load_data and the manifest, fingerprints, staging, reading the tables, publishing, the
    marker); the *suite* is the single_cell Great Expectations run. Sharding a plate into N
    calls costs N - 1 extra CellProfiler start-ups that one call on the whole plate would not
    pay; those are measured from each shard's log (call wall minus module wall) and reported as
    the sharding cost, on top of plumbing + suite."""
    plate = "BR00117006"
    s = make_plate(tmp / "ovh", plate, wells=wells, sites=sites, size=size, shards=shards)
    illum = cp.run_illum(BATCH, plate, s, progress=False)
    manifest = json.loads((Path(storage.Layout(s.storage_root).load_data_dir(BATCH, plate)) / "shards.json").read_text())
    parts: dict[str, float] = {}
    walls, startups, per_shard = [], [], []
    cp_wall = module_wall = module_cpu = 0.0
    for i in range(shards):
        t0 = time.perf_counter()
        res = cp.run_analysis(BATCH, plate, i, s, progress=False)
        walls.append(time.perf_counter() - t0)
        cp_wall += res.seconds["cellprofiler"]
        mw, mc, n = module_seconds(Path(res.files[cp.LOG_NAME]).read_text())
        module_wall += mw
        module_cpu += mc
        startups.append(res.seconds["cellprofiler"] - mw)
        per_shard.append({"shard": i, "sites": n, "stage_wall_s": walls[-1], "cp_wall_s": res.seconds["cellprofiler"],
                          "module_wall_s": mw, "module_cpu_s": mc})
        for k, v in res.seconds.items():
            parts[k] = parts.get(k, 0.0) + v
    stage_wall = sum(walls)
    t0 = time.perf_counter()
    skipped = [cp.run_analysis(BATCH, plate, i, s, progress=False).skipped for i in range(shards)]
    rerun = time.perf_counter() - t0
    validation = parts.get("validation", 0.0)
    plumbing = stage_wall - cp_wall - validation
    # upper bound of what N - 1 extra calls cost: their whole non-module time, which also holds
    # per-site work (export, per-image-set bookkeeping); --fixed-cost measures the fixed part
    extra_starts = (shards - 1) * sum(startups) / len(startups)
    n_sites = wells * sites
    overhead = {
        "sites": n_sites, "shards": shards, "size": size, "illum_wall_s": illum.seconds.get("total"),
        "illum_cp_wall_s": illum.seconds.get("cellprofiler"),
        "stage_wall_s": stage_wall, "stage_cp_wall_s": cp_wall, "stage_cp_module_wall_s": module_wall,
        "stage_cp_module_cpu_s": module_cpu, "cp_wall_per_site_s": cp_wall / n_sites,
        "cp_module_cpu_per_site_s": module_cpu / n_sites, "cp_startup_per_call_s": startups,
        "overhead_s": plumbing, "overhead_ratio": plumbing / cp_wall,
        "validation_s": validation, "validation_ratio": validation / cp_wall,
        "stage_overhead_s": plumbing + validation, "stage_overhead_ratio": (plumbing + validation) / cp_wall,
        "sharding_extra_calls_upper_s": extra_starts,
        "overhead_vs_one_call_upper_ratio": (plumbing + validation + extra_starts) / (cp_wall - extra_starts),
        "parts_s": {k: round(v, 3) for k, v in parts.items()}, "per_shard": per_shard,
        "rerun_all_skipped": all(skipped), "rerun_s": rerun,
    }
    if not direct:
        return overhead, None
    d = direct_cellprofiler(
        s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp / "ovh", rows=manifest["shards"][0]["rows"]
    )
    overhead.update({
        "direct_cp_wall_shard0_s": d["wall"], "stage_wall_shard0_s": walls[0],
        "stage_vs_direct_shard0": walls[0] / d["wall"],
        # the same sites' CellProfiler module CPU in the stage and by hand: a difference here is
        # the machine (other processes), not the stage, which runs nothing while CellProfiler runs
        "direct_module_cpu_shard0_s": d["module_cpu"], "stage_module_cpu_shard0_s": per_shard[0]["module_cpu_s"],
        "direct_nonmodule_wall_shard0_s": d["wall"] - d["module_wall"],
        "stage_nonmodule_wall_shard0_s": per_shard[0]["cp_wall_s"] - per_shard[0]["module_wall_s"],
    })
    return overhead, _row(f"synthetic {size} px (shard 0 of the overhead plate, by hand)", 8, size, d)


def fixed_cost_case(tmp: Path, sites: int, size: int = 256) -> dict:
    """Split CellProfiler's time outside its modules into a fixed cost per call and a cost per
    site: by hand on the first site alone and on all ``sites`` of one plate. The non-module time
    of a call (wall minus the modules' wall from its log) is modelled as ``fixed + per_site * n``."""
    plate = "BR00118041"
    s = make_plate(tmp / "fixed", plate, wells=1, sites=sites, size=size, shards=1)
    cp.run_illum(BATCH, plate, s, progress=False)
    one = direct_cellprofiler(s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp / "fixed", rows=[0], tag="-1")
    many = direct_cellprofiler(s, plate, "analysis", cp.LOAD_DATA_WITH_ILLUM_CSV, tmp / "fixed", tag=f"-{sites}")
    nm1, nmn = one["wall"] - one["module_wall"], many["wall"] - many["module_wall"]
    per_site = (nmn - nm1) / (many["sites"] - one["sites"])
    return {
        "size": size, "sites": [one["sites"], many["sites"]], "wall_s": [one["wall"], many["wall"]],
        "module_wall_s": [one["module_wall"], many["module_wall"]], "nonmodule_wall_s": [nm1, nmn],
        "nonmodule_per_site_s": per_site, "fixed_per_call_s": nm1 - per_site * one["sites"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites-256", type=int, default=4, help="sites for the 256 px per-site case")
    ap.add_argument("--sites-1080", type=int, default=2, help="sites for the 1080 px per-site case")
    ap.add_argument("--ovh-wells", type=int, default=4)
    ap.add_argument("--ovh-sites", type=int, default=4, help="sites per well in the overhead case (wells x sites >= 16)")
    ap.add_argument("--ovh-shards", type=int, default=2)
    ap.add_argument("--ovh-size", type=int, default=256, help="image size in the overhead case")
    ap.add_argument("--skip", nargs="*", default=["256"], choices=["256", "1080", "jump", "overhead", "ovh-direct"],
                    help="cases to leave out (default: the separate 256 px case; the overhead case measures 256 px); "
                         "ovh-direct: the by-hand CellProfiler run on shard 0 of the overhead plate")
    ap.add_argument("--compare-bf", action="store_true",
                    help="in the 256 px case, also run the pipeline without the out-of-focus bright-field planes "
                         "in texture and colocalization (their cost)")
    ap.add_argument("--fixed-cost", type=int, default=0, metavar="N",
                    help="also run CellProfiler by hand on 1 and on N sites of a 256 px plate to split its "
                         "non-module time into a fixed cost per call and a cost per site (the price of one more shard)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_cellprofiler.json"))
    args = ap.parse_args(argv)
    for k in [k for k in os.environ if k.startswith("CPJUMP1_")]:
        del os.environ[k]
    load = os.getloadavg()
    info = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "loadavg_at_start": [round(x, 2) for x in load],
        "command": "uv run --frozen --no-sync python benchmarks/bench_cellprofiler.py " + " ".join(argv or sys.argv[1:]),
    }
    rows = []
    overhead = bf = fixed = None
    out = Path(args.out).resolve()  # the cases run in a scratch folder (os.chdir below)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> dict:
        result = {**info, "loadavg_now": [round(x, 2) for x in os.getloadavg()], "per_site": rows,
                  "overhead": overhead, "out_of_focus_bf_cost": bf, "fixed_cost": fixed}
        out.write_text(json.dumps(result, indent=2))
        return result

    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        tmp = Path(tmp)
        os.chdir(tmp)
        if "overhead" not in args.skip:
            overhead, row = overhead_case(
                tmp, args.ovh_wells, args.ovh_sites, args.ovh_shards, args.ovh_size, "ovh-direct" not in args.skip
            )
            if row:
                rows.append(row)
            save()
        if "256" not in args.skip:
            row, bf = per_site_case(tmp, "synthetic 256 px", 256, args.sites_256, args.compare_bf)
            rows.append(row)
            save()
        if "jump" not in args.skip:
            r = jump_site_case(tmp)
            if r:
                rows.append(r)
                save()
        if args.fixed_cost:
            fixed = fixed_cost_case(tmp, args.fixed_cost)
            if overhead:
                extra = (overhead["shards"] - 1) * fixed["fixed_per_call_s"]
                overhead["sharding_extra_calls_s"] = extra
                overhead["overhead_vs_one_call_ratio"] = (overhead["stage_overhead_s"] + extra) / (
                    overhead["stage_cp_wall_s"] - extra)
            save()
        if "1080" not in args.skip:
            rows.append(per_site_case(tmp, "synthetic 1080 px", 1080, args.sites_1080)[0])
    save()
    print(f"# CellProfiler stage benchmark — {info['date']}, {info['machine']}, load {info['loadavg_at_start']}\n")
    if rows:
        print("| case | sites | CellProfiler wall per site (s) | module wall per site (s) | module CPU per site (s) | start-up per call (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['case']} | {r['sites']} | {r['wall_per_site_s']:.1f} | {r['module_wall_per_site_s']:.1f} | "
                  f"{r['module_cpu_per_site_s']:.1f} | {r['startup_s']:.1f} |")
    if bf:
        print(f"\nOut-of-focus bright-field planes in texture + colocalization ({bf['sites']} sites, {bf['size']} px): "
              f"{bf['with_oof_bf_cpu_per_site_s']:.1f} vs {bf['without_oof_bf_cpu_per_site_s']:.1f} module CPU s per site "
              f"(+{100 * bf['extra_cpu_ratio']:.1f} %); modules with {bf['modules_with_s']}, without {bf['modules_without_s']}")
    if fixed:
        print(f"\nCellProfiler outside its modules ({fixed['size']} px, by hand on {fixed['sites']} sites): "
              f"{fixed['nonmodule_wall_s'][0]:.1f} s and {fixed['nonmodule_wall_s'][1]:.1f} s = "
              f"{fixed['fixed_per_call_s']:.1f} s per call + {fixed['nonmodule_per_site_s']:.2f} s per site")
    if overhead:
        o = overhead
        print(f"\nOverhead on {o['sites']} sites in {o['shards']} shards: stage {o['stage_wall_s']:.1f} s, of which "
              f"CellProfiler {o['stage_cp_wall_s']:.1f} s; plumbing {o['overhead_s']:.2f} s = "
              f"{100 * o['overhead_ratio']:.2f} % of CellProfiler; single_cell suite {o['validation_s']:.1f} s = "
              f"{100 * o['validation_ratio']:.2f} %; together {100 * o['stage_overhead_ratio']:.2f} %; with the "
              f"{o['shards'] - 1} extra CellProfiler call(s) of sharding against one call on the whole plate: at most "
              f"{100 * o['overhead_vs_one_call_upper_ratio']:.2f} % (whole non-module time, "
              f"{o['sharding_extra_calls_upper_s']:.1f} s)"
              + (f", {100 * o['overhead_vs_one_call_ratio']:.2f} % with the measured fixed cost per call "
                 f"({o['sharding_extra_calls_s']:.1f} s)" if "sharding_extra_calls_s" in o else "")
              + f"; rerun skipped all: {o['rerun_all_skipped']} in {o['rerun_s']:.2f} s")
        if "direct_cp_wall_shard0_s" in o:
            print(f"shard 0: stage {o['stage_wall_shard0_s']:.1f} s vs CellProfiler by hand "
                  f"{o['direct_cp_wall_shard0_s']:.1f} s (ratio {o['stage_vs_direct_shard0']:.3f})")
        print(f"parts: {o['parts_s']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
