"""Aggregate stage: CellProfiler single-cell tables → one single-cell Parquet → well medians.

Method
------
Each analysis shard (``Layout.analysis_dir(batch, plate)/<shard>/`` holding a completion
marker ``_COMPLETE.json``) contains CellProfiler ``ExportToSpreadsheet`` tables without
prefixes: ``Image.csv``, ``Nuclei.csv``, ``Cells.csv``, ``Cytoplasm.csv``. Objects are joined
the way cytominer-database / pycytominer's ``SingleCells`` join them: the cytoplasm is the
anchor, its ``Parent_Cells`` and ``Parent_Nuclei`` point at the cell and nucleus of the same
image (``ImageNumber``). Keys are *shard + ImageNumber* so that image numbers need not be unique
across shards. Every non-key column of an object table becomes a feature named
``<Compartment>_<column>`` (``Cells_AreaShape_Area``, ``Cytoplasm_Parent_Cells``, …), which is
the naming pycytominer and the seed's profiles use (pycytominer's blocklist later removes
bookkeeping columns such as ``Cells_Number_Object_Number``).

The single cells of the plate are written to ``Layout.single_cell_file(batch, plate)``
(Parquet, sorted by well, site, image and object; row groups of whole wells, and the file's
key-value metadata says where every well's rows are; features are required float64, missing
values NaN, uncompressed PLAIN, see :data:`PARQUET_OPTIONS` and :class:`SingleCellWriter`). Well-level profiles are
the per-feature **median** over the cells of a well (pycytominer ``aggregate(operation=
"median")``, NaN skipped). They are taken in the same pass that writes the single-cell file,
from each well's rows while they are in memory, so peak memory depends on the size of one
well, not on the number of cells in the plate, and the file is never read back.
:func:`well_medians` computes the same numbers from a written file, one well at a time.

The joins run in DuckDB one shard at a time (bounded by ``memory_limit``; DuckDB spills),
shard outputs are merged by well with a k-way merge over the shards' record batches.

Outputs (all written atomically, skipped on rerun when the fingerprint marker matches)::

    workspace/backend/<batch>/<plate>/<plate>.parquet      single cells
    profiles/<batch>/<plate>/<plate>.csv.gz                well medians, float format %.5g
    profiles/<batch>/<plate>/<plate>.parquet               the same numbers as read back from the CSV

The well-level file has ``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Count_Cells``
(sum of the Image table's ``Count_Cells`` over the well's sites, or the number of joined cells
when the Image table has no count), ``Metadata_Count_Nuclei``, ``Metadata_Count_Cytoplasm``,
``Metadata_Site_Count`` and ``Metadata_Object_Count`` (joined single cells), then the
``Cells_``/``Cytoplasm_``/``Nuclei_`` feature medians.

Synthetic input (:func:`write_synthetic_shards`, :func:`write_synthetic_single_cells`) makes
tables of the same shape for the tests and the benchmark, generated in chunks.
"""

from __future__ import annotations

import csv
import heapq
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cpjump1 import storage
from cpjump1.errors import InputDataError

log = logging.getLogger(__name__)

#: CellProfiler object tables and the compartment prefix of their features.
COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei")
IMAGE_TABLE = "Image"
TABLE_FILES = {name: f"{name}.csv" for name in (IMAGE_TABLE, *COMPARTMENTS)}
#: Columns every object table must have.
OBJECT_KEYS = ("ImageNumber", "ObjectNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site")
IMAGE_KEYS = ("ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site")
#: Relationship columns (besides the keys) each object table must have.
PARENTS = {"Cells": ("Parent_Nuclei",), "Cytoplasm": ("Parent_Cells", "Parent_Nuclei"), "Nuclei": ()}
#: Image-table counts carried into the well profile as metadata.
IMAGE_COUNTS = ("Count_Cells", "Count_Nuclei", "Count_Cytoplasm")
#: Metadata columns of the single-cell file, in order.
SINGLE_CELL_METADATA = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_Shard",
    "Metadata_ImageNumber",
    "Metadata_ObjectNumber",
)
#: Metadata columns of the well-level profile, in order.
WELL_METADATA = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Count_Cells",
    "Metadata_Count_Nuclei",
    "Metadata_Count_Cytoplasm",
    "Metadata_Site_Count",
    "Metadata_Object_Count",
)
WELLS_KEY = b"cpjump1.wells"
#: single-cell Parquet layout (see DATA_CONTRACTS.md "aggregate"): features are required
#: (non-nullable) float64 with a missing value stored as NaN, uncompressed, PLAIN-encoded, one
#: v1 data page per column chunk, no statistics; dictionaries and statistics only for the
#: metadata columns. Float64 measurements barely compress (snappy/zstd burn CPU on every read
#: for a few per cent), and this layout lets :class:`_WellReader` read a well's feature values
#: straight into a (features × cells) array instead of decoding thousands of column chunks one
#: by one. Readers find a well's rows through the WELLS_KEY metadata:
#: ``{well: [[row group, first row in it, rows], ...]}``.
PARQUET_OPTIONS = {
    "compression": "none",
    "use_dictionary": ["Metadata_Plate", "Metadata_Well", "Metadata_Shard"],
    "write_statistics": ["Metadata_Plate", "Metadata_Well", "Metadata_Site"],
    "data_page_version": "1.0",
    "data_page_size": 1 << 30,
    "max_rows_per_page": 1 << 30,
}
#: a row group holds whole wells, about this many bytes of features (a well larger than that
#: gets row groups of its own): few row groups keep the footer small (its metadata costs ~1 KB of
#: memory per column chunk once parsed: one row group per well would be ~1 GB for 384 wells ×
#: 3000 features), while the writer buffers at most one row group
ROW_GROUP_BYTES = 256 << 20
FEATURES_PER_CHUNK = 384
VERSION = "aggregate-2"


def is_feature(column: str) -> bool:
    """pycytominer's feature inference: a column of one of the three compartments."""
    return column.split("_", 1)[0] in COMPARTMENTS and "_" in column


def single_cell_schema(schema: pa.Schema) -> pa.Schema:
    """The single-cell file's schema for ``schema``'s columns: features required float64."""
    fields = [pa.field(f.name, pa.float64(), nullable=False) if is_feature(f.name) else f for f in schema]
    return pa.schema(fields)


def as_single_cell_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` in :func:`single_cell_schema` form: missing feature values (NULL) become NaN."""
    arrays = []
    for f in schema:
        col = batch.column(f.name)
        if is_feature(f.name):
            if col.type != pa.float64():
                col = col.cast(pa.float64())
            if col.null_count:
                col = pc.fill_null(col, np.nan)
        elif col.type != f.type:
            col = col.cast(f.type)
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------- shards


@dataclass
class Shard:
    name: str
    url: str
    files: dict[str, str] = field(default_factory=dict)


def list_shards(batch: str, plate: str, settings: Any) -> list[Shard]:
    """The complete shards (with ``_COMPLETE.json``) of a plate, sorted by name.

    Raises :class:`InputDataError` naming the plate and folder when there is none, and naming
    the file when a complete shard lacks one of its four tables.
    """
    folder = storage.Layout(settings.storage_root).analysis_dir(batch, plate)
    entries = sorted(storage.listdir(folder, settings))
    shards = []
    for entry in entries:
        name = storage.basename(entry)
        if name.startswith(".") or name.startswith("_"):
            continue
        if storage.read_marker(entry, settings) is None:
            log.warning("plate %s: shard %s has no %s yet; skipped", plate, entry, storage.MARKER_NAME)
            continue
        shard = Shard(name=name, url=entry)
        for table, fname in TABLE_FILES.items():
            url = storage.join(entry, fname)
            if not storage.exists(url, settings):
                raise InputDataError(
                    f"plate {batch}/{plate}: shard {name} is marked complete but its {table} table "
                    f"{url} is missing"
                )
            shard.files[table] = url
        shards.append(shard)
    if not shards:
        raise InputDataError(
            f"plate {batch}/{plate}: no complete analysis shard (folder with {storage.MARKER_NAME}) under {folder}"
        )
    return shards


def _read_header(url: str, settings: Any) -> list[str]:
    with storage.open_file(url, "rb", settings) as fh:
        line = fh.readline().decode("utf-8-sig")
    if not line.strip():
        raise InputDataError(f"{url}: empty table, expected a CellProfiler header line")
    return next(csv.reader([line]))


def _check_columns(url: str, header: list[str], required: Iterable[str], plate: str) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        close = {}
        for m in missing:
            import difflib

            near = difflib.get_close_matches(m, header, n=1)
            if near:
                close[m] = near[0]
        hint = "".join(f"; found {v!r} (misspelled {k!r}?)" for k, v in close.items())
        raise InputDataError(f"plate {plate}: {url}: missing column(s) {', '.join(missing)}{hint}")
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise InputDataError(f"plate {plate}: {url}: duplicate column(s) {', '.join(dup)}")


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _LocalCopies:
    """Local paths of shard tables (downloads remote ones to a scratch folder)."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.tmp = Path(tempfile.mkdtemp(prefix="cpjump1-aggregate-"))

    def path(self, url: str) -> str:
        if not storage.is_remote(url):
            return str(Path(url.removeprefix("file://")))
        local = self.tmp / url.replace("://", "_").replace("/", "_")
        if not local.exists():
            storage.get_file(url, local, self.settings)
        return str(local)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class ShardSchema:
    features: dict[str, list[str]]  # compartment -> raw column names (features)
    image_counts: list[str]
    headers: dict[str, list[str]] = field(default_factory=dict)  # compartment -> header


def shard_schema(shard: Shard, plate: str, settings: Any) -> ShardSchema:
    """Check the shard's headers and list its feature columns per compartment."""
    features: dict[str, list[str]] = {}
    headers: dict[str, list[str]] = {}
    for comp in COMPARTMENTS:
        url = shard.files[comp]
        header = headers[comp] = _read_header(url, settings)
        _check_columns(url, header, OBJECT_KEYS + PARENTS[comp], plate)
        features[comp] = [c for c in header if c not in ("ImageNumber", "ObjectNumber") and not c.startswith("Metadata_")]
    url = shard.files[IMAGE_TABLE]
    header = _read_header(url, settings)
    _check_columns(url, header, IMAGE_KEYS, plate)
    return ShardSchema(features=features, image_counts=[c for c in IMAGE_COUNTS if c in header], headers=headers)


def _shard_query(shard: Shard, schema: ShardSchema, paths: dict[str, str]) -> str:
    def reader(comp: str, keys: tuple[str, ...]) -> str:
        # every column typed from the header: keys BIGINT, metadata VARCHAR, features DOUBLE
        # (no type sniffing: a feature that is integral in the first rows stays DOUBLE)
        cols = {c: "VARCHAR" for c in schema.headers[comp]}
        cols.update({c: "DOUBLE" for c in schema.features[comp]})
        cols.update({k: "BIGINT" for k in keys if not k.startswith("Metadata_")})
        cols["Metadata_Site"] = "BIGINT"
        types = ", ".join(f"{_sql_str(k)}: {_sql_str(v)}" for k, v in cols.items())
        return (
            f"read_csv({_sql_str(paths[comp])}, header=true, auto_detect=false, delim=',', quote='\"', "
            f"columns={{{types}}}, nullstr=['', 'nan', 'NaN'])"
        )

    select = [
        "cy.Metadata_Plate AS Metadata_Plate",
        "cy.Metadata_Well AS Metadata_Well",
        "cy.Metadata_Site AS Metadata_Site",
        f"{_sql_str(shard.name)} AS Metadata_Shard",
        "cy.ImageNumber AS Metadata_ImageNumber",
        "cy.ObjectNumber AS Metadata_ObjectNumber",
    ]
    alias = {"Cells": "ce", "Cytoplasm": "cy", "Nuclei": "nu"}
    for comp in COMPARTMENTS:
        for col in schema.features[comp]:
            select.append(f"{alias[comp]}.{_ident(col)} AS {_ident(f'{comp}_{col}')}")
    keys = {c: OBJECT_KEYS + PARENTS[c] for c in COMPARTMENTS}
    return (
        f"SELECT {', '.join(select)} FROM {reader('Cytoplasm', keys['Cytoplasm'])} cy "
        f"JOIN {reader('Cells', keys['Cells'])} ce ON ce.ImageNumber = cy.ImageNumber AND ce.ObjectNumber = cy.Parent_Cells "
        f"JOIN {reader('Nuclei', keys['Nuclei'])} nu ON nu.ImageNumber = cy.ImageNumber AND nu.ObjectNumber = cy.Parent_Nuclei "
        "ORDER BY Metadata_Well, Metadata_Site, Metadata_ImageNumber, Metadata_ObjectNumber"
    )


def _connect(threads: int | None = None, memory_limit: str = "1GB"):
    import duckdb

    con = duckdb.connect(config={"memory_limit": memory_limit, "preserve_insertion_order": False})
    if threads:
        con.execute(f"SET threads={int(threads)}")
    tmp = Path(tempfile.gettempdir()) / "cpjump1-duckdb"
    tmp.mkdir(exist_ok=True)
    con.execute(f"SET temp_directory={_sql_str(str(tmp))}")
    return con


def _image_counts(con, shard: Shard, schema: ShardSchema, path: str) -> pd.DataFrame:
    counts = ", ".join(f"TRY_CAST({_ident(c)} AS DOUBLE) AS {_ident(c)}" for c in schema.image_counts)
    sql = (
        f"SELECT Metadata_Plate, Metadata_Well, CAST(Metadata_Site AS BIGINT) AS Metadata_Site, "
        f"CAST(ImageNumber AS BIGINT) AS ImageNumber{', ' + counts if counts else ''} "
        f"FROM read_csv({_sql_str(path)}, header=true, auto_detect=true, types={{'Metadata_Plate': 'VARCHAR', 'Metadata_Well': 'VARCHAR'}})"
    )
    return con.execute(sql).df()


# --------------------------------------------------------------------------- single cells


def _batches_by_well(path: Path) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(well, batch) pairs of a well-sorted Parquet file, batches split at well changes."""
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=8192):
        wells = batch.column("Metadata_Well").to_numpy(zero_copy_only=False)
        if len(wells) == 0:
            continue
        cuts = np.flatnonzero(wells[1:] != wells[:-1]) + 1
        start = 0
        for end in [*cuts.tolist(), len(wells)]:
            yield str(wells[start]), batch.slice(start, end - start)
            start = end


def build_single_cells(
    batch: str,
    plate: str,
    settings: Any,
    out_path: Path,
    threads: int | None = None,
    memory_limit: str = "1GB",
) -> dict[str, Any]:
    """Join every complete shard's tables and write the plate's single cells to ``out_path``.

    Returns a summary (shards, cells, features, per-well image counts, row groups per well and
    the well medians taken while writing, see :func:`_merge_by_well`). Raises
    :class:`InputDataError` naming the plate and the file for missing tables or columns, a
    plate barcode that differs from ``plate``, or shards whose feature columns differ.
    """
    shards = list_shards(batch, plate, settings)
    schemas = [shard_schema(s, plate, settings) for s in shards]
    ref = schemas[0]
    for shard, sch in zip(shards[1:], schemas[1:], strict=True):
        for comp in COMPARTMENTS:
            if sch.features[comp] != ref.features[comp]:
                extra = sorted(set(sch.features[comp]) ^ set(ref.features[comp]))[:5]
                raise InputDataError(
                    f"plate {batch}/{plate}: {shard.files[comp]} has other {comp} columns than "
                    f"{shards[0].files[comp]} (differing: {', '.join(extra) or 'order'})"
                )
    copies = _LocalCopies(settings)
    con = _connect(threads, memory_limit)
    scratch = Path(tempfile.mkdtemp(prefix="cpjump1-shards-", dir=out_path.parent))
    image_frames = []
    shard_files = []
    try:
        from tqdm.auto import tqdm

        for shard, sch in tqdm(list(zip(shards, schemas)), desc=f"{plate} shards", unit="shard", disable=None):
            paths = {t: copies.path(u) for t, u in shard.files.items()}
            images = _image_counts(con, shard, sch, paths[IMAGE_TABLE])
            bad = sorted(set(images.Metadata_Plate.astype(str)) - {plate})
            if bad:
                raise InputDataError(
                    f"plate {batch}/{plate}: {shard.files[IMAGE_TABLE]} holds images of plate(s) {', '.join(bad)}"
                )
            images["Metadata_Shard"] = shard.name
            image_frames.append(images)
            target = scratch / f"{shard.name}.parquet"
            try:
                con.execute(
                    f"COPY ({_shard_query(shard, sch, paths)}) TO {_sql_str(str(target))} "
                    "(FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE 16384)"
                )
            except Exception as exc:  # duckdb conversion / parse errors name the file themselves
                raise InputDataError(f"plate {batch}/{plate}: shard {shard.name} ({shard.url}): {exc}") from exc
            shard_files.append(target)
        images = pd.concat(image_frames, ignore_index=True)
        n_cells, well_groups, schema, medians = _merge_by_well(shard_files, out_path, plate, threads=threads)
    finally:
        con.close()
        copies.close()
        shutil.rmtree(scratch, ignore_errors=True)
    features = [f for f in schema.names if is_feature(f)]
    return {
        "shards": [s.name for s in shards],
        "cells": n_cells,
        "features": len(features),
        "images": images,
        "wells": well_groups,
        "medians": medians,
    }


def _merge_by_well(
    shard_files: list[Path], out_path: Path, plate: str, threads: int | None = None, progress: bool = True
) -> tuple[int, dict[str, list[list[int]]], pa.Schema, pd.DataFrame]:
    """k-way merge of well-sorted shard files into one file whose row groups never span wells.

    The well medians are taken in the same pass, from the rows of each well while they are in
    memory (the numbers :func:`well_medians` gives for the written file), so the stage never
    reads the single-cell file back. Memory: one well (its Arrow rows and one float64 copy of
    its features), a record batch per shard and the row group being filled (:class:`SingleCellWriter`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    schema = single_cell_schema(pq.read_schema(shard_files[0]))
    features = [c for c in schema.names if is_feature(c)]
    iters = [_batches_by_well(p) for p in shard_files]
    heap: list[tuple[str, int, pa.RecordBatch]] = []
    for i, it in enumerate(iters):
        first = next(it, None)
        if first is not None:
            heap.append((first[0], i, first[1]))
    heapq.heapify(heap)
    meta: list[dict[str, Any]] = []
    values: list[np.ndarray] = []
    n_cells = 0
    pending: list[pa.RecordBatch] = []
    current: str | None = None
    threads = threads or _default_threads()
    bar = tqdm(desc=f"{plate} wells", unit="well", disable=None if progress else True)

    def flush(writer, pool):
        nonlocal pending
        if not pending:
            return
        table = pa.Table.from_batches(pending, schema=schema)
        pending = []
        arr = np.empty((len(features), table.num_rows))
        for j, c in enumerate(features):
            arr[j] = table.column(c).to_numpy()
        medians = pool.submit(_parallel_row_medians, arr, pool if threads > 1 else None, FEATURES_PER_CHUNK)
        writer.add(current, table)  # encoding and writing overlap the medians
        meta.append(_meta_of(table, current))
        values.append(medians.result())
        bar.update()

    writer = SingleCellWriter(out_path, schema)
    try:
        with ThreadPoolExecutor(max_workers=threads + 1) as pool:
            while heap:
                well, i, rb = heapq.heappop(heap)
                if well != current:
                    flush(writer, pool)
                    current = well
                pending.append(as_single_cell_batch(rb, schema))
                n_cells += rb.num_rows
                nxt = next(iters[i], None)
                if nxt is not None:
                    heapq.heappush(heap, (nxt[0], i, nxt[1]))
            flush(writer, pool)
        well_groups = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    if n_cells == 0:
        raise InputDataError(f"plate {plate}: the analysis shards hold no cells (no cytoplasm joined to cells and nuclei)")
    return n_cells, well_groups, schema, _medians_frame(meta, values, features)


class SingleCellWriter:
    """Writes a plate's single cells well by well (wells in sorted order) into row groups made of
    whole wells, about :data:`ROW_GROUP_BYTES` of features each, with :data:`PARQUET_OPTIONS`;
    records where every well's rows are (``WELLS_KEY`` metadata). Holds at most one row group."""

    def __init__(self, path: str | Path, schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES):
        n_features = sum(1 for f in schema if is_feature(f.name))
        self.limit = max(1, row_group_bytes // max(1, 8 * n_features))
        self.writer = pq.ParquetWriter(path, schema, **PARQUET_OPTIONS)
        self.pending: list[tuple[str, pa.Table]] = []
        self.rows = 0
        self.group = 0
        self.segments: dict[str, list[list[int]]] = {}

    def add(self, well: str, table: pa.Table) -> None:
        if self.pending and self.rows + table.num_rows > self.limit:
            self._flush()
        self.pending.append((well, table))
        self.rows += table.num_rows
        if self.rows >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if len(self.pending) == 1 and self.rows > self.limit:  # one big well: several row groups
            well, table = self.pending[0]
            self.writer.write_table(table, row_group_size=self.limit)
            for start in range(0, table.num_rows, self.limit):
                self.segments.setdefault(well, []).append([self.group, 0, min(self.limit, table.num_rows - start)])
                self.group += 1
        else:
            table = pa.concat_tables([t for _, t in self.pending])
            self.writer.write_table(table, row_group_size=max(1, table.num_rows))
            start = 0
            for well, t in self.pending:
                self.segments.setdefault(well, []).append([self.group, start, t.num_rows])
                start += t.num_rows
            self.group += 1
        self.pending, self.rows = [], 0

    def close(self) -> dict[str, list[list[int]]]:
        self._flush()
        self.writer.add_key_value_metadata({WELLS_KEY: json.dumps(self.segments).encode()})
        self.writer.close()
        return self.segments

    def abort(self) -> None:
        self.writer.close()


def well_segments(pf: pq.ParquetFile) -> dict[str, list[tuple[int, int, int]]]:
    """Map well → its rows in a single-cell file as ``(row group, first row, rows)`` segments
    (from the ``WELLS_KEY`` metadata; older files list whole row groups; files without it need
    one well per row group, found from the statistics)."""
    meta = pf.metadata.metadata or {}  # the file's key-value metadata (written at close)
    if WELLS_KEY in meta:
        out = {}
        for well, segs in json.loads(meta[WELLS_KEY]).items():
            out[well] = [tuple(x) if isinstance(x, list) else (x, 0, pf.metadata.row_group(x).num_rows) for x in segs]
        return out
    idx = pf.schema_arrow.get_field_index("Metadata_Well")
    out = {}
    for g in range(pf.num_row_groups):
        st = pf.metadata.row_group(g).column(idx).statistics
        if st is None or st.min != st.max:
            raise InputDataError(f"{pf}: row group {g} is not one well; rebuild the single-cell file")
        out.setdefault(str(st.min), []).append((g, 0, pf.metadata.row_group(g).num_rows))
    return out


# --------------------------------------------------------------------------- medians


def _row_medians(arr: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Medians of the rows of a 2-D float64 array, NaN skipped; NaN for a row without values.

    The numbers of ``np.median`` (and of pandas' / pycytominer's median): for ``n`` values the
    ``n // 2``-th smallest, and for even ``n`` the mean ``(a + b) / 2`` of it and the largest
    value below it. One selection per row (``np.partition`` with a single ``kth``, which NumPy
    runs with its SIMD quickselect) plus a ``max`` over each half, instead of the three
    selections ``np.median`` asks for. The partition orders NaN last, so a row has a NaN exactly
    when the maximum of its upper half is NaN; those rows go through ``np.nanmedian``.
    ``overwrite=True`` partitions ``arr`` in place (no copy).
    """
    rows, n = arr.shape
    if rows == 0 or n == 0:
        return np.full(rows, np.nan)
    work = arr if overwrite else arr.copy()
    h = n // 2
    work.partition(h, axis=1)
    upper = work[:, h].copy()
    nan_rows = np.isnan(work[:, h:].max(axis=1))
    if n % 2:
        out = upper
    else:
        out = (work[:, :h].max(axis=1) + upper) / 2
    if nan_rows.any():
        import warnings

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            out[nan_rows] = np.nanmedian(work[nan_rows], axis=1)
    return out


def _parallel_row_medians(arr: np.ndarray, pool: Any | None, features_per_chunk: int) -> np.ndarray:
    """:func:`_row_medians` of ``arr`` (features × cells, owned: partitioned in place), in
    feature chunks spread over ``pool``'s threads (NumPy releases the GIL while partitioning)."""
    bounds = list(range(0, arr.shape[0], max(1, features_per_chunk))) + [arr.shape[0]]
    parts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if pool is None or len(parts) < 2:
        return np.concatenate([_row_medians(arr[a:b], overwrite=True) for a, b in parts]) if parts else np.full(0, np.nan)
    futures = [pool.submit(_row_medians, arr[a:b], True) for a, b in parts]
    return np.concatenate([f.result() for f in futures])


def _default_threads() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)))


# Parquet compact-protocol reading of one data page header (enough to check the layout the
# raw reader relies on; https://github.com/apache/parquet-format, PageHeader / DataPageHeader).


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _zigzag(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


def _skip(buf: bytes, pos: int, ctype: int) -> int:
    if ctype in (1, 2):  # bool true / false (in a struct field header)
        return pos
    if ctype == 3:
        return pos + 1
    if ctype in (4, 5, 6):
        return _varint(buf, pos)[1]
    if ctype == 7:
        return pos + 8
    if ctype == 8:
        size, pos = _varint(buf, pos)
        return pos + size
    if ctype in (9, 10):
        head = buf[pos]
        pos += 1
        size, etype = head >> 4, head & 0x0F
        if size == 15:
            size, pos = _varint(buf, pos)
        for _ in range(size):
            pos = _skip(buf, pos, 3 if etype in (1, 2) else etype)
        return pos
    if ctype == 12:
        return _struct(buf, pos, lambda fid, ct, p: _skip(buf, p, ct))
    raise ValueError(f"thrift type {ctype}")


def _struct(buf: bytes, pos: int, field) -> int:
    last = 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return pos
        delta, ctype = head >> 4, head & 0x0F
        if delta:
            fid = last + delta
        else:
            raw, pos = _varint(buf, pos)
            fid = _zigzag(raw)
        last = fid
        pos = field(fid, ctype, pos)


def _page_header(buf: bytes) -> tuple[int, dict[str, int]]:
    """(header length, fields) of a Parquet page header at the start of ``buf``."""
    out: dict[str, int] = {}
    names = {1: "type", 2: "uncompressed", 3: "compressed", 4: "crc"}

    def page(fid: int, ctype: int, pos: int) -> int:
        if fid in names and ctype == 5:
            v, pos = _varint(buf, pos)
            out[names[fid]] = _zigzag(v)
            return pos
        if fid == 5 and ctype == 12:  # DataPageHeader (v1)
            return _struct(buf, pos, data)
        out.setdefault("other", fid)
        return _skip(buf, pos, ctype)

    def data(fid: int, ctype: int, pos: int) -> int:
        if fid in (1, 2) and ctype == 5:
            v, pos = _varint(buf, pos)
            out["num_values" if fid == 1 else "encoding"] = _zigzag(v)
            return pos
        if fid == 5:
            out["statistics"] = 1
        return _skip(buf, pos, ctype)

    end = _struct(buf, 0, page)
    return end, out


class _WellReader:
    """Reads the feature columns of one well of a single-cell file as a (features × cells)
    float64 array, and the well's plate and site count.

    Fast path for the layout :func:`single_cell_schema` / :data:`PARQUET_OPTIONS` write
    (features required ``DOUBLE``, uncompressed, PLAIN, one v1 data page per column chunk, the
    feature columns stored one after the other in schema order): once per row group it checks
    that every feature column chunk starts where that layout puts it and carries the same page
    header (data page v1, PLAIN, all rows, no CRC), reads the row group's whole feature block
    with one ``preadv`` into a reused buffer and cuts each of its wells out of it with one
    strided copy (no decoding). Row groups are read in order, each once. Any other layout
    (another writer, compression, nullable columns, split pages) is read through ``pyarrow``,
    one row group at a time, with the same result.
    """

    def __init__(self, path: str | Path, pf: pq.ParquetFile, features: list[str]):
        self.path = str(path)
        self.pf = pf
        self.features = features
        position = {c: i for i, c in enumerate(pf.schema_arrow.names)}
        self.index = [position[c] for c in features]
        self.raw = bool(self.index) and self.index == list(range(self.index[0], self.index[0] + len(self.index)))
        if self.raw:
            for i in self.index:
                col = pf.schema.column(i)
                if col.physical_type != "DOUBLE" or col.max_definition_level or col.max_repetition_level:
                    self.raw = False
                    break
        self.fh = open(self.path, "rb") if self.raw else None
        self.groups: dict[int, tuple[int, int, int] | None] = {}  # row group → (start, chunk size, header length)
        self.cache: tuple[int, pa.Table | None, pa.Table] | None = None  # last row group read through pyarrow
        self.buffer: bytearray | None = None  # the feature block of the last row group read raw
        self.block: tuple[int, np.ndarray] | None = None

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()

    def _layout(self, g: int) -> tuple[int, int, int] | None:
        """(offset of the first feature chunk, chunk size, page header length) when row group
        ``g`` has the raw-readable layout, else None."""
        if g in self.groups:
            return self.groups[g]
        self.groups[g] = None
        rg = self.pf.metadata.row_group(g)
        n, k = rg.num_rows, len(self.index)
        first, last = rg.column(self.index[0]), rg.column(self.index[-1])
        size = first.total_compressed_size
        if (
            first.compression != "UNCOMPRESSED"
            or last.compression != "UNCOMPRESSED"
            or first.has_dictionary_page
            or size != last.total_compressed_size
            or last.data_page_offset != first.data_page_offset + (k - 1) * size
        ):
            return None
        fd, start = self.fh.fileno(), first.data_page_offset
        head_bytes = os.pread(fd, min(size, 256), start)
        try:
            hl, head = _page_header(head_bytes)
        except (IndexError, ValueError):
            return None
        if (
            head.get("type") != 0  # DATA_PAGE (v1)
            or head.get("encoding") != 0  # PLAIN
            or head.get("num_values") != n
            or head.get("compressed") != 8 * n
            or head.get("uncompressed") != 8 * n
            or hl + 8 * n != size
            or "crc" in head
            or "other" in head
        ):
            return None
        self.groups[g] = (start, size, hl)
        return self.groups[g]

    def _block(self, g: int, layout: tuple[int, int, int]) -> np.ndarray | None:
        """Row group ``g``'s feature block as a (features × rows) strided view of the reused
        read buffer (one ``preadv`` per row group; the wells of the group are cut from it), or
        None when a chunk's page header differs from the first one."""
        if self.block is not None and self.block[0] == g:
            return self.block[1]
        start, size, hl = layout
        k, n = len(self.index), (size - hl) // 8
        if self.buffer is None or len(self.buffer) < size * k:
            self.buffer = None
            self.buffer = bytearray(size * k)
        buf = memoryview(self.buffer)[: size * k]
        if os.preadv(self.fh.fileno(), [buf], start) != size * k:
            raise InputDataError(f"{self.path}: row group {g} ends early (truncated file?)")
        raw = np.frombuffer(buf, dtype=np.uint8)
        heads = np.lib.stride_tricks.as_strided(raw, shape=(k, hl), strides=(size, 1))
        if not (heads == raw[:hl]).all():  # same header everywhere: same length and layout
            self.groups[g] = None
            return None
        view = np.ndarray((k, n), dtype="<f8", buffer=buf, offset=hl, strides=(size, 8))
        self.block = (g, view)
        return view

    def _arrow(self, g: int, columns: list[str] | None) -> pa.Table:
        if self.cache is None or self.cache[0] != g:
            self.cache = (g, None, self.pf.read_row_group(g, columns=["Metadata_Plate", "Metadata_Site"]))
        if columns is None:
            return self.cache[2]
        if self.cache[1] is None:
            self.cache = (g, self.pf.read_row_group(g, columns=columns), self.cache[2])
        return self.cache[1]

    def read(self, well: str, segments: list[tuple[int, int, int]]) -> tuple[dict[str, Any], np.ndarray]:
        total = sum(n for _, _, n in segments)
        out = np.empty((len(self.features), total))
        metas = []
        col = 0
        for g, first, n in segments:
            layout = self._layout(g) if self.raw else None
            block = self._block(g, layout) if layout is not None else None
            if block is not None:
                out[:, col : col + n] = block[:, first : first + n]
            else:
                table = self._arrow(g, self.features).slice(first, n)
                for j, c in enumerate(table.columns):
                    out[j, col : col + n] = c.to_numpy(zero_copy_only=False)
            metas.append(self._arrow(g, None).slice(first, n))
            col += n
        return _meta_of(pa.concat_tables(metas), well), out


def _meta_of(table: pa.Table, well: str) -> dict[str, Any]:
    plates = pc.unique(table.column("Metadata_Plate")).to_pylist()
    return {
        "Metadata_Plate": plates[0] if plates else None,
        "Metadata_Well": well,
        "Metadata_Site_Count": len(pc.unique(table.column("Metadata_Site"))),
        "Metadata_Object_Count": table.num_rows,
    }


def _medians_frame(meta: list[dict[str, Any]], values: list[np.ndarray], features: list[str]) -> pd.DataFrame:
    out = np.vstack(values) if values else np.empty((0, len(features)))
    return pd.concat([pd.DataFrame(meta, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site_Count", "Metadata_Object_Count"]), pd.DataFrame(out, columns=features)], axis=1)


def well_medians(
    path: str | Path,
    features_per_chunk: int = FEATURES_PER_CHUNK,
    progress: bool = True,
    threads: int | None = None,
) -> pd.DataFrame:
    """Per-well feature medians of a single-cell Parquet file, streamed well by well.

    Equals ``pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"],
    operation="median")`` (NaN skipped; the mean of the two middle values for even counts),
    but holds at most two wells in memory (the one whose medians are taken and the next one,
    read ahead in a background thread): memory does not grow with the number of cells of the
    plate. A well's features are read as one (features × cells) array (:class:`_WellReader`),
    and the medians run ``features_per_chunk`` features per task on ``threads`` threads
    (default: the usable cores, at most 4). Adds ``Metadata_Object_Count`` (cells) and
    ``Metadata_Site_Count``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    pf = pq.ParquetFile(path)
    segments = well_segments(pf)
    features = [c for c in pf.schema_arrow.names if is_feature(c)]
    wells = sorted(segments)
    reader = _WellReader(path, pf, features)
    threads = threads or _default_threads()
    meta: list[dict[str, Any]] = []
    values: list[np.ndarray] = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            ahead = pool.submit(reader.read, wells[0], segments[wells[0]]) if wells else None
            for i, well in enumerate(tqdm(wells, desc="well medians", unit="well", disable=None if progress else True)):
                m, arr = ahead.result()
                ahead = pool.submit(reader.read, wells[i + 1], segments[wells[i + 1]]) if i + 1 < len(wells) else None
                meta.append(m)
                values.append(_parallel_row_medians(arr, pool if threads > 1 else None, features_per_chunk))
                del arr
    finally:
        reader.close()
    return _medians_frame(meta, values, features)


# --------------------------------------------------------------------------- profile I/O


def format_csv(df: pd.DataFrame, float_format: str = "%.5g") -> str:
    """CSV text identical to ``df.to_csv(index=False, float_format=float_format)``, faster.

    Metadata columns go through pandas; the float feature block is formatted row by row with
    one ``%`` operation per row (NaN → empty field, as pandas writes it).
    """
    cols = list(df.columns)
    feats = [c for c in cols if is_feature(c) and df[c].dtype.kind == "f"]
    n_meta = len(cols) - len(feats)
    if not feats or cols[n_meta:] != feats:
        return df.to_csv(index=False, float_format=float_format, lineterminator="\n")
    meta = df.iloc[:, :n_meta]
    header = io.StringIO()
    csv.writer(header, lineterminator="\n").writerow(cols)
    if n_meta:
        meta_lines = meta.to_csv(index=False, header=False, float_format=float_format, lineterminator="\n").split("\n")[:-1]
    else:
        meta_lines = None
    values = df[feats].to_numpy(dtype=np.float64)
    fmt = ",".join([float_format] * len(feats))
    out = [header.getvalue()]
    for i, row in enumerate(values.tolist()):
        line = (fmt % tuple(row)).replace("nan", "")
        out.append((meta_lines[i] + "," + line) if meta_lines is not None else line)
        out.append("\n")
    return "".join(out)


def write_profile(
    df: pd.DataFrame,
    csv_url: str,
    settings: Any,
    float_format: str = "%.5g",
    validate=None,
    compresslevel: int = 1,
) -> pd.DataFrame:
    """Write ``df`` as gzip CSV (``float_format``) plus its Parquet twin, atomically.

    The returned frame, and the Parquet twin, hold exactly what ``pandas.read_csv`` gives for
    the CSV (values rounded by the float format, pandas' type inference), so that a step
    reading either file computes the same numbers. ``validate(frame)`` runs before anything is
    moved into place; when it raises, no file is written.
    """
    import gzip

    text = format_csv(df, float_format)
    back = pd.read_csv(io.StringIO(text))
    if validate is not None:
        validate(back)
    parquet_url = csv_url.removesuffix(".csv.gz") + ".parquet"
    with storage.atomic_path(parquet_url, settings) as tmp:
        back.to_parquet(tmp, index=False)
        with storage.atomic_write(csv_url, settings, "wb") as fh:
            fh.write(gzip.compress(text.encode("utf-8"), compresslevel=compresslevel, mtime=0))
    return back


def read_profile(csv_url: str, settings: Any) -> pd.DataFrame:
    """A profile as ``pandas.read_csv`` gives it (from the Parquet twin when present)."""
    parquet_url = csv_url.removesuffix(".csv.gz") + ".parquet"
    try:
        if storage.exists(parquet_url, settings):
            with storage.open_file(parquet_url, "rb", settings) as fh:
                df = pd.read_parquet(fh)
            # pandas reads an empty CSV field as NaN; Parquet gives None for a missing string
            for c in df.columns[df.dtypes == object]:
                df[c] = df[c].astype(object).where(df[c].notna(), np.nan)
            return df
        with storage.open_file(csv_url, "rb", settings, compression="gzip") as fh:
            return pd.read_csv(fh)
    except FileNotFoundError:
        raise InputDataError(f"profile {csv_url} not found") from None


# --------------------------------------------------------------------------- stage


def _fingerprint(shards: list[Shard], settings: Any) -> str:
    stamps = []
    for s in shards:
        marker = storage.read_marker(s.url, settings) or {}
        stamps.append((s.name, marker.get("fingerprint"), {t: storage.file_stamp(u, settings) for t, u in s.files.items()}))
    return storage.fingerprint(VERSION, stamps)


def _well_counts(images: pd.DataFrame) -> pd.DataFrame:
    counts = [c for c in IMAGE_COUNTS if c in images.columns]
    per_well = images.groupby("Metadata_Well")[counts].sum(min_count=1) if counts else pd.DataFrame()
    per_well.columns = [f"Metadata_{c}" for c in per_well.columns]
    return per_well


def run_aggregate(batch: str, plate: str, settings: Any, force: bool = False, threads: int | None = None) -> dict[str, str]:
    """Single cells and well medians of one plate (see the module docstring).

    Returns the output URLs. Skips the work when the profiles folder's marker for this stage
    matches the fingerprint of the complete shards (unless ``force``).
    """
    lay = storage.Layout(settings.storage_root)
    shards = list_shards(batch, plate, settings)
    fp = _fingerprint(shards, settings)
    single = lay.single_cell_file(batch, plate)
    profile = lay.profile_file(batch, plate)
    outputs = {"single_cells": single, "profile": profile, "profile_parquet": lay.profile_file(batch, plate, ext=".parquet")}
    marker_dir = storage.join(lay.backend_dir(batch, plate))
    if not force and storage.marker_matches(marker_dir, fp, settings) and all(storage.exists(u, settings) for u in outputs.values()):
        log.info("plate %s/%s: aggregate outputs are complete; skipped", batch, plate)
        return outputs
    t0 = time.time()
    with storage.atomic_path(single, settings, suffix=".parquet") as tmp:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        info = build_single_cells(batch, plate, settings, tmp, threads=threads)
        log.info("plate %s/%s: %d cells, %d features from %d shards", batch, plate, info["cells"], info["features"], len(info["shards"]))
        medians = info["medians"]  # taken while the single-cell file was written
        counts = _well_counts(info["images"])
        medians = medians.join(counts, on="Metadata_Well")
        if "Metadata_Count_Cells" not in medians:
            medians["Metadata_Count_Cells"] = medians["Metadata_Object_Count"]
        for c in WELL_METADATA:
            if c not in medians:
                medians[c] = np.nan
        features = [c for c in medians.columns if is_feature(c)]
        empty = [c for c in features if medians[c].isna().all()]
        if empty:
            files = sorted({s.files[c.split("_", 1)[0]] for s in shards for c in empty[:3]})
            raise InputDataError(
                f"plate {batch}/{plate}: feature(s) {', '.join(empty[:10])} have no value in any cell "
                f"(all NaN) in {', '.join(files[:3])}"
            )
        medians = medians[list(WELL_METADATA) + features]

        def validate(frame: pd.DataFrame) -> None:
            # the profiles suite (expectations/profiles.json) on the level-1 profile
            from cpjump1.profiles import validate_profiles

            validate_profiles({(plate, "aggregated"): frame}, batch, settings, expected_wells={plate: len(frame)}, stage="aggregate")

        write_profile(medians, profile, settings, validate=validate)
    storage.write_marker(marker_dir, fp, settings, stage="aggregate", cells=info["cells"], shards=info["shards"], seconds=round(time.time() - t0, 1))
    return outputs


def load_for_validation(batch: str, plate: str, settings: Any) -> list:
    """For ``cpjump1 validate --stage single_cell``: the analysis tables of every complete
    shard, checked with the ``single_cell`` suite of the analysis stage (its expectations name
    their table in ``meta.table``). Object tables are read with only the columns the suite
    names; the ``features`` table (NaN fraction per compartment × feature) is computed by DuckDB,
    so memory stays bounded by the suite's columns, not by the features."""
    from cpjump1.cellprofiler import FEATURE_FAMILIES, SUITE, _named_columns
    from cpjump1.validation import ValidationInput, load_suite

    spec = load_suite(SUITE, settings)
    by_table: dict[str, list[dict]] = {}
    for e in spec["expectations"]:
        by_table.setdefault((e.get("meta") or {}).get("table"), []).append(e)
    suite_dir = Path(tempfile.mkdtemp(prefix="cpjump1-single-cell-suites-"))

    def suite_file(table: str, shard: str) -> str:
        # one suite file per table and shard, so each report keeps its own name
        name = f"{SUITE}-{table}-{shard}"
        path = suite_dir / f"{name}.json"
        path.write_text(json.dumps({"name": name, "expectations": by_table[table], "meta": spec.get("meta", {})}))
        return str(path)
    copies = _LocalCopies(settings)
    con = _connect(1, "512MB")
    inputs = []
    try:
        for shard in list_shards(batch, plate, settings):
            sch = shard_schema(shard, plate, settings)
            for table in by_table:
                if table == "features":
                    rows = []
                    for comp in COMPARTMENTS:
                        feats = [c for c in sch.features[comp] if c.split("_", 1)[0] in FEATURE_FAMILIES]
                        if not feats:
                            continue
                        path = copies.path(shard.files[comp])
                        counts = ", ".join(f"count({_ident(c)})" for c in feats)
                        types = ", ".join(f"{_sql_str(c)}: 'DOUBLE'" for c in feats)
                        got = con.execute(
                            f"SELECT count(*), {counts} FROM read_csv({_sql_str(path)}, header=true, "
                            f"types={{{types}}}, nullstr=['', 'nan', 'NaN'])"
                        ).fetchone()
                        n = got[0]
                        if n:
                            rows += [{"compartment": comp, "feature": f, "nan_fraction": 1.0 - v / n} for f, v in zip(feats, got[1:], strict=True)]
                    frame = pd.DataFrame(rows, columns=["compartment", "feature", "nan_fraction"])
                    ids = ("compartment", "feature")
                elif table in TABLE_FILES:
                    named = _named_columns(by_table[table])
                    header = _read_header(shard.files[table], settings)
                    with storage.open_file(shard.files[table], "rb", settings) as fh:
                        frame = pd.read_csv(fh, usecols=[c for c in header if c in named])
                    ids = None
                else:
                    continue
                inputs.append(
                    ValidationInput(
                        df=frame, parameters={"shard": shard.name, "table": table, "file": shard.files.get(table, shard.url)},
                        suite=suite_file(table, shard.name), row_id_columns=ids,
                    )
                )
    finally:
        con.close()
        copies.close()
    return inputs


@click.command("aggregate")
@click.option("--batch", required=True, help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plate", required=True, help="Plate barcode.")
@click.option("--storage-root", default=None, help="Override CPJUMP1_STORAGE_ROOT.")
@click.option("--threads", type=int, default=None, help="DuckDB and median threads (default: all cores, medians at most 4).")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete.")
def command(batch: str, plate: str, storage_root: str | None, threads: int | None, force: bool) -> None:
    """Join a plate's CellProfiler shards into single cells and well medians (<plate>.csv.gz)."""
    from cpjump1.settings import get_settings

    settings = get_settings(storage_root=storage_root)
    out = run_aggregate(batch, plate, settings, force=force, threads=threads)
    for k, v in out.items():
        click.echo(f"{k}: {v}")


# --------------------------------------------------------------------------- synthetic input

CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
CATEGORIES = ("Intensity_MeanIntensity", "Texture_Contrast", "Granularity", "RadialDistribution_FracAtD", "Correlation_Pearson", "AreaShape_Zernike")


def synthetic_feature_names(n_features: int) -> dict[str, list[str]]:
    """Raw (unprefixed) CellProfiler-like feature names per compartment, ``n_features`` in all."""
    per = [n_features // 3 + (1 if i < n_features % 3 else 0) for i in range(3)]
    out = {}
    for comp, n in zip(COMPARTMENTS, per, strict=True):
        names = ["AreaShape_Area"] + [
            f"{CATEGORIES[j % len(CATEGORIES)]}_{j // len(CATEGORIES)}_{CHANNELS[j % len(CHANNELS)]}" for j in range(1, n)
        ]
        out[comp] = names[:n]
    return out


def _well_effects(wells: list[str], n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, size=n)
    scale = np.exp(rng.normal(0, 1, size=n))
    effects = rng.normal(0, 0.3, size=(len(wells), n))
    return base, scale, effects


def synthetic_cells(well_index: int, n_cells: int, effects, seed: int, dtype=np.float64) -> np.ndarray:
    """``n_cells`` × features values of one well: a well effect plus cell-to-cell noise."""
    base, scale, eff = effects
    rng = np.random.default_rng([seed, well_index])
    x = rng.standard_normal((n_cells, len(base)), dtype=np.float32 if dtype == np.float32 else np.float64)
    x += (base + eff[well_index]).astype(x.dtype)
    x *= scale.astype(x.dtype)
    return x.astype(dtype, copy=False)


def write_synthetic_shards(
    analysis_dir: str | Path,
    plate: str,
    wells: list[str],
    sites: int = 2,
    cells_per_site: int = 5,
    n_features: int = 30,
    shards: int = 2,
    seed: int = 0,
    global_image_numbers: bool = True,
    settings: Any = None,
) -> dict[str, list[str]]:
    """Write CellProfiler-shaped shard tables (Image, Nuclei, Cells, Cytoplasm CSV) with markers.

    Sites are split into ``shards`` contiguous ranges like CellProfiler ``-f/-l`` runs. Each
    cell has one nucleus and one cytoplasm (object numbers are shuffled between tables to test
    the joins). Returns the raw feature names per compartment.
    """
    names = synthetic_feature_names(n_features)
    per_comp = {c: len(v) for c, v in names.items()}
    total = sum(per_comp.values())
    effects = _well_effects(wells, total, seed)
    images = [(w, s) for w in wells for s in range(1, sites + 1)]
    bounds = np.linspace(0, len(images), shards + 1).astype(int)
    rng = np.random.default_rng(seed + 1)
    for k in range(shards):
        folder = Path(analysis_dir) / f"shard-{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        files = {t: open(folder / f"{t}.csv", "w", newline="") for t in TABLE_FILES}
        try:
            w_img = csv.writer(files[IMAGE_TABLE])
            w_img.writerow(["ImageNumber", "Metadata_Plate", "Metadata_Well", "Metadata_Site", *IMAGE_COUNTS])
            writers = {c: csv.writer(files[c]) for c in COMPARTMENTS}
            writers["Nuclei"].writerow([*OBJECT_KEYS, "Number_Object_Number", *names["Nuclei"]])
            writers["Cells"].writerow([*OBJECT_KEYS, "Parent_Nuclei", *names["Cells"]])
            writers["Cytoplasm"].writerow([*OBJECT_KEYS, "Parent_Cells", "Parent_Nuclei", *names["Cytoplasm"]])
            for i in range(bounds[k], bounds[k + 1]):
                well, site = images[i]
                image_number = i + 1 if global_image_numbers else i - bounds[k] + 1
                w_index = wells.index(well)
                x = synthetic_cells(w_index, cells_per_site, effects, seed + site)
                n = cells_per_site
                w_img.writerow([image_number, plate, well, site, n, n, n])
                nuc = rng.permutation(n) + 1
                cyt = rng.permutation(n) + 1
                a, b = per_comp["Cells"], per_comp["Cells"] + per_comp["Cytoplasm"]
                cells = np.arange(n)
                # cell j+1 has nucleus nuc[j] and cytoplasm cyt[j]; each table in its own object order
                rows = {
                    "Cells": (cells, cells + 1, lambda j: [int(nuc[j])], slice(0, a)),
                    "Nuclei": (np.argsort(nuc), nuc, lambda j: [int(nuc[j])], slice(b, None)),
                    "Cytoplasm": (np.argsort(cyt), cyt, lambda j: [j + 1, int(nuc[j])], slice(a, b)),
                }
                for comp, (order, number, parents, cols) in rows.items():
                    for j in order:
                        writers[comp].writerow([image_number, int(number[j]), plate, well, site, *parents(j), *map(repr, x[j, cols].tolist())])
        finally:
            for fh in files.values():
                fh.close()
        storage.write_marker(str(folder), storage.fingerprint("synthetic", plate, k, seed), settings, shard=k)
    return names


def write_synthetic_single_cells(
    path: str | Path,
    plate: str,
    wells: list[str],
    sites: int = 9,
    cells_per_site: int = 300,
    n_features: int = 3000,
    seed: int = 0,
    dtype=np.float64,
    row_group_bytes: int | None = None,
) -> dict[str, Any]:
    """Write a single-cell Parquet file in this stage's layout directly, one well at a time.

    Used by the benchmark to make a full-size plate (384 wells × 9 sites × 300 cells × 3000
    features) without holding it in memory.
    """
    names = synthetic_feature_names(n_features)
    cols = [f"{c}_{n}" for c in COMPARTMENTS for n in names[c]]
    effects = _well_effects(wells, len(cols), seed)
    pa_type = pa.float32() if dtype == np.float32 else pa.float64()
    schema = pa.schema(
        [
            ("Metadata_Plate", pa.string()),
            ("Metadata_Well", pa.string()),
            ("Metadata_Site", pa.int64()),
            ("Metadata_Shard", pa.string()),
            ("Metadata_ImageNumber", pa.int64()),
            ("Metadata_ObjectNumber", pa.int64()),
            *[pa.field(c, pa_type, nullable=False) for c in cols],
        ]
    )
    n = sites * cells_per_site
    from tqdm.auto import tqdm

    writer = SingleCellWriter(path, schema, **({"row_group_bytes": row_group_bytes} if row_group_bytes else {}))
    try:
        for w, well in enumerate(tqdm(wells, desc="synthetic cells", unit="well", disable=None)):
            x = np.asfortranarray(synthetic_cells(w, n, effects, seed, dtype=dtype))
            site = np.repeat(np.arange(1, sites + 1), cells_per_site)
            arrays = [
                pa.array([plate] * n),
                pa.array([well] * n),
                pa.array(site),
                pa.array(["shard-0000"] * n),
                pa.array(w * sites + site),
                pa.array(np.tile(np.arange(1, cells_per_site + 1), sites)),
                *[pa.array(x[:, j]) for j in range(x.shape[1])],
            ]
            writer.add(well, pa.Table.from_arrays(arrays, schema=schema))
            del x, arrays
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"cells": n * len(wells), "features": len(cols)}


def synthetic_well_profile(plate: str, wells: list[str] | None = None, n_features: int = 300, seed: int = 0) -> pd.DataFrame:
    """A well-level profile in this stage's output layout (``<plate>.csv.gz`` columns), synthetic.

    Features mix independent ones, near-copies of others (correlation > 0.9), nearly constant
    ones (frequency threshold), a few with missing values (NA filter) and names from
    pycytominer's blocklist, so every feature-selection operation has something to do.
    """
    from cpjump1.catalog import WELLS_384

    wells = list(wells or WELLS_384)
    rng = np.random.default_rng([seed, sum(map(ord, plate))])
    names = [f"{c}_{n}" for c, ns in synthetic_feature_names(n_features).items() for n in ns]
    block = ["Nuclei_Correlation_Manders_AGP_DNA", "Nuclei_Granularity_14_AGP", "Nuclei_Correlation_RWC_DNA_ER"]
    names = names[: n_features - len(block)] + block
    base = rng.normal(0, 1, size=len(names))
    scale = np.exp(rng.normal(0, 1, size=len(names)))
    x = base + rng.normal(0, 1, size=(len(wells), len(names)))
    k = len(names)
    for j in range(1, k // 10):  # near copies: feature 10j follows feature 10j-1
        x[:, 10 * j] = x[:, 10 * j - 1] + rng.normal(0, 0.1, size=len(wells))
    for j in range(5, k, 37):  # nearly constant features
        x[:, j] = 1.0
        x[rng.integers(0, len(wells), 3), j] = 2.0
    for j in range(7, k, 53):  # features missing in 10 % of wells
        x[rng.random(len(wells)) < 0.1, j] = np.nan
    x = x * scale
    counts = rng.integers(1500, 3500, size=len(wells))
    meta = pd.DataFrame(
        {
            "Metadata_Plate": plate,
            "Metadata_Well": wells,
            "Metadata_Count_Cells": counts,
            "Metadata_Count_Nuclei": counts,
            "Metadata_Count_Cytoplasm": counts,
            "Metadata_Site_Count": 9,
            "Metadata_Object_Count": counts,
        }
    )
    return pd.concat([meta, pd.DataFrame(x, columns=names)], axis=1)
