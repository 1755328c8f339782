"""DAG builder: one DAG per CPJUMP1 batch and the benchmark DAG.

Shape of a batch DAG (``cpjump1_<batch>``)::

    plan ──> plate[i] (mapped task group, one map index per plate)
               load_data → validate_load_data → illum → analysis (all shards)
               → validate_single_cell → aggregate → profiles → validate_profiles
               → deep_profiles → validate_deep_profiles
         ──> feature_select_batch (emits the batch's profiles Asset) ──> summary

* ``plan`` checks the run's params and returns the plates to process; the task group is
  mapped over that list (dynamic task mapping), so a 51-plate batch is 51 map indexes.
* Tasks inside a mapped group depend on the *same* map index upstream: a failed plate
  marks only its own downstream tasks ``upstream_failed``; the other plates go on.
* Every stage task uses trigger rule ``none_failed``: a stage switched off in the form is
  skipped and the next stage still runs on the existing outputs.
* ``summary`` runs whatever happened (``all_done``), logs a table of plates done and failed
  with the task that failed, returns it as XCom and fails the run if any plate failed.

Schedule: see :func:`batch_schedule`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.sdk import DAG, Asset, AssetAny, TriggerRule, task, task_group

from cpjump1.airflow import stages as st
from cpjump1.airflow.batches import BatchInfo, batches, dag_id_for
from cpjump1.airflow.factory import stage_operator
from cpjump1.airflow.params import batch_params, benchmark_params
from cpjump1.settings import Settings, get_settings

PLATE_GROUP = "plate"
BENCHMARK_DAG_ID = "cpjump1_benchmark"
TAGS = ["cpjump1"]
#: Stage tasks of one plate run one after another; many plates run side by side.
MAX_ACTIVE_TASKS = 16
DOC_URL = "docs/OPERATIONS.md"


def profiles_asset(batch: str) -> Asset:
    """The Asset a batch DAG emits when its profiles (plate and batch level) are written.

    The ``x-`` URI scheme marks a project-private scheme; Airflow then skips provider URI
    normalizers (whose discovery imports boto3 and costs over a second of parse time).
    """
    return Asset(name=f"cpjump1_profiles_{batch}", uri=f"x-cpjump1://profiles/{batch}", group="cpjump1")


def batch_schedule(info: BatchInfo, schedule: str | None = None) -> Any:
    """Schedule of a batch DAG: ``schedule``, else ``settings.dag_schedule``
    (``CPJUMP1_DAG_SCHEDULE``), else ``acquisition``.

    * ``acquisition`` (default): an ``EventsTimetable`` with one event at midnight UTC of the
      batch's acquisition date (the date in its name). It never starts runs by itself
      (``catchup=False`` and the date is past) but gives ``airflow backfill create
      --from-date ... --to-date ...`` exactly one run per batch acquired in that window.
    * ``none``: manual and API triggers only.
    * anything else: a cron expression (``CronTriggerTimetable``, UTC) for periodic
      reprocessing; a backfill then creates one run per cron tick in the window.
    """
    from airflow.sdk import CronTriggerTimetable

    # The core class, not airflow.sdk.EventsTimetable: in Airflow 3.3.2 the SDK class is
    # serialized without the "_summary" key that the scheduler's deserializer requires.
    from airflow.timetables.events import EventsTimetable

    schedule = (schedule or "acquisition").strip()
    if schedule == "acquisition":
        import pendulum

        when = pendulum.datetime(info.acquisition_date.year, info.acquisition_date.month, info.acquisition_date.day, tz="UTC")
        return EventsTimetable(
            event_dates=[when], restrict_to_events=False, description=f"acquired {info.acquisition_date}"
        )
    if schedule.lower() == "none":
        return None
    return CronTriggerTimetable(schedule, timezone="UTC")


@task(trigger_rule=TriggerRule.ALL_SUCCESS)
def plan(batch: str, plates_all: list[str], **context: Any) -> list[str]:
    """Validate the run's params and return the plates to process (the mapping input)."""
    from cpjump1.airflow.factory import run_params
    from cpjump1.airflow.params import resolve

    chosen = resolve(batch, plates_all, run_params(context))
    print(
        f"batch {batch}: {len(chosen['plates'])} plate(s) {chosen['plates']}; stages {chosen['stages']}; "
        f"shards {chosen['shards']}; force {chosen['force']}"
    )
    return chosen["plates"]


@task(trigger_rule=TriggerRule.ALL_DONE)
def summary(batch: str, plates: list[str] | None, **context: Any) -> dict[str, Any]:
    """Log and return the plates done and failed; fail the run if any plate failed."""
    from airflow.sdk.exceptions import AirflowFailException

    from cpjump1.airflow.summary import format_summary, summarize

    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id], task_group_id=PLATE_GROUP)
    batch_states = ti.get_task_states(
        dag_id=ti.dag_id, run_ids=[ti.run_id], task_ids=["plan", st.FEATURE_SELECT_BATCH.task_id]
    )
    result = summarize(
        batch,
        list(plates or []),
        states.get(ti.run_id, {}),
        batch_states.get(ti.run_id, {}),
        group=PLATE_GROUP,
        order=[t.task_id for t in st.PLATE_TASKS],
    )
    print(format_summary(result))
    if result["failed"] or result["batch_failed"]:
        raise AirflowFailException(
            f"{len(result['failed'])} of {len(result['plates'])} plate(s) failed: "
            + ", ".join(f"{f['plate']} at {f['task']}" for f in result["failed"])
            + (f"; batch-level tasks failed: {result['batch_failed']}" if result["batch_failed"] else "")
        )
    return result


def build_batch_dag(
    batch: str, settings: Settings | None = None, info: BatchInfo | None = None, schedule: str | None = None
) -> DAG:
    """The DAG of one batch (see the module docstring)."""
    settings = settings or get_settings()
    schedule = schedule or getattr(settings, "dag_schedule", None)
    info = info or batches(settings.metadata_dir)[batch]
    doc = (
        f"## CPJUMP1 batch `{batch}`\n\n{len(info.plates)} plates, acquired {info.acquisition_date}. "
        f"Mode: **{settings.mode}**. Trigger with a subset of plates and stages in the form; "
        f"see `{DOC_URL}`."
    )
    with DAG(
        dag_id=dag_id_for(batch),
        description=f"CPJUMP1 {batch}: {len(info.plates)} plates, images to profiles",
        schedule=batch_schedule(info, schedule),
        start_date=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        catchup=False,
        max_active_runs=1,
        max_active_tasks=MAX_ACTIVE_TASKS,
        params=batch_params(batch, info.plates),
        tags=[*TAGS, "batch", settings.mode],
        doc_md=doc,
        default_args={"owner": "cpjump1"},
    ) as dag:
        plates = plan(batch, list(info.plates))

        @task_group(group_id=PLATE_GROUP)
        def plate_group(plate: str) -> None:
            previous = None
            for t in st.PLATE_TASKS:
                op = stage_operator(
                    t.task_id,
                    batch=batch,
                    plate=plate,
                    settings=settings,
                    trigger_rule=TriggerRule.NONE_FAILED,
                )
                if previous is not None:
                    previous >> op
                previous = op

        groups = plate_group.expand(plate=plates)
        batch_fs = stage_operator(
            st.FEATURE_SELECT_BATCH.task_id,
            batch=batch,
            settings=settings,
            trigger_rule=TriggerRule.ALL_DONE,
            outlets=[profiles_asset(batch)],
        )
        groups >> batch_fs
        batch_fs >> summary(batch, plates)
    return dag


def build_benchmark_dag(settings: Settings | None = None) -> DAG:
    """The benchmark DAG: runs whenever any batch DAG emits its profiles Asset."""
    settings = settings or get_settings()
    infos = batches(settings.metadata_dir)
    assets = [profiles_asset(b) for b in sorted(infos)]
    with DAG(
        dag_id=BENCHMARK_DAG_ID,
        description="Percent Replicating, Percent Matching and mAP over every profiled batch",
        schedule=AssetAny(*assets),
        start_date=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        catchup=False,
        max_active_runs=1,
        params=benchmark_params(),
        tags=[*TAGS, "benchmark", settings.mode],
        doc_md="## CPJUMP1 benchmark\n\nRuns `cpjump1 benchmark` over `<storage root>/profiles` "
        "whenever a batch DAG updates its profiles.",
        default_args={"owner": "cpjump1"},
    ) as dag:
        stage_operator(st.BENCHMARK.task_id, settings=settings)
    return dag


def build_all(settings: Settings | None = None) -> dict[str, DAG]:
    """Every DAG of the project by DAG id (what ``dags/cpjump1_dags.py`` exposes)."""
    settings = settings or get_settings()
    out = {}
    for name in batches(settings.metadata_dir):
        dag = build_batch_dag(name, settings)
        out[dag.dag_id] = dag
    bench = build_benchmark_dag(settings)
    out[bench.dag_id] = bench
    return out
