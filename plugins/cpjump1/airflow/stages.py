"""The pipeline's tasks and the ``cpjump1`` arguments each one runs: the ONE place that maps a
task to its command line.

Both execution modes use :func:`stage_argv`: in ``local`` mode the arguments go to
``python -m cpjump1`` in a subprocess, in ``kubernetes`` mode they become the container args
of a pod whose entry point is ``cpjump1``. Nothing here imports Airflow, pandas or a stage
module, so DAG files that import it stay fast to parse.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Stages a user can switch on or off in the trigger form (``params.stages``), in run order.
SELECTABLE_STAGES: tuple[str, ...] = (
    "load_data",
    "illum",
    "analysis",
    "aggregate",
    "profiles",
    "deep_profiles",
    "feature_select_batch",
)

#: Human labels of :data:`SELECTABLE_STAGES` for the trigger form.
STAGE_LABELS: dict[str, str] = {
    "load_data": "load_data: list images, write load_data CSVs (+ validate)",
    "illum": "illum: CellProfiler illumination correction",
    "analysis": "analysis: CellProfiler segmentation + features, sharded (+ validate single cells)",
    "aggregate": "aggregate: single-cell file and well-level medians",
    "profiles": "profiles: pycytominer annotate/normalize/feature-select per plate (+ validate)",
    "deep_profiles": "deep_profiles: DeepProfiler embeddings (GPU) (+ validate)",
    "feature_select_batch": "feature_select_batch: batch-level feature selection",
}

#: The batch whose plates get DeepProfiler features by default (the CPJUMP1 DL subset).
DEEPPROFILER_BATCH = "2020_11_04_CPJUMP1_DL"


@dataclass(frozen=True)
class Task:
    """One task of a batch DAG.

    ``deploy_stage`` is the key of :mod:`cpjump1.deploy` / ``Settings.resources`` that decides the
    image, resources, pool and GPU; ``selector`` is the entry of ``params.stages`` that switches
    the task on; ``level`` is ``plate`` (inside the per-plate mapped group) or ``batch``.
    """

    task_id: str
    deploy_stage: str
    selector: str
    level: str = "plate"
    force: bool = True  # the CLI accepts --force (validation has nothing to force)
    sharded: bool = False
    validation: bool = False


#: Per-plate tasks in dependency order (a linear chain inside the plate group).
PLATE_TASKS: tuple[Task, ...] = (
    Task("load_data", "load_data", "load_data"),
    Task("validate_load_data", "validate", "load_data", force=False, validation=True),
    Task("illum", "illum", "illum"),
    Task("analysis", "analysis", "analysis", sharded=True),
    Task("validate_single_cell", "validate", "analysis", force=False, validation=True),
    Task("aggregate", "aggregate", "aggregate"),
    Task("profiles", "profiles", "profiles"),
    Task("validate_profiles", "validate", "profiles", force=False, validation=True),
    Task("deep_profiles", "deep_profiles", "deep_profiles"),
    Task("validate_deep_profiles", "validate", "deep_profiles", force=False, validation=True),
)

#: Batch-level tasks after every plate.
FEATURE_SELECT_BATCH = Task("feature_select_batch", "profiles", "feature_select_batch", level="batch")
BENCHMARK = Task("benchmark", "benchmark", "benchmark", level="benchmark", force=False)

TASKS: dict[str, Task] = {t.task_id: t for t in (*PLATE_TASKS, FEATURE_SELECT_BATCH, BENCHMARK)}

#: ``cpjump1 validate --stage`` value of each validation task.
_VALIDATE_STAGE = {
    "validate_load_data": "load_data",
    "validate_single_cell": "single_cell",
    "validate_profiles": "profiles",
    "validate_deep_profiles": "deep_profiles",
}


def default_stages(batch: str) -> list[str]:
    """Stages a run does unless the trigger form says otherwise.

    DeepProfiler runs by default only for the DeepProfiler batch (it needs a GPU and a model
    checkpoint); other batches can ask for it in the form.
    """
    return [s for s in SELECTABLE_STAGES if s != "deep_profiles" or batch == DEEPPROFILER_BATCH]


def stage_argv(
    task_id: str,
    batch: str | None = None,
    plate: str | None = None,
    *,
    shards: int | None = None,
    shard: int | str | None = None,
    force: bool = False,
    checkpoint: str | None = None,
    profiles_root: str | None = None,
    benchmark_out: str | None = None,
    modality: str | None = None,
    plates: list[str] | None = None,
    allow_missing_wells: bool = False,
) -> list[str]:
    """Arguments of ``cpjump1`` for one task (without the program name).

    ``shard`` may be a string such as ``"$(JOB_COMPLETION_INDEX)"``, which Kubernetes expands
    from the container environment in an indexed Job. ``plates`` limits the batch-level
    feature selection to the plates that finished; ``allow_missing_wells`` lets the profiles
    stage accept plates with fewer wells than their plate map (synthetic demo plates).
    """
    task = TASKS[task_id]
    if task_id == "load_data":
        argv = ["load-data", "--batch", batch, "--plate", plate, "--shards", str(int(shards or 1))]
    elif task.validation:
        argv = ["validate", "--stage", _VALIDATE_STAGE[task_id], "--batch", batch, "--plate", plate]
    elif task_id == "illum":
        argv = ["illum", "--batch", batch, "--plate", plate]
    elif task_id == "analysis":
        if shard is None:
            raise ValueError("analysis needs a shard index")
        argv = ["analysis", "--batch", batch, "--plate", plate, "--shard", str(shard)]
    elif task_id == "aggregate":
        argv = ["aggregate", "--batch", batch, "--plate", plate]
    elif task_id == "profiles":
        argv = ["profiles", "--batch", batch, "--plates", plate, "--step", "plate"]
        if allow_missing_wells:
            argv.append("--allow-missing-wells")
    elif task_id == "deep_profiles":
        argv = ["deep-profiles", "--batch", batch, "--plate", plate]
        if checkpoint:
            argv += ["--checkpoint", checkpoint]
    elif task_id == "feature_select_batch":
        argv = ["profiles", "--batch", batch, "--step", "batch"]
        if plates:
            argv += ["--plates", ",".join(plates)]
        if allow_missing_wells:
            argv.append("--allow-missing-wells")
    elif task_id == "benchmark":
        argv = ["benchmark", "--profiles", profiles_root]
        if benchmark_out:
            argv += ["--out", benchmark_out]
        if modality:
            argv += ["--modality", modality]
    else:  # pragma: no cover - TASKS and this function are kept in step by the tests
        raise KeyError(task_id)
    if any(a is None for a in argv):
        raise ValueError(f"{task_id}: missing argument in {argv}")
    if force and task.force:
        argv.append("--force")
    return [str(a) for a in argv]
