"""``make demo``: a CPJUMP1 batch DAG run end to end in local mode on synthetic plates.

1. synthesizes two replicate compound plates of ``2020_11_04_CPJUMP1`` (same plate map, so
   every treated well has a replicate on the other plate; about a quarter of the wells are
   DMSO negative controls) in the real Harmony layout;
2. runs the batch DAG ``cpjump1_2020_11_04_CPJUMP1`` in-process with Airflow's ``dag.test()``
   (a real DagRun in a SQLite metadata DB under ``airflow_home/``; every task runs its
   ``cpjump1`` stage as a subprocess), restricted to the two plates by the run's params;
3. runs the benchmark DAG ``cpjump1_benchmark`` (in a deployment the batch DAG's Asset event
   starts it; ``dag.test`` does not follow Asset events, so the demo starts it itself);
4. prints where the profiles and the benchmark report are.

Re-running the demo re-checks fingerprints only. Environment: ``CPJUMP1_STORAGE_ROOT``
(default ``./data``), ``AIRFLOW_HOME`` (default ``<repo>/airflow_home``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from cpjump1.settings import get_settings, repo_root

DEMO_BATCH = "2020_11_04_CPJUMP1"
DEMO_PLATES = ("BR00117010", "BR00117011")  # U2OS 48-hour compound plates 3 and 4
DEMO_WELLS = 8
DEMO_SITES = 1
DEMO_SIZE = 256
DEMO_SHARDS = 1


def airflow_environment(home: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for an embedded Airflow using this checkout's DAGs and a local SQLite DB."""
    home = Path(home or os.environ.get("AIRFLOW_HOME") or repo_root() / "airflow_home").resolve()
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(repo_root() / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
    }


def migrate_db(env: dict[str, str]) -> None:
    """Create or upgrade the metadata DB (idempotent) and the pools the stage tasks use."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    from airflow.models.pool import Pool

    from cpjump1 import deploy

    for name, slots in {deploy.CELLPROFILER_POOL: 2, deploy.GPU_POOL: 1}.items():
        Pool.create_or_update_pool(name, slots=slots, description="cpjump1 (make demo)", include_deferred=False)


def run_dag(dag_id: str, conf: dict) -> object:
    """Run one DAG of ``dags/`` to completion in this process; returns the DagRun."""
    from cpjump1.airflow.builder import build_all

    dag = build_all()[dag_id]
    return dag.test(run_conf=conf)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpjump1.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--wells", type=int, default=DEMO_WELLS)
    parser.add_argument("--sites", type=int, default=DEMO_SITES)
    parser.add_argument("--size", type=int, default=DEMO_SIZE)
    parser.add_argument("--shards", type=int, default=DEMO_SHARDS)
    parser.add_argument("--force", action="store_true", help="recompute every stage")
    args = parser.parse_args(argv)

    from cpjump1.cli import configure_logging

    configure_logging()
    settings = get_settings()
    root = settings.storage_root
    if "://" not in root:
        root = str(Path(root).resolve())
    env = {**airflow_environment(), "CPJUMP1_STORAGE_ROOT": root, "CPJUMP1_MODE": "local"}
    os.environ.update(env)  # before Airflow is imported, and for the stage subprocesses
    settings = get_settings()

    from cpjump1.catalog import load_catalog
    from cpjump1.synthetic import run_synthesize

    cat = load_catalog(settings.metadata_dir)
    print(f"catalog: {len(cat.batches)} batches, {len(cat.all_plates())} plates (`cpjump1 catalog` lists them)")
    for plate in DEMO_PLATES:
        rec = cat.plate(DEMO_BATCH, plate)
        print(f"  {rec.key}: {rec.description} ({rec.perturbation}, plate map {rec.plate_map})")
    for plate in DEMO_PLATES:
        folder = run_synthesize(
            DEMO_BATCH, plate, settings, wells=args.wells, sites=args.sites, size=args.size, seed=0
        )
        print(f"synthetic plate {DEMO_BATCH}/{plate}: {folder}")

    print(f"Airflow metadata DB: {env['AIRFLOW_HOME']}")
    migrate_db(env)

    from cpjump1.airflow.batches import dag_id_for
    from cpjump1.airflow.builder import BENCHMARK_DAG_ID

    conf = {
        "plates": list(DEMO_PLATES),
        "shards": args.shards,
        "force": args.force,
        "allow_missing_wells": True,  # a synthetic plate images only a few wells of its plate map
    }
    batch_run = run_dag(dag_id_for(DEMO_BATCH), conf)
    print(f"{dag_id_for(DEMO_BATCH)} run {batch_run.run_id}: {batch_run.state}")
    if str(batch_run.state) not in ("success", "DagRunState.SUCCESS"):
        print("the batch run failed; see the summary task's log above", file=sys.stderr)
        return 1
    bench_run = run_dag(BENCHMARK_DAG_ID, {"modality": "cellprofiler"})
    print(f"{BENCHMARK_DAG_ID} run {bench_run.run_id}: {bench_run.state}")

    from cpjump1.storage import Layout, join

    layout = Layout(root)
    print("\nProfiles:")
    for plate in DEMO_PLATES:
        print(f"  {layout.profiles_dir(DEMO_BATCH, plate)}")
    report = join(layout.benchmark_dir("cellprofiler"), "report.md")
    print(f"Benchmark report: {report}")
    print("Web UI with these DAGs and runs: make airflow")
    return 0 if str(bench_run.state) in ("success", "DagRunState.SUCCESS") else 1


if __name__ == "__main__":
    sys.exit(main())
