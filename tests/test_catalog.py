import json
import shutil

import pytest

from cpjump1.catalog import WELLS_384, Catalog, load_catalog
from cpjump1.cli import main
from cpjump1.errors import MetadataError, UnknownNameError
from cpjump1.settings import repo_root

ORF_TIMEPOINT_BATCHES = [
    "2020_11_18_CPJUMP1_TimepointDay1",
    "2020_11_19_TimepointDay4",
    "2020_12_02_CPJUMP1_2WeeksTimePoint",
    "2020_12_07_CPJUMP1_4WeeksTimePoint",
]


@pytest.fixture(scope="module")
def cat():
    return load_catalog(repo_root() / "metadata")


def test_batches_and_plate_counts(cat):
    assert len(cat.batches) == 7
    assert len(cat.plates("2020_11_04_CPJUMP1")) == 51
    for b in ORF_TIMEPOINT_BATCHES:
        assert len(cat.plates(b)) == 8
        assert {p.perturbation for p in cat.plates(b)} == {"orf"}
    assert len(cat.plates("2020_12_08_CPJUMP1_Bleaching")) == 24
    assert len(cat.plates("2020_11_04_CPJUMP1_DL")) == 10


def test_plate_identity_is_batch_plus_barcode(cat):
    # The same 8 ORF plates appear in all four time-point batches.
    barcodes = [set(cat.batch(b).plates) for b in ORF_TIMEPOINT_BATCHES]
    assert barcodes[0] == barcodes[1] == barcodes[2] == barcodes[3]
    bc = sorted(barcodes[0])[0]
    plates = [cat.plate(b, bc) for b in ORF_TIMEPOINT_BATCHES]
    assert len({p.key for p in plates}) == 4
    assert len({p.time_delay for p in plates}) == 4  # Day1, Day4, 2 weeks, 4 weeks differ
    # The DeepProfiler subset repeats plates of the first batch.
    dl = set(cat.batch("2020_11_04_CPJUMP1_DL").plates)
    assert dl <= set(cat.batch("2020_11_04_CPJUMP1").plates)


def test_plate_records(cat):
    p = cat.plate("2020_11_04_CPJUMP1", "BR00117010")
    assert (p.perturbation, p.cell_type, p.time) == ("compound", "U2OS", 48)
    assert p.plate_map == "JUMP-Target-1_compound_platemap"
    assert p.expected_images == 27648
    assert "U2OS" in p.description
    # Several real plates hold fewer than 27648 images.
    assert any(q.expected_images < 27648 for q in cat.all_plates())


def test_every_plate_map_has_384_wells_and_known_perturbations(cat):
    for p in cat.all_plates():
        wells = cat.wells(p.batch, p.barcode)
        assert [w.well for w in wells] == list(WELLS_384), p.key
        assert cat.missing_perturbations(p.batch, p.barcode) == [], p.key


def test_well_records(cat):
    wells = {w.well: w for w in cat.wells("2020_11_04_CPJUMP1", "BR00117010")}
    assert wells["A02"].is_negcon and wells["A02"].broad_sample == ""
    assert wells["A01"].broad_sample == "BRD-A86665761-001-01-1"
    assert wells["A01"].pert_iname == "gabapentin-enacarbil"
    assert sum(w.is_negcon for w in wells.values()) == 64
    crispr = cat.plates("2020_11_04_CPJUMP1")
    crispr_plate = next(p for p in crispr if p.perturbation == "crispr")
    assert any(w.gene for w in cat.wells(crispr_plate.batch, crispr_plate.barcode))


def test_unknown_names_list_valid_ones(cat):
    with pytest.raises(UnknownNameError, match="2020_11_04_CPJUMP1") as e:
        cat.batch("2020_99_99")
    assert "valid batches" in str(e.value)
    with pytest.raises(UnknownNameError, match="BR00117010"):
        cat.plate("2020_11_04_CPJUMP1", "BR0000")


def _copy_metadata(tmp_path):
    dst = tmp_path / "metadata"
    shutil.copytree(repo_root() / "metadata", dst)
    return dst


def test_malformed_file_names_file_and_line(tmp_path):
    md = _copy_metadata(tmp_path)
    bpm = md / "platemaps" / "2020_11_04_CPJUMP1" / "barcode_platemap.csv"
    lines = bpm.read_text().splitlines()
    lines[3] = lines[3] + ",extra"
    bpm.write_text("\n".join(lines))
    with pytest.raises(MetadataError) as e:
        Catalog(md)
    assert str(bpm) in str(e.value) and "line 4" in str(e.value)


def test_missing_column_and_missing_perturbation_reported_by_name(tmp_path):
    md = _copy_metadata(tmp_path)
    exp = md / "experiment-metadata.tsv"
    exp.write_text(exp.read_text().replace("Number_of_images", "Images", 1))
    with pytest.raises(MetadataError, match="Number_of_images"):
        Catalog(md)
    md2 = _copy_metadata(tmp_path / "b")
    meta = md2 / "external_metadata" / "JUMP-Target-1_compound_metadata.tsv"
    meta.write_text("\n".join(l for l in meta.read_text().splitlines() if "BRD-A86665761" not in l) + "\n")
    cat = Catalog(md2)
    assert cat.missing_perturbations("2020_11_04_CPJUMP1", "BR00117010") == ["BRD-A86665761-001-01-1"]
    with pytest.raises(MetadataError, match="BRD-A86665761-001-01-1"):
        cat.wells("2020_11_04_CPJUMP1", "BR00117010")


def test_cli_table_and_json(capsys):
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    assert "2020_12_08_CPJUMP1_Bleaching" in out and "BR00117010" in out
    assert main(["catalog", "--json", "--batch", "2020_11_18_CPJUMP1_TimepointDay1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["plates"]) == 8 and data["batches"][0]["name"] == "2020_11_18_CPJUMP1_TimepointDay1"
    assert main(["catalog", "--batch", "nope"]) == 2
    assert "valid batches" in capsys.readouterr().err
