"""The CPJUMP1 catalog: batches, plates and wells as typed records.

Facts come from ``metadata/`` (copied from the CPJUMP1 repository, CC0; see
``metadata/README.md``): one ``barcode_platemap.csv`` per batch, the three JUMP-Target-1 plate
maps, the compound / CRISPR / ORF perturbation tables, compound target annotations, and
``experiment-metadata.tsv`` (cell type, time point, image count per plate).

A barcode can belong to several batches (the four ORF time-point batches image the same 8
plates; the DeepProfiler subset ``2020_11_04_CPJUMP1_DL`` repeats 10 plates of the first
batch), so a plate is always identified by *batch + barcode*.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import pandas as pd

from cpjump1.errors import MetadataError, UnknownNameError

ROWS = "ABCDEFGHIJKLMNOP"
N_COLS = 24
WELLS_384 = tuple(f"{r}{c:02d}" for r in ROWS for c in range(1, N_COLS + 1))

#: Short human descriptions of the batches (from the CPJUMP1 paper and README).
BATCH_DESCRIPTIONS = {
    "2020_11_04_CPJUMP1": "Main batch: compound, CRISPR and ORF plates in U2OS and A549, several time points",
    "2020_11_04_CPJUMP1_DL": "DeepProfiler subset: 10 plates of 2020_11_04_CPJUMP1",
    "2020_11_18_CPJUMP1_TimepointDay1": "ORF plates imaged 1 day after the standard time point",
    "2020_11_19_TimepointDay4": "ORF plates imaged 4 days after the standard time point",
    "2020_12_02_CPJUMP1_2WeeksTimePoint": "ORF plates imaged 2 weeks after the standard time point",
    "2020_12_07_CPJUMP1_4WeeksTimePoint": "ORF plates imaged 4 weeks after the standard time point",
    "2020_12_08_CPJUMP1_Bleaching": "Compound plates re-imaged up to six times to measure photobleaching",
}

PERTURBATION_TABLES = {
    "compound": "JUMP-Target-1_compound_metadata.tsv",
    "crispr": "JUMP-Target-1_crispr_metadata.tsv",
    "orf": "JUMP-Target-1_orf_metadata.tsv",
}
COMPOUND_ANNOTATIONS = "JUMP-Target-1_compound_metadata_additional_annotations.tsv"


@dataclass(frozen=True)
class Batch:
    name: str
    plates: tuple[str, ...]
    acquisition_date: dt.date
    description: str


@dataclass(frozen=True)
class Plate:
    batch: str
    barcode: str
    plate_map: str
    perturbation: str
    cell_type: str
    time: int
    density: int
    antibiotics: str
    cell_line: str
    time_delay: str
    times_imaged: int
    anomaly: str
    description: str
    expected_images: int | None

    @property
    def key(self) -> str:
        """``<batch>/<barcode>``: the identity of a plate everywhere (storage paths too)."""
        return f"{self.batch}/{self.barcode}"


@dataclass(frozen=True)
class Well:
    well: str
    row: str
    col: int
    broad_sample: str
    pert_type: str
    control_type: str
    gene: str
    pert_iname: str
    target: str

    @property
    def is_negcon(self) -> bool:
        return self.control_type == "negcon"


def read_table(path: Path, sep: str, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a delimited metadata table, checking its shape line by line.

    Raises :class:`MetadataError` naming the file and line for a missing file, a missing
    required column, or a line whose field count differs from the header's.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file not found") from None
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc})") from None
    reader = csv.reader(io.StringIO(text), delimiter=sep)
    try:
        header = next(reader)
    except StopIteration:
        raise MetadataError(f"{path}: line 1: empty file, expected a header") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise MetadataError(f"{path}: line 1: missing column(s) {', '.join(missing)}; header is {header}")
    rows = []
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise MetadataError(
                f"{path}: line {lineno}: {len(row)} fields, expected {len(header)} ({sep!r}-separated)"
            )
        rows.append(row)
    return pd.DataFrame(rows, columns=header, dtype=str).fillna("")


def _int(value: str, path: Path, field: str, key: str) -> int:
    try:
        return int(float(value))
    except ValueError:
        raise MetadataError(f"{path}: plate {key}: field {field} is {value!r}, expected a number") from None


class Catalog:
    """All CPJUMP1 facts loaded from one metadata folder."""

    def __init__(self, metadata_dir: str | Path):
        self.root = Path(metadata_dir)
        if not self.root.is_dir():
            raise MetadataError(f"{self.root}: metadata folder not found")
        self._experiments = read_table(
            self.root / "experiment-metadata.tsv",
            "\t",
            ("Batch", "Plate_Map_Name", "Assay_Plate_Barcode", "Perturbation", "Cell_type", "Time", "Number_of_images"),
        )
        descriptions = self._plate_descriptions()
        self.batches: dict[str, Batch] = {}
        self._plates: dict[tuple[str, str], Plate] = {}
        exp_path = self.root / "experiment-metadata.tsv"
        exp_index = {(r.Batch, r.Assay_Plate_Barcode): r for r in self._experiments.itertuples(index=False)}
        platemaps = self.root / "platemaps"
        for batch_dir in sorted(p for p in platemaps.iterdir() if p.is_dir()):
            batch = batch_dir.name
            bpm_path = batch_dir / "barcode_platemap.csv"
            bpm = read_table(bpm_path, ",", ("Assay_Plate_Barcode", "Plate_Map_Name"))
            barcodes = []
            for lineno, r in enumerate(bpm.itertuples(index=False), start=2):
                exp = exp_index.get((batch, r.Assay_Plate_Barcode))
                if exp is None:
                    raise MetadataError(
                        f"{bpm_path}: line {lineno}: plate {r.Assay_Plate_Barcode} has no row in {exp_path}"
                    )
                if exp.Plate_Map_Name != r.Plate_Map_Name:
                    raise MetadataError(
                        f"{bpm_path}: line {lineno}: plate {r.Assay_Plate_Barcode} maps to {r.Plate_Map_Name} "
                        f"but {exp_path} says {exp.Plate_Map_Name}"
                    )
                key = f"{batch}/{r.Assay_Plate_Barcode}"
                plate = Plate(
                    batch=batch,
                    barcode=r.Assay_Plate_Barcode,
                    plate_map=r.Plate_Map_Name,
                    perturbation=exp.Perturbation,
                    cell_type=exp.Cell_type,
                    time=_int(exp.Time, exp_path, "Time", key),
                    density=_int(exp.Density or "100", exp_path, "Density", key),
                    antibiotics=exp.Antibiotics,
                    cell_line=exp.Cell_line,
                    time_delay=exp.Time_delay,
                    times_imaged=_int(exp.Times_imaged or "1", exp_path, "Times_imaged", key),
                    anomaly=exp.Anomaly,
                    description=descriptions.get(
                        (batch, r.Assay_Plate_Barcode),
                        f"{exp.Cell_type} {exp.Time}-hour {exp.Perturbation}"
                        + (f", {exp.Time_delay} delay" if exp.Time_delay not in ("", "Day0") else "")
                        + (f", imaged {exp.Times_imaged}x" if exp.Times_imaged not in ("", "1") else ""),
                    ),
                    expected_images=_int(exp.Number_of_images, exp_path, "Number_of_images", key)
                    if exp.Number_of_images
                    else None,
                )
                self._plates[(batch, plate.barcode)] = plate
                barcodes.append(plate.barcode)
            self.batches[batch] = Batch(
                name=batch,
                plates=tuple(barcodes),
                acquisition_date=dt.date(*(int(x) for x in batch.split("_")[:3])),
                description=BATCH_DESCRIPTIONS.get(batch, batch),
            )

    # ------------------------------------------------------------------ lookups
    def _plate_descriptions(self) -> dict[tuple[str, str], str]:
        out = {}
        folder = self.root / "plate_descriptions"
        for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
            table = read_table(path, ",", ("Batch", "Assay_Plate_Barcode", "Description"))
            for r in table.itertuples(index=False):
                out[(r.Batch, r.Assay_Plate_Barcode)] = r.Description
        return out

    def batch(self, name: str) -> Batch:
        try:
            return self.batches[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown batch {name!r}; valid batches: {', '.join(sorted(self.batches))}"
            ) from None

    def plates(self, batch: str) -> list[Plate]:
        return [self._plates[(batch, b)] for b in self.batch(batch).plates]

    def plate(self, batch: str, barcode: str) -> Plate:
        b = self.batch(batch)
        try:
            return self._plates[(batch, barcode)]
        except KeyError:
            raise UnknownNameError(
                f"unknown plate {barcode!r} in batch {batch}; valid plates: {', '.join(b.plates)}"
            ) from None

    def all_plates(self) -> list[Plate]:
        return [p for b in self.batches for p in self.plates(b)]

    def plate_map_path(self, batch: str, plate_map: str) -> Path:
        return self.root / "platemaps" / batch / "platemap" / f"{plate_map}.txt"

    @functools.cache
    def plate_map(self, batch: str, plate_map: str) -> pd.DataFrame:
        """The plate map (``well_position``, ``broad_sample``[, ``solvent``]); 384 unique wells."""
        self.batch(batch)
        path = self.plate_map_path(batch, plate_map)
        table = read_table(path, "\t", ("well_position", "broad_sample"))
        bad = sorted(set(table.well_position) - set(WELLS_384))
        if bad:
            raise MetadataError(f"{path}: wells outside a 384-well plate: {', '.join(bad[:10])}")
        dup = table.well_position[table.well_position.duplicated()].tolist()
        if dup:
            raise MetadataError(f"{path}: duplicate wells: {', '.join(dup[:10])}")
        return table

    @functools.cache
    def perturbation_metadata(self, kind: str) -> pd.DataFrame:
        """The perturbation table of ``kind`` (compound, crispr, orf)."""
        if kind not in PERTURBATION_TABLES:
            raise UnknownNameError(
                f"unknown perturbation type {kind!r}; valid: {', '.join(PERTURBATION_TABLES)}"
            )
        return read_table(
            self.root / "external_metadata" / PERTURBATION_TABLES[kind], "\t", ("broad_sample", "pert_type", "control_type")
        )

    @functools.cache
    def compound_targets(self) -> pd.DataFrame:
        """Compound annotations with ``target_list`` (pipe-separated genes) for matching."""
        return read_table(
            self.root / "external_metadata" / COMPOUND_ANNOTATIONS, "\t", ("broad_sample", "target_list")
        )

    def experiment_metadata(self) -> pd.DataFrame:
        return self._experiments.copy()

    def missing_perturbations(self, batch: str, barcode: str) -> list[str]:
        """broad_samples of the plate's map absent from its perturbation table."""
        plate = self.plate(batch, barcode)
        pm = self.plate_map(batch, plate.plate_map)
        known = set(self.perturbation_metadata(plate.perturbation).broad_sample)
        return sorted({s for s in pm.broad_sample if s and s not in known})

    def wells(self, batch: str, barcode: str) -> list[Well]:
        """The 384 wells of a plate with their perturbation and control type.

        Raises :class:`MetadataError` naming each perturbation of the plate map that is not in
        the plate type's metadata table.
        """
        plate = self.plate(batch, barcode)
        missing = self.missing_perturbations(batch, barcode)
        if missing:
            raise MetadataError(
                f"plate {plate.key}: perturbation(s) of plate map {plate.plate_map} missing from "
                f"{PERTURBATION_TABLES[plate.perturbation]}: {', '.join(missing)}"
            )
        meta = self.perturbation_metadata(plate.perturbation).drop_duplicates("broad_sample").set_index("broad_sample")
        wells = []
        for r in self.plate_map(batch, plate.plate_map).itertuples(index=False):
            m = meta.loc[r.broad_sample] if r.broad_sample in meta.index else None
            get = (lambda c: str(m[c]) if m is not None and c in m.index else "")
            wells.append(
                Well(
                    well=r.well_position,
                    row=r.well_position[0],
                    col=int(r.well_position[1:]),
                    broad_sample=r.broad_sample,
                    pert_type=get("pert_type"),
                    control_type=get("control_type"),
                    gene=get("gene"),
                    pert_iname=get("pert_iname"),
                    target=get("target"),
                )
            )
        return sorted(wells, key=lambda w: (w.row, w.col))


@functools.cache
def _load(path: str) -> Catalog:
    return Catalog(path)


def load_catalog(metadata_dir: str | Path | None = None) -> Catalog:
    """The catalog of ``metadata_dir`` (default: the settings' ``metadata_dir``), cached."""
    if metadata_dir is None:
        from cpjump1.settings import get_settings

        metadata_dir = get_settings().metadata_dir
    return _load(str(Path(metadata_dir).resolve()))


# ---------------------------------------------------------------------- CLI


@click.command("catalog")
@click.option("--batch", default=None, help="Only this batch's plates.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON instead of tables.")
@click.option("--metadata-dir", default=None, help="Metadata folder (default: settings).")
def command(batch: str | None, as_json: bool, metadata_dir: str | None) -> None:
    """Print the CPJUMP1 batches and plates."""
    from tabulate import tabulate

    cat = load_catalog(metadata_dir)
    batches = [cat.batch(batch)] if batch else list(cat.batches.values())
    plates = [p for b in batches for p in cat.plates(b.name)]
    if as_json:
        click.echo(
            json.dumps(
                {
                    "batches": [
                        {**asdict(b), "acquisition_date": b.acquisition_date.isoformat(), "plates": list(b.plates)}
                        for b in batches
                    ],
                    "plates": [asdict(p) for p in plates],
                },
                indent=2,
            )
        )
        return
    click.echo(
        tabulate(
            [(b.name, b.acquisition_date.isoformat(), len(b.plates), b.description) for b in batches],
            headers=["batch", "acquired", "plates", "description"],
        )
    )
    click.echo()
    click.echo(
        tabulate(
            [
                (p.batch, p.barcode, p.perturbation, p.cell_type, p.time, p.expected_images, p.description)
                for p in plates
            ],
            headers=["batch", "plate", "perturbation", "cell type", "time (h)", "images", "description"],
        )
    )
