"""DAG files: import cleanly, parse fast without stage libraries, have the intended shape."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("airflow.sdk")

from cpjump1.airflow import stages as st  # noqa: E402
from cpjump1.airflow.batches import batches, dag_id_for  # noqa: E402
from cpjump1.airflow.summary import format_summary, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DAGS = REPO / "dags"
HEAVY = ("pandas", "pycytominer", "great_expectations", "copairs", "cytotable", "duckdb", "tensorflow", "cellprofiler")
PARSE_BUDGET_S = 2.0

# Runs in a fresh interpreter set up like the DAG processor's parsing process: Airflow is
# imported, and so are the Airflow modules the DAG file imports at top level (the manager
# pre-imports them once, [dag_processor] parsing_pre_import_modules, and forks the parsing
# processes from it); nothing of cpjump1 is imported yet.
PARSE_SCRIPT = r"""
import importlib, json, sys, time
import airflow.sdk
from airflow.dag_processing.dagbag import DagBag
from airflow.utils.file import iter_airflow_imports
for dag_file in __import__("pathlib").Path(sys.argv[1]).glob("*.py"):
    for module in iter_airflow_imports(str(dag_file)):
        importlib.import_module(module)
assert not [m for m in sys.modules if m.startswith("cpjump1")]
t0 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - t0
heavy = [m for m in sys.argv[2].split(",") if m in sys.modules]
print("RESULT" + json.dumps({"seconds": seconds, "errors": {str(k): v for k, v in bag.import_errors.items()},
      "dags": sorted(bag.dags), "heavy": heavy}))
"""


def _parse_in_subprocess(tmp_path: Path, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CPJUMP1_")}
    environ.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False", **env)
    out = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(DAGS), ",".join(HEAVY)],
        capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_dagbag_imports_without_errors_fast_and_light(tmp_path):
    expected = sorted([dag_id_for(b) for b in batches(REPO / "metadata")] + ["cpjump1_benchmark"])
    best = None
    for _ in range(3):  # best of three: the CI machine is shared with other jobs
        result = _parse_in_subprocess(tmp_path)
        assert result["errors"] == {}
        assert result["dags"] == expected
        assert result["heavy"] == [], f"stage libraries imported at parse time: {result['heavy']}"
        best = result["seconds"] if best is None else min(best, result["seconds"])
        if best < PARSE_BUDGET_S:
            break
    assert best < PARSE_BUDGET_S, f"dags/ took {best:.2f} s to parse"


def test_dagbag_imports_in_kubernetes_mode(tmp_path):
    best = None
    for _ in range(3):
        result = _parse_in_subprocess(tmp_path, CPJUMP1_MODE="kubernetes")
        assert result["errors"] == {}
        assert len(result["dags"]) == len(batches(REPO / "metadata")) + 1
        assert result["heavy"] == []
        best = result["seconds"] if best is None else min(best, result["seconds"])
        if best < PARSE_BUDGET_S:
            break
    assert best < PARSE_BUDGET_S, f"dags/ took {best:.2f} s to parse in kubernetes mode"


def test_light_batch_reader_agrees_with_catalog():
    from cpjump1.catalog import load_catalog

    cat = load_catalog(REPO / "metadata")
    light = batches(REPO / "metadata")
    assert set(light) == set(cat.batches)
    for name, info in light.items():
        assert info.plates == cat.batches[name].plates
        assert info.acquisition_date == cat.batches[name].acquisition_date
    assert len(light["2020_11_04_CPJUMP1"].plates) == 51


@pytest.fixture
def dag_51(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    from cpjump1.airflow.builder import build_batch_dag

    return build_batch_dag("2020_11_04_CPJUMP1", settings)


def test_batch_dag_shape(dag_51):
    from airflow.sdk import TriggerRule

    plate_ids = [f"plate.{t.task_id}" for t in st.PLATE_TASKS]
    assert [t.task_id for t in dag_51.tasks] == ["plan", *plate_ids, "feature_select_batch", "summary"]
    for upstream, downstream in zip(plate_ids, plate_ids[1:]):
        assert dag_51.get_task(upstream).downstream_task_ids == {downstream}
        assert dag_51.get_task(downstream).trigger_rule == TriggerRule.NONE_FAILED
    group = dag_51.task_group_dict["plate"]
    assert type(group).__name__ == "MappedTaskGroup"
    assert dag_51.get_task("feature_select_batch").trigger_rule == TriggerRule.ALL_DONE
    assert dag_51.get_task("summary").trigger_rule == TriggerRule.ALL_DONE
    assert [a.name for a in dag_51.get_task("feature_select_batch").outlets] == ["cpjump1_profiles_2020_11_04_CPJUMP1"]
    assert dag_51.get_task("plate.analysis").pool == "cpjump1-cellprofiler"


def test_mapping_stays_within_max_map_length(dag_51):
    """One map index per plate, whatever the shard count: 51 plates << max_map_length."""
    from airflow.configuration import conf

    max_len = conf.getint("core", "max_map_length")
    largest = max(len(b.plates) for b in batches(REPO / "metadata").values())
    assert largest == 51 <= max_len
    # The shard count never multiplies the map length: analysis is one task per plate.
    mapped_over = {t.task_id for t in dag_51.tasks if t.task_id.startswith("plate.")}
    assert "plate.analysis" in mapped_over and not any("shard" in t for t in mapped_over)


def test_params_form_schema_validates(dag_51):
    from airflow.sdk.exceptions import ParamValidationError

    plates = batches(REPO / "metadata")["2020_11_04_CPJUMP1"].plates

    def check(conf):
        params = copy.deepcopy(dag_51.params)
        params.update(conf)
        return params.validate()

    ok = check({"plates": [plates[0]], "stages": ["load_data"], "force": True, "shards": 2})
    assert ok["plates"] == [plates[0]] and ok["shards"] == 2
    assert check({})["stages"] == st.default_stages("2020_11_04_CPJUMP1")
    for bad in ({"plates": ["BR_NOT_A_PLATE"]}, {"shards": 0}, {"shards": 10_000}, {"stages": ["nope"]},
                {"stages": []}, {"force": "yes"}):
        with pytest.raises(ParamValidationError):
            check(bad)
    assert "deep_profiles" not in check({})["stages"]


def test_deep_profiles_default_only_for_the_dl_batch():
    assert "deep_profiles" in st.default_stages("2020_11_04_CPJUMP1_DL")
    assert "deep_profiles" not in st.default_stages("2020_11_18_CPJUMP1_TimepointDay1")


def test_plan_resolves_params():
    from cpjump1.airflow.params import resolve
    from cpjump1.errors import UnknownNameError

    plates = ["A", "B", "C"]
    assert resolve("b", plates, {"plates": ["C", "A"], "shards": 3})["plates"] == ["A", "C"]
    assert resolve("b", plates, {})["plates"] == plates
    with pytest.raises(UnknownNameError, match="Z"):
        resolve("b", plates, {"plates": ["Z"]})


def test_acquisition_schedule_gives_one_run_per_batch(settings):
    """The backfill window 2020-11-01..2020-11-30 holds exactly the batches acquired in November."""
    from airflow.serialization.encoders import coerce_to_core_timetable
    from airflow.timetables.base import TimeRestriction

    from cpjump1.airflow.builder import build_batch_dag

    start, end = dt.datetime(2020, 11, 1, tzinfo=dt.timezone.utc), dt.datetime(2020, 11, 30, tzinfo=dt.timezone.utc)
    runs = {}
    for name in batches(REPO / "metadata"):
        tt = coerce_to_core_timetable(build_batch_dag(name, settings).timetable)
        info = tt.next_dagrun_info(last_automated_data_interval=None,
                                   restriction=TimeRestriction(earliest=start, latest=end, catchup=True))
        runs[name] = info.logical_date.date() if info else None
        # never starts on its own: catchup is off and the acquisition date is past
        assert tt.next_dagrun_info(last_automated_data_interval=None,
                                   restriction=TimeRestriction(earliest=start, latest=None, catchup=False)) is None
    assert runs["2020_11_04_CPJUMP1"] == dt.date(2020, 11, 4)
    assert runs["2020_11_19_TimepointDay4"] == dt.date(2020, 11, 19)
    assert runs["2020_12_08_CPJUMP1_Bleaching"] is None


def test_cron_schedule_for_reprocessing(settings):
    from airflow.serialization.encoders import coerce_to_core_timetable

    from cpjump1.airflow.builder import build_batch_dag

    dag = build_batch_dag("2020_11_04_CPJUMP1", settings, schedule="0 3 * * 0")
    assert "0 3 * * 0" in coerce_to_core_timetable(dag.timetable).summary
    manual = coerce_to_core_timetable(build_batch_dag("2020_11_04_CPJUMP1", settings, schedule="none").timetable)
    assert not manual.can_be_scheduled
    from_settings = build_batch_dag("2020_11_04_CPJUMP1", settings.model_copy(update={"dag_schedule": "0 4 1 * *"}))
    assert "0 4 1 * *" in coerce_to_core_timetable(from_settings.timetable).summary


def test_benchmark_dag_scheduled_on_batch_assets(settings):
    from cpjump1.airflow.builder import build_benchmark_dag

    dag = build_benchmark_dag(settings)
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"  # any batch's new profiles trigger a run
    names = {a.name for a in condition.objects}
    expected = {f"cpjump1_profiles_{b}" for b in batches(REPO / "metadata")}
    assert names == expected
    assert [t.task_id for t in dag.tasks] == ["benchmark"]


def test_summary_reports_done_and_failed_plates():
    states = {
        "plate.load_data_0": "success", "plate.validate_load_data_0": "success", "plate.illum_0": "skipped",
        "plate.load_data_1": "success", "plate.validate_load_data_1": "failed", "plate.illum_1": "upstream_failed",
        "plate.load_data_2": "success", "plate.validate_load_data_2": "success", "plate.illum_2": "success",
    }
    result = summarize("B", ["P0", "P1", "P2"], states, {"feature_select_batch": "success"},
                       order=[t.task_id for t in st.PLATE_TASKS])
    assert [d["plate"] for d in result["done"]] == ["P0", "P2"]
    assert result["failed"] == [{"plate": "P1", "task": "validate_load_data", "state": "failed"}]
    text = format_summary(result)
    assert "P1" in text and "FAILED" in text and "validate_load_data" in text


# A batch DAG run in a fresh interpreter (dag.test(): a real DagRun in a temporary SQLite DB,
# every task in order, the stages as subprocesses).
RUN_SCRIPT = r"""
import json, sys
from cpjump1.airflow.builder import build_all
dag = build_all()[sys.argv[1]]
run = dag.test(run_conf=json.loads(sys.argv[2]))
states = {f"{ti.task_id}[{ti.map_index}]": str(ti.state) for ti in run.get_task_instances()}
print("RESULT" + json.dumps({"state": str(run.state), "states": states}))
"""


def test_failed_plate_does_not_stop_the_other_plates(tmp_path):
    """Two plates, one without images: it fails at load_data, the other goes on; the summary
    names the failed plate and task, and the run ends failed."""
    from cpjump1.settings import get_settings
    from cpjump1.synthetic import run_synthesize

    good, missing = "BR00117010", "BR00117011"
    storage_root = tmp_path / "data"
    run_synthesize("2020_11_04_CPJUMP1", good, get_settings(storage_root=str(storage_root)), wells=4, sites=1,
                   size=64, seed=0, progress=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CPJUMP1_", "AIRFLOW"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", CPJUMP1_STORAGE_ROOT=str(storage_root), CPJUMP1_MODE="local")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=600)
    conf = {"plates": [good, missing], "stages": ["load_data"], "shards": 1}
    out = subprocess.run([sys.executable, "-c", RUN_SCRIPT, "cpjump1_2020_11_04_CPJUMP1", json.dumps(conf)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(line[len("RESULT"):])
    states = result["states"]
    # map index 0 = BR00117010 (catalog order), 1 = BR00117011
    assert states["plate.load_data[0]"] == "success"
    assert states["plate.validate_load_data[0]"] == "success"
    assert states["plate.load_data[1]"] == "failed"  # no images: exit 2, not retried
    assert states["plate.validate_load_data[1]"] == "upstream_failed"
    assert states["plate.illum[0]"] == "skipped" and states["plate.illum[1]"] == "upstream_failed"
    assert states["feature_select_batch[-1]"] == "skipped"  # not selected
    assert states["summary[-1]"] == "failed"
    assert "failed" in result["state"]
    text = out.stdout + out.stderr
    assert "1 plate(s) done, 1 failed" in text
    assert f"{missing}" in text and "FAILED    at load_data" in text
