"""End-of-run summary of a batch DAG: which plates finished, which failed and where.

Pure functions over the task states Airflow reports for the run (``{task_id[_mapindex]:
state}``, as returned by ``RuntimeTaskInstance.get_task_states``), so they are unit-tested
without a scheduler.
"""

from __future__ import annotations

from typing import Any

FAILED = {"failed", "upstream_failed"}
OK = {"success", "skipped"}


def _split(key: str, group: str) -> tuple[str, int] | None:
    """``plate.load_data_3`` -> (``load_data``, 3); None for keys outside the group."""
    if not key.startswith(group + "."):
        return None
    name, _, index = key[len(group) + 1 :].rpartition("_")
    if not name or not index.isdigit():
        return None
    return name, int(index)


def plate_states(plates: list[str], states: dict[str, Any], group: str) -> dict[str, dict[str, str | None]]:
    """Per plate (map index i = plates[i]): task -> state."""
    out: dict[str, dict[str, str | None]] = {p: {} for p in plates}
    for key, state in states.items():
        parsed = _split(key, group)
        if parsed is None:
            continue
        name, index = parsed
        if 0 <= index < len(plates):
            out[plates[index]][name] = state
    return out


def summarize(
    batch: str,
    plates: list[str],
    states: dict[str, Any],
    batch_states: dict[str, Any] | None = None,
    *,
    group: str = "plate",
    order: list[str] | None = None,
) -> dict[str, Any]:
    """Plates done (every task success/skipped), failed (first failed task), unfinished."""
    per_plate = plate_states(plates, states, group)
    order = order or []
    done, failed, unfinished = [], [], []
    for plate in plates:
        tasks = per_plate[plate]
        ranked = sorted(tasks, key=lambda t: order.index(t) if t in order else len(order))
        bad = [t for t in ranked if tasks[t] == "failed"] or [t for t in ranked if tasks[t] in FAILED]
        if bad:
            failed.append({"plate": plate, "task": bad[0], "state": tasks[bad[0]]})
        elif tasks and all(s in OK for s in tasks.values()):
            ran = [t for t in ranked if tasks[t] == "success"]
            done.append({"plate": plate, "tasks_run": len(ran)})
        else:
            unfinished.append({"plate": plate, "states": dict(tasks)})
    batch_states = batch_states or {}
    batch_failed = sorted(k for k, v in batch_states.items() if v in FAILED)
    return {
        "batch": batch,
        "plates": list(plates),
        "done": done,
        "failed": failed,
        "unfinished": unfinished,
        "batch_tasks": dict(batch_states),
        "batch_failed": batch_failed,
    }


def format_summary(result: dict[str, Any]) -> str:
    """A readable table for the task log."""
    lines = [
        f"Summary of batch {result['batch']}: {len(result['done'])} plate(s) done, "
        f"{len(result['failed'])} failed, {len(result['unfinished'])} unfinished "
        f"(of {len(result['plates'])})",
        f"{'plate':<14} {'result':<9} detail",
    ]
    for d in result["done"]:
        lines.append(f"{d['plate']:<14} {'done':<9} {d['tasks_run']} task(s) ran")
    for f in result["failed"]:
        lines.append(f"{f['plate']:<14} {'FAILED':<9} at {f['task']} ({f['state']})")
    for u in result["unfinished"]:
        lines.append(f"{u['plate']:<14} {'unfinished':<9} {u['states']}")
    for task_id, state in sorted(result["batch_tasks"].items()):
        lines.append(f"{'(batch)':<14} {state or 'none':<9} {task_id}")
    return "\n".join(lines)


def done_plates(plates: list[str], states: dict[str, Any], group: str = "plate") -> list[str]:
    """Plates whose tasks all finished without failure."""
    return [d["plate"] for d in summarize("", plates, states, group=group)["done"]]
