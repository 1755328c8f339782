"""Great Expectations checks between stages: one generic runner every stage uses.

Method
------
Great Expectations 1.x (greatexpectations.io, Apache-2.0): an *ephemeral* data context (no
``gx/`` folder on disk), a pandas data source with one whole-DataFrame batch, and an
expectation suite read from ``<settings.expectations_dir>/<suite>.json`` (the suite's JSON
form: ``{"name", "expectations": [{"type", "kwargs", "meta"}], "meta"}``). Values written as
``{"$PARAMETER": "name"}`` are filled from the run's context (e.g. a plate's expected image
count); an expectation whose parameter is unknown (``None``) is left out and listed under
``skipped`` in the report instead of passing silently.

Results are written under ``Layout.qc_dir(stage, batch, plate)`` as ``<suite>.json`` (GE's
validation result plus this run's summary and parameters) and ``<suite>.html`` (GE's Data
Docs validation-result page), both atomically. A failed suite raises
:class:`~cpjump1.errors.ValidationFailed` whose message names each failed expectation with
its column, what was observed and example rows (identified by ``Metadata_Plate/Well/Site``
where present).

Python API
----------
``run_suite(df, suite, *, batch, plate, stage, settings, extra_context=None,
row_id_columns=None, raise_on_failure=True) -> ValidationReport``

CLI and the stage-loader convention
-----------------------------------
``cpjump1 validate --stage load_data|single_cell|profiles|deep_profiles --batch B --plate P``
(the Airflow validation tasks call this) imports the stage's module from
:data:`STAGE_MODULES` and calls its function::

    load_for_validation(batch: str, plate: str, settings: Settings)
        -> (pandas.DataFrame, dict)                     # one table, suite named like the stage
         | ValidationInput                              # or with its own suite name / row ids
         | list[ValidationInput | (DataFrame, dict)]    # several tables (e.g. several files)

The dict holds the suite parameters (values for ``$PARAMETER`` references) and anything worth
recording in the report (e.g. the file that was read). The function raises a
:class:`~cpjump1.errors.Cpjump1Error` naming the missing file when the stage has not run.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import pandas as pd

from cpjump1 import storage
from cpjump1.errors import InputDataError, MetadataError, ValidationFailed
from cpjump1.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: stage name → module that provides ``load_for_validation``.
STAGE_MODULES: dict[str, str] = {
    "load_data": "cpjump1.load_data",
    "single_cell": "cpjump1.aggregate",
    "profiles": "cpjump1.profiles",
    "deep_profiles": "cpjump1.deepprofiler",
}
#: Columns that identify a row in failure examples, when present.
DEFAULT_ROW_ID_COLUMNS = ("Metadata_Plate", "Metadata_Well", "Metadata_Site")
EXAMPLES = 5


@dataclass
class ValidationInput:
    """One table to validate, as returned by a stage's ``load_for_validation``."""

    df: pd.DataFrame
    parameters: dict[str, Any] = field(default_factory=dict)
    suite: str | None = None
    row_id_columns: Sequence[str] | None = None


@dataclass
class FailedExpectation:
    type: str
    column: str | None
    kwargs: dict[str, Any]
    observed: Any = None
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list[Any] = field(default_factory=list)
    exception: str | None = None
    notes: str | None = None

    def line(self) -> str:
        args = ", ".join(
            f"{k}={_short(v)}" for k, v in self.kwargs.items() if k not in ("batch_id", "column", "result_format")
        )
        head = f"{self.type}({self.column or ''}{', ' if self.column and args else ''}{args})"
        if self.exception:
            return f"{head}: could not be evaluated: {self.exception}"
        parts = []
        if self.unexpected_count is not None:
            parts.append(f"{self.unexpected_count} of {self.element_count} rows unexpected")
        elif self.observed is not None:
            parts.append(f"observed {self.observed!r}")
        if self.examples:
            parts.append("e.g. " + "; ".join(_fmt_example(e) for e in self.examples))
        if not parts:
            parts.append("failed")
        if self.notes:
            parts.append(f"[{self.notes}]")
        return f"{head}: " + ", ".join(parts) if parts else head


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:60] + f"… ({len(v)} items)" if isinstance(v, (list, tuple)) else text[:77] + "…"


def _fmt_example(e: Any) -> str:
    if isinstance(e, dict):
        return "{" + ", ".join(f"{k}={v}" for k, v in e.items()) + "}"
    return repr(e)


@dataclass
class ValidationReport:
    suite: str
    stage: str
    batch: str
    plate: str
    success: bool
    evaluated: int
    successful: int
    failures: list[FailedExpectation]
    skipped: list[str]
    parameters: dict[str, Any]
    json_path: str | None = None
    html_path: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        where = f"plate {self.plate} of batch {self.batch}"
        if self.success:
            text = f"suite {self.suite}: {self.successful}/{self.evaluated} expectations passed for {where}"
        else:
            text = (
                f"suite {self.suite} failed for {where}: {len(self.failures)} of {self.evaluated} "
                "expectations failed:\n" + "\n".join(f"  - {f.line()}" for f in self.failures)
            )
        if self.skipped:
            text += "\n  (skipped, parameter unknown: " + "; ".join(self.skipped) + ")"
        if self.json_path:
            text += f"\n  results: {self.json_path} , {self.html_path}"
        return text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = self.summary()
        return d


# --------------------------------------------------------------------------- suites


def suite_path(suite: str, settings: Settings) -> Path:
    """``suite`` as a path to a JSON file, or the name of one in ``settings.expectations_dir``."""
    p = Path(suite)
    if p.suffix == ".json" and p.exists():
        return p
    return Path(settings.expectations_dir) / f"{suite}.json"


def load_suite(suite: str, settings: Settings) -> dict[str, Any]:
    """The suite's JSON as a dict (``name``, ``expectations``, ``meta``)."""
    path = suite_path(suite, settings)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MetadataError(f"expectation suite {suite}: no file {path}") from exc
    except json.JSONDecodeError as exc:
        raise MetadataError(f"expectation suite {path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise MetadataError(f"expectation suite {path}: needs an 'expectations' list")
    for i, e in enumerate(data["expectations"]):
        if not isinstance(e, dict) or "type" not in e:
            raise MetadataError(f"expectation suite {path}: expectation {i} has no 'type'")
    data.setdefault("name", path.stem)
    return data


def _parameter_names(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        if set(obj) == {"$PARAMETER"}:
            return {obj["$PARAMETER"]}
        return set().union(*(_parameter_names(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_parameter_names(v) for v in obj)) if obj else set()
    return set()


def _jsonable(value: Any) -> Any:
    """Parameters and examples as plain JSON values (numpy scalars → Python)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        with contextlib.suppress(Exception):
            return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------- runner


def _quiet_ge() -> None:
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_suite(
    df: pd.DataFrame,
    suite: str,
    *,
    batch: str,
    plate: str,
    stage: str,
    settings: Settings,
    extra_context: dict[str, Any] | None = None,
    row_id_columns: Sequence[str] | None = None,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Validate ``df`` with the suite ``suite`` (a name in ``settings.expectations_dir`` or a
    path to a JSON file); write ``<suite>.json`` and ``<suite>.html`` under
    ``Layout.qc_dir(stage, batch, plate)``; raise :class:`ValidationFailed` on failure
    (unless ``raise_on_failure`` is false). ``extra_context`` supplies ``$PARAMETER`` values
    and is recorded in the report."""
    t0 = time.perf_counter()
    _quiet_ge()
    import great_expectations as gx

    spec = load_suite(suite, settings)
    params = {k: _jsonable(v) for k, v in (extra_context or {}).items()}
    kept, skipped = [], []
    for e in spec["expectations"]:
        missing = sorted(n for n in _parameter_names(e.get("kwargs", {})) if params.get(n) is None)
        if missing:
            skipped.append(f"{e['type']}({e.get('kwargs', {}).get('column', '')}) needs {', '.join(missing)}")
            log.warning("suite %s: %s", spec["name"], skipped[-1])
            continue
        kept.append({k: copy.deepcopy(v) for k, v in e.items() if k in ("type", "kwargs", "meta", "notes")})
    data = df.reset_index(drop=True)
    suffix = uuid.uuid4().hex[:8]
    context = gx.get_context(mode="ephemeral")
    batch_def = (
        context.data_sources.add_pandas(f"{stage}-{suffix}")
        .add_dataframe_asset(f"{plate}")
        .add_batch_definition_whole_dataframe("whole")
    )
    gx_suite = context.suites.add(
        gx.ExpectationSuite(name=spec["name"], expectations=kept, meta=spec.get("meta") or {})
    )
    vdef = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{spec['name']}-{batch}-{plate}-{suffix}", data=batch_def, suite=gx_suite)
    )
    # GE prints a tqdm progress bar per run; keep task logs readable.
    from great_expectations.core.run_identifier import RunIdentifier

    with contextlib.redirect_stderr(io.StringIO()):
        result = vdef.run(
            run_id=RunIdentifier(run_name=f"{stage} {batch}/{plate}"),
            batch_parameters={"dataframe": data},
            expectation_parameters=params,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20},
        )
    ids = [c for c in (row_id_columns or DEFAULT_ROW_ID_COLUMNS) if c in data.columns]
    failures = [_failure(r, data, ids) for r in result.results if not r.success]
    stats = result.statistics or {}
    report = ValidationReport(
        suite=spec["name"], stage=stage, batch=batch, plate=plate, success=bool(result.success),
        evaluated=int(stats.get("evaluated_expectations", len(kept))),
        successful=int(stats.get("successful_expectations", len(kept) - len(failures))),
        failures=failures, skipped=skipped, parameters=params,
    )
    qc_dir = storage.Layout(settings.storage_root).qc_dir(stage, batch, plate)
    report.json_path = storage.join(qc_dir, f"{spec['name']}.json")
    report.html_path = storage.join(qc_dir, f"{spec['name']}.html")
    report.seconds = time.perf_counter() - t0
    body = {"cpjump1": _jsonable(report.to_dict()), "great_expectations": result.to_json_dict()}
    with storage.atomic_write(report.json_path, settings, mode="w") as fh:
        json.dump(body, fh, indent=1, default=str)
    with storage.atomic_write(report.html_path, settings, mode="w") as fh:
        fh.write(_data_docs_html(result))
    log.info("%s", report.summary().splitlines()[0])
    if not report.success and raise_on_failure:
        raise ValidationFailed(report.summary())
    return report


def _data_docs_html(result) -> str:
    """GE's Data Docs page for one validation result (the page a Data Docs site shows)."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))


def _failure(r, data: pd.DataFrame, ids: list[str]) -> FailedExpectation:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k != "batch_id"}
    res = dict(r.result or {})
    exc = None
    info = r.exception_info or {}
    if isinstance(info, dict) and info.get("raised_exception"):
        exc = str(info.get("exception_message") or "exception")
    column = kwargs.get("column")
    examples: list[Any] = []
    index_list = res.get("partial_unexpected_index_list") or []
    if index_list and ids is not None:
        cols = list(dict.fromkeys([*ids, *([column] if column in data.columns else [])]))
        seen = set()
        for i in index_list:
            if not isinstance(i, (int,)) and not hasattr(i, "__index__"):
                continue
            row = {c: _jsonable(data.at[int(i), c]) for c in cols}
            key = json.dumps(row, sort_keys=True, default=str)
            if key not in seen:
                seen.add(key)
                examples.append(row)
            if len(examples) >= EXAMPLES:
                break
    if not examples:
        examples = [_jsonable(v) for v in (res.get("partial_unexpected_list") or [])[:EXAMPLES]]
    observed = res.get("observed_value")
    mismatched = (res.get("details") or {}).get("mismatched") if isinstance(res.get("details"), dict) else None
    if isinstance(mismatched, dict) and mismatched.get("missing"):
        observed = {"missing columns": mismatched["missing"]}
    notes = (cfg.meta or {}).get("notes") if cfg.meta else None
    return FailedExpectation(
        type=cfg.type, column=column, kwargs=_jsonable(kwargs), observed=_jsonable(observed),
        unexpected_count=res.get("unexpected_count"), element_count=res.get("element_count"),
        examples=examples, exception=exc, notes=notes,
    )


# --------------------------------------------------------------------------- stage hook + CLI


def validation_inputs(stage: str, batch: str, plate: str, settings: Settings) -> list[ValidationInput]:
    """Call ``<stage module>.load_for_validation`` and normalise what it returns."""
    if stage not in STAGE_MODULES:
        raise InputDataError(f"unknown stage {stage!r}; one of {', '.join(STAGE_MODULES)}")
    name = STAGE_MODULES[stage]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise InputDataError(f"stage {stage}: module {name} is not available ({exc})") from exc
    loader = getattr(module, "load_for_validation", None)
    if loader is None:
        raise InputDataError(f"stage {stage}: {name} has no load_for_validation(batch, plate, settings)")
    got = loader(batch, plate, settings)
    items = got if isinstance(got, list) else [got]
    out = []
    for item in items:
        if isinstance(item, ValidationInput):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            out.append(ValidationInput(df=item[0], parameters=dict(item[1] or {})))
        else:
            raise TypeError(f"{name}.load_for_validation returned {type(item).__name__}")
    return out


def run_validation(stage: str, batch: str, plate: str, settings: Settings | None = None) -> list[ValidationReport]:
    """Validate a stage's outputs for one plate; raise :class:`ValidationFailed` naming every
    failed suite (all suites run first, so every report is written)."""
    settings = settings or get_settings()
    reports = []
    for item in validation_inputs(stage, batch, plate, settings):
        reports.append(
            run_suite(
                item.df, item.suite or stage, batch=batch, plate=plate, stage=stage, settings=settings,
                extra_context=item.parameters, row_id_columns=item.row_id_columns, raise_on_failure=False,
            )
        )
    failed = [r for r in reports if not r.success]
    if failed:
        raise ValidationFailed("\n".join(r.summary() for r in failed))
    return reports


@click.command("validate")
@click.option("--stage", required=True, type=click.Choice(sorted(STAGE_MODULES)), help="Which stage's outputs.")
@click.option("--batch", required=True, help="Batch name.")
@click.option("--plate", required=True, help="Plate barcode.")
@click.option("--storage-root", default=None, help="Output root (default: settings).")
@click.option("--images-root", default=None, help="Images root (default: settings).")
def command(stage: str, batch: str, plate: str, storage_root: str | None, images_root: str | None) -> None:
    """Run a stage's Great Expectations suite(s) on one plate's outputs; fail on any failure."""
    settings = get_settings(storage_root=storage_root, images_root=images_root)
    for report in run_validation(stage, batch, plate, settings):
        click.echo(report.summary())
