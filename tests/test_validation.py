"""The generic Great Expectations runner (cpjump1.validation): suites from JSON, $PARAMETER
values, reports as JSON + Data Docs HTML under qc/, readable failures, the stage-loader
convention and the `cpjump1 validate` command."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harmony_plates import image_name, write_plate  # noqa: E402

from cpjump1 import storage, validation  # noqa: E402
from cpjump1.cli import main  # noqa: E402
from cpjump1.errors import InputDataError, MetadataError, ValidationFailed  # noqa: E402
from cpjump1.settings import get_settings  # noqa: E402

SUITE = {
    "name": "toy",
    "expectations": [
        {"type": "expect_table_columns_to_match_set",
         "kwargs": {"column_set": ["Metadata_Well", "Metadata_Site", "value"], "exact_match": False}},
        {"type": "expect_column_values_to_match_regex",
         "kwargs": {"column": "Metadata_Well", "regex": "^[A-P](?:0[1-9]|1[0-9]|2[0-4])$"},
         "meta": {"notes": "384-well IDs"}},
        {"type": "expect_column_values_to_be_between",
         "kwargs": {"column": "value", "min_value": 0, "max_value": {"$PARAMETER": "max_value"}}},
        {"type": "expect_table_row_count_to_equal", "kwargs": {"value": {"$PARAMETER": "rows"}}},
    ],
}


@pytest.fixture
def suite_settings(settings, tmp_path):
    exp = tmp_path / "expectations"
    exp.mkdir()
    (exp / "toy.json").write_text(json.dumps(SUITE))
    return get_settings(storage_root=settings.storage_root, expectations_dir=str(exp))


def frame(wells=("A01", "B02", "P24")) -> pd.DataFrame:
    return pd.DataFrame({"Metadata_Plate": "P1", "Metadata_Well": list(wells),
                         "Metadata_Site": [str(i + 1) for i in range(len(wells))], "value": [1, 2, 3][: len(wells)]})


def qc_files(s, stage="toy_stage") -> Path:
    return Path(storage.Layout(s.storage_root).qc_dir(stage, "B1", "P1"))


def test_run_suite_passes_and_writes_json_and_data_docs(suite_settings):
    s = suite_settings
    rep = validation.run_suite(frame(), "toy", batch="B1", plate="P1", stage="toy_stage", settings=s,
                               extra_context={"max_value": 3, "rows": 3, "note": "anything"})
    assert rep.success and rep.evaluated == 4 and rep.successful == 4 and not rep.failures
    qc = qc_files(s)
    body = json.loads((qc / "toy.json").read_text())
    assert body["cpjump1"]["success"] is True and body["cpjump1"]["parameters"]["note"] == "anything"
    assert len(body["great_expectations"]["results"]) == 4
    html = (qc / "toy.html").read_text()
    assert "must match this regular expression" in html and "Expectation Suite:" in html
    assert "toy_stage B1/P1" in html  # the run name
    assert rep.json_path == str(qc / "toy.json") and rep.html_path == str(qc / "toy.html")
    assert "4/4 expectations passed" in rep.summary()


def test_run_suite_failure_names_expectations_and_example_rows(suite_settings):
    s = suite_settings
    df = frame(("A01", "Q01", "A25"))
    df.loc[2, "value"] = 99
    with pytest.raises(ValidationFailed) as err:
        validation.run_suite(df, "toy", batch="B1", plate="P1", stage="toy_stage", settings=s,
                             extra_context={"max_value": 3, "rows": 5})
    msg = str(err.value)
    assert "suite toy failed for plate P1 of batch B1: 3 of 4 expectations failed" in msg
    assert "expect_column_values_to_match_regex(Metadata_Well" in msg and "2 of 3 rows unexpected" in msg
    assert "{Metadata_Plate=P1, Metadata_Well=Q01, Metadata_Site=2}" in msg
    assert "{Metadata_Plate=P1, Metadata_Well=A25, Metadata_Site=3}" in msg
    assert "[384-well IDs]" in msg
    assert "expect_column_values_to_be_between(value" in msg and "value=99" in msg
    assert "expect_table_row_count_to_equal(value=5): observed 3" in msg
    assert str(qc_files(s) / "toy.json") in msg
    body = json.loads((qc_files(s) / "toy.json").read_text())  # results kept even on failure
    assert body["cpjump1"]["success"] is False and len(body["cpjump1"]["failures"]) == 3


def test_missing_columns_and_unknown_parameters(suite_settings):
    s = suite_settings
    df = frame().drop(columns=["value"])
    rep = validation.run_suite(df, "toy", batch="B1", plate="P1", stage="toy_stage", settings=s,
                               extra_context={"max_value": None, "rows": 3}, raise_on_failure=False)
    assert not rep.success
    text = rep.summary()
    assert "missing columns" in text and "'value'" in text
    # the expectation whose parameter is unknown is skipped and said so, not passed silently
    assert rep.evaluated == 3 and rep.skipped == ["expect_column_values_to_be_between(value) needs max_value"]
    assert "skipped, parameter unknown" in text


def test_suite_file_errors(suite_settings, tmp_path):
    s = suite_settings
    with pytest.raises(MetadataError, match="no file .*nope.json"):
        validation.run_suite(frame(), "nope", batch="B1", plate="P1", stage="x", settings=s)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MetadataError, match="not valid JSON"):
        validation.run_suite(frame(), str(bad), batch="B1", plate="P1", stage="x", settings=s)
    bad.write_text(json.dumps({"name": "b", "expectations": [{"kwargs": {}}]}))
    with pytest.raises(MetadataError, match="expectation 0 has no 'type'"):
        validation.run_suite(frame(), str(bad), batch="B1", plate="P1", stage="x", settings=s)


def test_shipped_suites_are_valid(settings):
    """Every suite in expectations/ loads and names only known expectation types."""
    import great_expectations as gx

    exp_dir = Path(settings.expectations_dir)
    for path in sorted(exp_dir.glob("*.json")):
        spec = validation.load_suite(str(path), settings)
        gx.ExpectationSuite(name=spec["name"], expectations=spec["expectations"])


def test_loader_convention(suite_settings, monkeypatch):
    """`validate --stage` finds <stage module>.load_for_validation and accepts (df, dict),
    ValidationInput and lists of them."""
    s = suite_settings
    mod = types.ModuleType("fake_stage")
    mod.load_for_validation = lambda batch, plate, settings: [
        (frame(), {"max_value": 3, "rows": 3}),
        validation.ValidationInput(frame(("A01", "Z99")), {"max_value": 3, "rows": 2}, suite="toy",
                                   row_id_columns=["Metadata_Well"]),
    ]
    monkeypatch.setitem(sys.modules, "fake_stage", mod)
    monkeypatch.setitem(validation.STAGE_MODULES, "toy", "fake_stage")
    with pytest.raises(ValidationFailed) as err:
        validation.run_validation("toy", "B1", "P1", s)
    assert "{Metadata_Well=Z99}" in str(err.value)
    assert (qc_files(s, "toy") / "toy.json").exists()
    empty = types.ModuleType("no_hook")
    monkeypatch.setitem(sys.modules, "no_hook", empty)
    monkeypatch.setitem(validation.STAGE_MODULES, "toy", "no_hook")
    with pytest.raises(InputDataError, match="no_hook has no load_for_validation"):
        validation.run_validation("toy", "B1", "P1", s)


def test_validate_cli_on_load_data(settings, tmp_path, monkeypatch, capsys):
    from cpjump1.load_data import run_load_data

    monkeypatch.setenv("CPJUMP1_IMAGES_ROOT", str(tmp_path / "images"))
    s = get_settings(storage_root=settings.storage_root)
    images = write_plate(tmp_path / "images" / "B1" / "images" / "P1", "P1", wells=("A01", "H12"), sites=2)
    rc = main(["validate", "--stage", "load_data", "--batch", "B1", "--plate", "P1", "--storage-root", s.storage_root])
    assert rc == 2 and "run `cpjump1 load-data` first" in capsys.readouterr().err
    run_load_data("B1", "P1", s)
    rc = main(["validate", "--stage", "load_data", "--batch", "B1", "--plate", "P1", "--storage-root", s.storage_root])
    assert rc == 0 and "expectations passed for plate P1 of batch B1" in capsys.readouterr().out
    (images / image_name(8, 12, 2, 2)).write_bytes(b"garbage!")  # an image broken after load_data ran
    rc = main(["validate", "--stage", "load_data", "--batch", "B1", "--plate", "P1", "--storage-root", s.storage_root])
    err = capsys.readouterr().err
    assert rc == 2 and "r08c12f02p01-ch2sk1fk1fl1.tiff: not a TIFF" in err and "Metadata_Well=H12" in err
