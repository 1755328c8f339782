"""Trigger-form parameters of the batch and benchmark DAGs (typed, JSON-schema validated).

Airflow renders each :class:`~airflow.sdk.Param` as a form field ("Trigger Dag" in the web
UI) and validates the submitted ``conf`` against its schema before a run is created, both for
the form and for the REST API. The same validation runs again inside the ``plan`` task
(:func:`resolve`), so a run started any other way (CLI, backfill conf) is checked as well.
"""

from __future__ import annotations

from typing import Any

from cpjump1.airflow.stages import SELECTABLE_STAGES, STAGE_LABELS, default_stages
from cpjump1.errors import UnknownNameError

#: Bounds of the shard count (CellProfiler analysis pods per plate).
MIN_SHARDS, MAX_SHARDS, DEFAULT_SHARDS = 1, 256, 8
SECTION_WHAT = "What to run"
SECTION_HOW = "How to run it"


def batch_params(batch: str, plates: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The ``params`` of a batch DAG: plates subset, stages, force re-run, shard count."""
    from airflow.sdk import Param

    plates = list(plates)
    return {
        "plates": Param(
            [],
            type="array",
            title="Plates",
            description=(
                f"Plates of {batch} to process; leave empty for all {len(plates)} plates. "
                "A failed plate does not stop the others."
            ),
            items={"type": "string", "enum": plates},
            uniqueItems=True,
            examples=plates,
            section=SECTION_WHAT,
        ),
        "stages": Param(
            default_stages(batch),
            type="array",
            title="Stages",
            description=(
                "Stages to run; unselected stages are skipped (their outputs must already exist "
                "for the stages after them). Each stage's validation runs with it."
            ),
            items={"type": "string", "enum": list(SELECTABLE_STAGES)},
            uniqueItems=True,
            minItems=1,
            examples=list(SELECTABLE_STAGES),
            values_display=dict(STAGE_LABELS),
            section=SECTION_WHAT,
        ),
        "force": Param(
            False,
            type="boolean",
            title="Force re-run",
            description=(
                "Recompute outputs even when their completion markers match the inputs. "
                "Off: finished work is only fingerprint-checked and skipped."
            ),
            section=SECTION_HOW,
        ),
        "shards": Param(
            DEFAULT_SHARDS,
            type="integer",
            minimum=MIN_SHARDS,
            maximum=MAX_SHARDS,
            title="Shards per plate",
            description=(
                "CellProfiler analysis shards per plate (sites are split evenly; in Kubernetes "
                "mode one pod per shard, capped by the cpjump1-cellprofiler pool)."
            ),
            section=SECTION_HOW,
        ),
        "allow_missing_wells": Param(
            False,
            type="boolean",
            title="Allow missing wells",
            description=(
                "Accept plates imaged in fewer wells than their plate map (synthetic demo plates); "
                "off for real CPJUMP1 plates."
            ),
            section=SECTION_HOW,
        ),
        "deep_profiles_checkpoint": Param(
            None,
            type=["null", "string"],
            title="DeepProfiler checkpoint",
            description="Path or URL of the model checkpoint; empty: the configured default.",
            section=SECTION_HOW,
        ),
    }


def benchmark_params() -> dict[str, Any]:
    """The ``params`` of the benchmark DAG."""
    from airflow.sdk import Param

    return {
        "modality": Param(
            "cellprofiler",
            type="string",
            enum=["cellprofiler", "deepprofiler"],
            title="Modality",
            description="Which profiles to benchmark (CellProfiler or DeepProfiler features).",
        ),
        "name": Param(
            None,
            type=["null", "string"],
            pattern=r"^[A-Za-z0-9_.-]+$",
            title="Report name",
            description="Written to <storage root>/benchmark/<name>/; empty: the modality's name.",
        ),
    }


def resolve(batch: str, plates_all: tuple[str, ...] | list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Check a run's params and return the plates and stages it will process.

    Raises :class:`~cpjump1.errors.UnknownNameError` naming the bad plate or stage.
    """
    plates_all = list(plates_all)
    chosen = list(params.get("plates") or [])
    unknown = [p for p in chosen if p not in plates_all]
    if unknown:
        raise UnknownNameError(
            f"plates {unknown} are not in batch {batch}; valid plates: {', '.join(plates_all)}"
        )
    stages = list(params.get("stages") or default_stages(batch))
    bad = [s for s in stages if s not in SELECTABLE_STAGES]
    if bad:
        raise UnknownNameError(f"unknown stages {bad}; valid stages: {', '.join(SELECTABLE_STAGES)}")
    shards = int(params.get("shards") or DEFAULT_SHARDS)
    if not MIN_SHARDS <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between {MIN_SHARDS} and {MAX_SHARDS}, got {shards}")
    plates = [p for p in plates_all if p in chosen] if chosen else plates_all
    return {"plates": plates, "stages": stages, "force": bool(params.get("force")), "shards": shards}
