"""Stages 2 and 3, ``illum`` and ``analysis``: CellProfiler 4.2.8.1, run headless.

Method
------
CellProfiler (cellprofiler.org; Stirling et al. 2021, BMC Bioinformatics 22:433) runs in its
own Python 3.9 environment (``settings.cellprofiler_python``, built by ``make
cellprofiler-env``) as a subprocess::

    <python> -m cellprofiler -c -r -p <pipeline> --data-file <csv> -o <out>

with ``JAVA_TOOL_OPTIONS=-Xmx2g`` (CellProfiler 4.2.8 passes no heap size to the JVM).

* **illum** (``pipelines/illum.cppipe``): per channel, the plate's images are shrunk 4x,
  averaged over all sites of the plate (``CorrectIlluminationCalculate``, "All: Across
  cycles"), median-filtered (30 px on the shrunk image = 120 px at full size), rescaled so
  that the robust minimum is 1, enlarged back to the original size and saved as
  ``<Plate>_Illum<Ch>.npy`` (float32, full image size). This is the retrospective
  multi-image method of Singh et al. 2014 (J. Microscopy 256:231) as used for Cell Painting
  (Bray et al. 2016, Nature Protocols 11:1757).
* **analysis** (``pipelines/analysis.cppipe``), one *shard* of sites per run: every channel
  is divided by its illumination function; Nuclei are found on DNA (Otsu, 10–75 px), Cells
  by propagation from the nuclei on AGP (or RNA/ER/Mito when AGP is absent), Cytoplasm is
  Cells minus shrunken Nuclei; intensity, size/shape with Zernike moments, granularity,
  texture (Haralick, scales 3 and 5), radial intensity distribution, colocalization and
  neighbors are measured on every channel, fluorescent and bright-field, and exported with
  ``ExportToSpreadsheet`` (``Image.csv``, ``Nuclei.csv``, ``Cells.csv``, ``Cytoplasm.csv``).

The pipelines in ``pipelines/`` name the whole CPJUMP1 channel set (DNA, ER, RNA, AGP, Mito,
LowZBF, Brightfield, HighZBF). :func:`adapt_pipeline` rewrites them for the channels present
in the plate's ``load_data.csv`` (e.g. the six channels of a JUMP site): modules that name an
absent channel's image are dropped and absent images are removed from image lists.

Storage
-------
Inputs: ``Layout.load_data_dir(batch, plate)/load_data.csv``, ``load_data_with_illum.csv``
and ``shards.json`` (from ``cpjump1 load-data``; without a manifest the plate is shard 0).
CellProfiler reads only local files (it cannot read anonymous ``s3://``), so images on a
remote store are copied, for the shard being run only, to a scratch folder through fsspec
and the ``PathName_*`` columns are rewritten; local images are read in place.

Outputs go to a local scratch folder first and are copied into place when CellProfiler has
finished and the checks passed; the folder's completion marker (``_COMPLETE.json``) is written
last and fingerprints the image files (size + mtime/ETag), the illumination functions, the
shard's rows, the adapted pipeline text and the CellProfiler version. A rerun skips a folder
whose marker matches; a shard killed midway has no marker and is redone.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import storage
from cpjump1.errors import Cpjump1Error, InputDataError, MetadataError, UnknownNameError, ValidationFailed
from cpjump1.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: Channels the pipelines are written for (CPJUMP1: ch5, ch4, ch3, ch2, ch1, ch6, ch7, ch8).
CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito", "LowZBF", "Brightfield", "HighZBF")
#: Stains that outline the cell body, in order of preference, for IdentifySecondaryObjects.
CELL_STAINS = ("AGP", "RNA", "ER", "Mito")
#: Prefixes of the per-channel image names used inside the pipelines.
IMAGE_PREFIXES = ("Orig", "Illum", "Corr", "Downsampled", "IllumSmall")
COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
TABLES = ("Image", *COMPARTMENTS)
LOAD_DATA_CSV = "load_data.csv"
LOAD_DATA_WITH_ILLUM_CSV = "load_data_with_illum.csv"
SHARDS_JSON = "shards.json"
LOG_NAME = "cellprofiler.log"
JAVA_HEAP = "-Xmx2g"
SUITE = "single_cell"
#: Bumped when the stage's own handling changes in a way that changes the outputs.
STAGE_VERSION = 1


# --------------------------------------------------------------------------- pipelines


@dataclass
class PipelineModule:
    """One module block of a ``.cppipe`` file: its header line and ``(setting, value)`` lines."""

    header: str
    settings: list[tuple[str, str]]

    @property
    def name(self) -> str:
        return self.header.split(":[", 1)[0]

    def values(self, key: str) -> list[str]:
        return [v for k, v in self.settings if k == key]


def parse_pipeline(text: str) -> tuple[list[str], list[PipelineModule]]:
    """Split a CellProfiler 4 pipeline file (``Version:5``) into header lines and modules."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("CellProfiler Pipeline"):
        raise MetadataError("not a CellProfiler pipeline: the first line must be 'CellProfiler Pipeline: …'")
    header: list[str] = []
    modules: list[PipelineModule] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        if "[module_num:" in line and not line.startswith((" ", "\t")):
            modules.append(PipelineModule(line, []))
        elif modules:
            key, _, value = line.strip().partition(":")
            modules[-1].settings.append((key, value))
        else:
            header.append(line)
    return [lines[0], *header], modules


def render_pipeline(header: list[str], modules: list[PipelineModule]) -> str:
    """The ``.cppipe`` text, with module numbers and ``ModuleCount`` renumbered."""
    out = [re.sub(r"^ModuleCount:\d+$", f"ModuleCount:{len(modules)}", h) for h in header]
    out.append("")
    for k, m in enumerate(modules, 1):
        out.append(re.sub(r"module_num:\d+", f"module_num:{k}", m.header, count=1))
        out.extend(f"    {key}:{value}" for key, value in m.settings)
        out.append("")
    return "\n".join(out)


def channels_of(columns: Iterable[str]) -> list[str]:
    """Channels with a ``FileName_Orig<Ch>`` column, in the order of :data:`CHANNELS`
    (channels the pipelines do not know are left out with a warning)."""
    found = [c[len("FileName_Orig"):] for c in columns if c.startswith("FileName_Orig")]
    unknown = [c for c in found if c not in CHANNELS]
    if unknown:
        log.warning("load_data has channels the pipelines do not use: %s", ", ".join(unknown))
    return [c for c in CHANNELS if c in found]


def cell_stain(channels: Sequence[str]) -> str:
    """The stain Cells are propagated on: the first of :data:`CELL_STAINS` present."""
    for c in CELL_STAINS:
        if c in channels:
            return c
    raise InputDataError(
        f"no cytoplasm or membrane stain among the channels {', '.join(channels)}: "
        f"analysis needs one of {', '.join(CELL_STAINS)} to find cell bodies"
    )


def adapt_pipeline(text: str, channels: Sequence[str], source: str = "pipeline") -> str:
    """Rewrite a pipeline written for :data:`CHANNELS` for the ``channels`` of one run.

    * A module with a single-valued setting naming an image of an absent channel
      (``Orig<Ch>``, ``Illum<Ch>``, ``Corr<Ch>``, …) is dropped (per-channel modules).
    * Absent images are removed from image lists (``CorrDNA, CorrER, …``).
    * ``IdentifySecondaryObjects`` on ``CorrAGP`` uses the next cell stain when AGP is absent.

    Raises :class:`InputDataError` when DNA is absent or nothing is left of an image list.
    """
    channels = list(channels)
    if "DNA" not in channels:
        raise InputDataError(f"{source}: no DNA channel (FileName_OrigDNA) in load_data; nuclei cannot be found")
    absent = [c for c in CHANNELS if c not in channels]
    gone = {f"{p}{c}" for p in IMAGE_PREFIXES for c in absent}
    header, modules = parse_pipeline(text)
    stain = cell_stain(channels) if any(m.name == "IdentifySecondaryObjects" for m in modules) else None
    kept: list[PipelineModule] = []
    for m in modules:
        settings = list(m.settings)
        if m.name == "IdentifySecondaryObjects" and stain:
            settings = [
                (k, f"Corr{stain}" if k == "Select the input image" and v in gone else v) for k, v in settings
            ]
        if any(v in gone for _, v in settings):
            continue
        new = []
        for k, v in settings:
            if ", " in v and any(item in gone for item in v.split(", ")):
                items = [item for item in v.split(", ") if item not in gone]
                if not items:
                    raise InputDataError(f"{source}: module {m.name}: no image left in '{k}' for channels {channels}")
                v = ", ".join(items)
            new.append((k, v))
        kept.append(PipelineModule(m.header, new))
    return render_pipeline(header, kept)


def pipeline_text(name: str, channels: Sequence[str], settings: Settings) -> str:
    """``pipelines/<name>.cppipe`` adapted to ``channels``."""
    path = Path(settings.pipelines_dir) / f"{name}.cppipe"
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise MetadataError(f"CellProfiler pipeline {name}: no file {path}") from exc
    return adapt_pipeline(text, channels, source=str(path))


# --------------------------------------------------------------------------- load_data + shards


def read_load_data(url: str, settings: Settings, what: str) -> pd.DataFrame:
    if not storage.exists(url, settings):
        raise InputDataError(f"{what}: no {storage.basename(url)} at {url}; run `cpjump1 load-data` first")
    with storage.open_file(url, "rb", settings) as fh:
        table = pd.read_csv(fh, dtype=str, keep_default_na=False)
    missing = [c for c in ("Metadata_Plate", "Metadata_Well", "Metadata_Site") if c not in table.columns]
    if missing:
        raise InputDataError(f"{url}: missing column(s) {', '.join(missing)}")
    if table.empty:
        raise InputDataError(f"{url}: no rows")
    return table


def read_shards(batch: str, plate: str, settings: Settings, n_rows: int) -> list[dict[str, Any]]:
    """The shard manifest of a plate; one shard holding every row when there is none."""
    url = storage.join(storage.Layout(settings.storage_root).load_data_dir(batch, plate), SHARDS_JSON)
    if not storage.exists(url, settings):
        return [{"index": 0, "rows": list(range(n_rows)), "sites": None}]
    try:
        manifest = json.loads(storage.read_text(url, settings))
        shards = manifest["shards"]
        for s in shards:
            s["index"] = int(s["index"])
            s["rows"] = [int(r) for r in s["rows"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MetadataError(f"{url}: not a shard manifest ({exc})") from exc
    bad = [r for s in shards for r in s["rows"] if not 0 <= r < n_rows]
    if bad:
        raise MetadataError(f"{url}: row indices {bad[:5]} outside load_data_with_illum.csv ({n_rows} rows)")
    return shards


def shard_rows(batch: str, plate: str, shard: int, settings: Settings, n_rows: int) -> list[int]:
    shards = read_shards(batch, plate, settings, n_rows)
    by_index = {s["index"]: s for s in shards}
    if shard not in by_index:
        raise UnknownNameError(
            f"plate {plate} of batch {batch}: no shard {shard}; shards are {', '.join(map(str, sorted(by_index)))}"
        )
    return by_index[shard]["rows"]


def _file_url(path: str, name: str) -> str:
    return storage.join(path, name) if path else name


def image_urls(table: pd.DataFrame, kinds: Sequence[str]) -> dict[str, list[str]]:
    """``{"Orig<Ch>": [url per row], …}`` for the image columns of ``kinds`` (e.g. ``Orig``)."""
    out = {}
    for col in table.columns:
        for kind in kinds:
            if col.startswith(f"FileName_{kind}"):
                name = col[len("FileName_"):]
                paths = table.get(f"PathName_{name}", pd.Series([""] * len(table), index=table.index))
                out[name] = [_file_url(p, f) for p, f in zip(paths, table[col])]
    return out


# --------------------------------------------------------------------------- fingerprints + staging


def _stamp(url: str, settings: Settings) -> Any:
    if not storage.is_remote(url):
        try:
            st = os.stat(url.removeprefix("file://"))
        except FileNotFoundError:
            return None
        return [st.st_size, st.st_mtime_ns]
    try:
        s = storage.file_stamp(url, settings)
    except FileNotFoundError:
        return None
    return [s.get("size"), str(s.get("stamp"))]


def stamps(urls: Sequence[str], settings: Settings) -> dict[str, Any]:
    """Cheap identities (size + mtime or ETag) of files; ``None`` for a missing file."""
    urls = list(dict.fromkeys(urls))
    if any(storage.is_remote(u) for u in urls):
        with ThreadPoolExecutor(16) as pool:
            return dict(zip(urls, pool.map(lambda u: _stamp(u, settings), urls)))
    return {u: _stamp(u, settings) for u in urls}


def stage_inputs(table: pd.DataFrame, kinds: Sequence[str], scratch: Path, settings: Settings) -> pd.DataFrame:
    """Copy remote files named by ``FileName_<kind>*``/``PathName_<kind>*`` into ``scratch``
    (through fsspec, in parallel) and point ``PathName_*`` at the copies; local files stay."""
    table = table.copy()
    jobs: dict[str, Path] = {}
    for name, urls in image_urls(table, kinds).items():
        if not any(storage.is_remote(u) for u in urls):
            continue
        new_paths = []
        for url in urls:
            if not storage.is_remote(url):
                new_paths.append(str(Path(url).parent))
                continue
            folder = scratch / storage.fingerprint(storage.parent(url))[:12]
            jobs[url] = folder / storage.basename(url)
            new_paths.append(str(folder))
        table[f"PathName_{name}"] = new_paths
    if jobs:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda kv: storage.get_file(kv[0], kv[1], settings), jobs.items()))
        log.info("staged %d remote files to %s in %.1f s", len(jobs), scratch, time.perf_counter() - t0)
    return table


# --------------------------------------------------------------------------- running CellProfiler


@functools.lru_cache(maxsize=8)
def cellprofiler_version(python: str) -> str:
    """The installed CellProfiler version (read from the environment's package metadata; falls
    back to ``python -m cellprofiler --version``)."""
    venv = Path(python).parent.parent
    for info in sorted(venv.glob("lib/python3*/site-packages/cellprofiler-*.dist-info")):
        m = re.match(r"cellprofiler-([0-9][^-]*)\.dist-info", info.name)
        if m:
            return m.group(1)
    out = subprocess.run([python, "-m", "cellprofiler", "--version"], capture_output=True, text=True, timeout=120)
    return (out.stdout.strip().splitlines() or ["unknown"])[-1]


def check_environment(settings: Settings) -> str:
    python = settings.cellprofiler_python
    if not Path(python).exists() and shutil.which(python) is None:
        raise Cpjump1Error(
            f"CellProfiler environment not found: {python} does not exist; run `make cellprofiler-env` "
            "or set CPJUMP1_CELLPROFILER_PYTHON"
        )
    return cellprofiler_version(python)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: CellProfiler is killed when the stage process dies (a killed pod/task)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_IMAGE_LINE = re.compile(r"Image # (\d+), module (\S+) # (\d+)")


@dataclass
class CellProfilerRun:
    returncode: int
    seconds: float
    log_path: Path
    last_image: int | None


def run_cellprofiler(
    settings: Settings, pipeline: Path, data_file: Path, out_dir: Path, log_path: Path, n_sets: int, what: str,
    progress: bool = True,
) -> CellProfilerRun:
    """Run CellProfiler headless and stream its log (to ``log_path``, to DEBUG, and a
    progress bar over image sets)."""
    from tqdm import tqdm

    cmd = [
        settings.cellprofiler_python, "-m", "cellprofiler", "-c", "-r",
        "-p", str(pipeline), "--data-file", str(data_file), "-o", str(out_dir),
        "-t", str(out_dir.parent / "cptemp"),
    ]
    (out_dir.parent / "cptemp").mkdir(exist_ok=True)
    env = dict(os.environ, JAVA_TOOL_OPTIONS=JAVA_HEAP, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    env.pop("PYTHONPATH", None)
    log.info("%s: %s", what, " ".join(cmd))
    t0 = time.perf_counter()
    last = None
    bar = tqdm(total=n_sets, desc=what, unit="site", disable=not progress, leave=False)
    with open(log_path, "w") as logfh:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=str(out_dir.parent), preexec_fn=_die_with_parent,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logfh.write(line)
                logfh.flush()
                m = _IMAGE_LINE.search(line)
                if m:
                    n = int(m.group(1))
                    if last is None or n > last:
                        bar.update(n - (last or 0))
                        last = n
                    log.debug("%s", line.rstrip())
                elif re.search(r"Error|Exception|Traceback|error:", line):
                    log.warning("cellprofiler: %s", line.rstrip())
                else:
                    log.debug("cellprofiler: %s", line.rstrip())
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    log.info("%s: CellProfiler exited %d after %.1f s", what, proc.returncode, seconds)
    return CellProfilerRun(proc.returncode, seconds, log_path, last)


def unreadable_file(path: str) -> str | None:
    """Why a local image/illum file cannot be read, or ``None`` when it reads (or cannot be
    judged here: a TIFF whose compression needs a codec this environment lacks, e.g. LZW
    without ``imagecodecs``, counts as readable — Bio-Formats reads it)."""
    try:
        if path.endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
            return "no pixels" if arr.size == 0 else None
        with open(path, "rb") as fh:
            with contextlib.suppress(ImportError):
                from cpjump1.load_data import tiff_problem

                problem = tiff_problem(fh, os.path.getsize(path))
                if problem:
                    return problem
        import tifffile

        tifffile.imread(path)
    except FileNotFoundError:
        return "file not found"
    except Exception as exc:  # any decoder error
        if "imagecodecs" in str(exc):
            return None
        return f"{type(exc).__name__}: {exc}"
    return None


def diagnose_failure(table: pd.DataFrame, kinds: Sequence[str], last_image: int | None) -> tuple[str, str] | None:
    """After a failed run: the first unreadable file (``(path, reason)``), looking at the image
    set CellProfiler was working on first, then at every row."""
    order = list(range(len(table)))
    if last_image is not None and 1 <= last_image <= len(table):
        order.remove(last_image - 1)
        order.insert(0, last_image - 1)
    urls = image_urls(table, kinds)
    for i in order:
        for name, col in urls.items():
            path = col[i]
            why = unreadable_file(path)
            if why:
                return path, why
    return None


def _log_tail(path: Path, n: int = 15) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        return "\n".join(lines[-n:])
    return ""


# --------------------------------------------------------------------------- publishing


#: Prefix of the per-file MD5 checksums LoadData adds to the Image table.
DIGEST_PREFIX = "MD5Digest_"


def drop_digest_columns(path: Path) -> list[str]:
    """Remove LoadData's ``MD5Digest_*`` columns from an ``Image.csv`` in place; returns them.

    Why: a hex digest such as ``840970e7163834292b0add5e1eb66f7a`` starts like a float with a
    ten-digit exponent, and pandas 2.3's C parser (``read_csv`` with default type inference)
    crashes the process with a segmentation fault on it — seen on a 16-site synthetic plate,
    where 16 digests per site make one such value likely. The digests are checksums of the
    input files, not features; the shard's marker fingerprints the inputs instead. The file is
    rewritten with :mod:`csv`, keeping ExportToSpreadsheet's dialect (comma, CRLF)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return []
    keep = [i for i, c in enumerate(rows[0]) if not c.startswith(DIGEST_PREFIX)]
    dropped = [c for c in rows[0] if c.startswith(DIGEST_PREFIX)]
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            csv.writer(fh).writerows([r[i] for i in keep if i < len(r)] for r in rows)
        os.replace(tmp, path)
    return dropped


def publish(files: dict[str, Path], folder: str, fp: str, settings: Settings, **marker: Any) -> dict[str, str]:
    """Copy finished files into ``folder`` (each atomically) and write the marker last.

    The old marker goes first, so a folder being replaced is never marked complete halfway."""
    storage.remove(storage.join(folder, storage.MARKER_NAME), settings)
    storage.makedirs(folder, settings)
    out = {}
    for name, path in files.items():
        url = storage.join(folder, name)
        storage.put_file(path, url, settings)
        out[name] = url
    storage.write_marker(folder, fp, settings, **marker)
    return out


# --------------------------------------------------------------------------- illum


def _check_plate(table: pd.DataFrame, plate: str, url: str) -> None:
    plates = sorted(set(table["Metadata_Plate"]))
    if plates != [plate]:
        raise InputDataError(f"{url}: Metadata_Plate is {', '.join(plates)}, expected only {plate}")


def _open_plate(
    batch: str, plate: str, csv_name: str, settings: Settings | None
) -> tuple[Settings, storage.Layout, str, pd.DataFrame]:
    """What both stages start from: the settings (defaults when ``None``), the storage layout,
    and the plate's load_data CSV ``csv_name`` read and checked (metadata columns present,
    rows present, one plate only). Returns ``(settings, layout, csv_url, table)``."""
    settings = settings or get_settings()
    layout = storage.Layout(settings.storage_root)
    csv_url = storage.join(layout.load_data_dir(batch, plate), csv_name)
    table = read_load_data(csv_url, settings, f"plate {plate} of batch {batch}")
    _check_plate(table, plate, csv_url)
    return settings, layout, csv_url, table


@dataclass
class StageResult:
    """What a run did; ``seconds`` are wall times of the parts (for the overhead benchmark)."""

    folder: str
    files: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    n_sites: int = 0
    channels: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def overhead_seconds(self) -> float:
        return sum(v for k, v in self.seconds.items() if k not in ("cellprofiler", "total", "validation"))


def run_illum(
    batch: str, plate: str, settings: Settings | None = None, force: bool = False, progress: bool = True
) -> StageResult:
    """Illumination functions ``<plate>_Illum<Ch>.npy`` for every channel of ``load_data.csv``
    into ``Layout.illum_dir(batch, plate)``; skipped when the folder's marker matches."""
    t_start = time.perf_counter()
    settings, layout, csv_url, table = _open_plate(batch, plate, LOAD_DATA_CSV, settings)
    timing: dict[str, float] = {}
    what = f"illum {batch}/{plate}"
    channels = channels_of(table.columns)
    text = pipeline_text("illum", channels, settings)
    version = check_environment(settings)
    inputs = [u for urls in image_urls(table, ["Orig"]).values() for u in urls]
    fp = storage.fingerprint("illum", STAGE_VERSION, version, text, sorted(stamps(inputs, settings).items()))
    out_dir = layout.illum_dir(batch, plate)
    expected = {f"{plate}_Illum{c}.npy" for c in channels}
    timing["prepare"] = time.perf_counter() - t_start
    if not force and storage.marker_matches(out_dir, fp, settings) and all(
        storage.exists(storage.join(out_dir, n), settings) for n in expected
    ):
        log.info("%s: illumination functions are complete; skipped", what)
        return StageResult(out_dir, {n: storage.join(out_dir, n) for n in sorted(expected)}, True, len(table), channels)
    with tempfile.TemporaryDirectory(prefix="cpjump1-illum-") as tmp:
        scratch = Path(tmp)
        t0 = time.perf_counter()
        local = stage_inputs(table, ["Orig"], scratch / "images", settings)
        data_file, pipe = scratch / LOAD_DATA_CSV, scratch / "illum.cppipe"
        local.to_csv(data_file, index=False)
        pipe.write_text(text)
        out = scratch / "out"
        timing["stage"] = time.perf_counter() - t0
        run = run_cellprofiler(settings, pipe, data_file, out, scratch / LOG_NAME, len(table), what, progress)
        timing["cellprofiler"] = run.seconds
        if run.returncode != 0:
            log_url = storage.join(out_dir, LOG_NAME)
            storage.remove(storage.join(out_dir, storage.MARKER_NAME), settings)
            storage.put_file(run.log_path, log_url, settings)
            _raise_failure(run, local, ["Orig"], what, log_url, settings)
        t0 = time.perf_counter()
        files: dict[str, Path] = {}
        for name in sorted(expected):
            path = out / name
            if not path.exists():
                raise Cpjump1Error(f"{what}: CellProfiler wrote no {name}; log:\n{_log_tail(run.log_path)}")
            arr = np.load(path)
            if arr.ndim != 2 or not np.isfinite(arr).all() or arr.min() <= 0:
                raise Cpjump1Error(f"{what}: {name} is not a positive finite 2-D function (shape {arr.shape})")
            files[name] = path
        files[LOG_NAME] = run.log_path
        files["illum.cppipe"] = pipe
        published = publish(
            files, out_dir, fp, settings, stage="illum", batch=batch, plate=plate, channels=channels,
            sites=len(table), cellprofiler_version=version, cellprofiler_seconds=round(run.seconds, 2),
        )
        timing["publish"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    log.info("%s: %d illumination functions in %s (%.1f s)", what, len(expected), out_dir, timing["total"])
    return StageResult(out_dir, published, False, len(table), channels, seconds=timing)


def _raise_failure(
    run: CellProfilerRun, table: pd.DataFrame, kinds: Sequence[str], what: str, log_url: str | None,
    settings: Settings,
) -> None:
    where = f"; log: {log_url}" if log_url else ""
    bad = diagnose_failure(table, kinds, run.last_image)
    if bad:
        raise InputDataError(f"{what}: cannot read image {bad[0]} ({bad[1]}); CellProfiler exited {run.returncode}{where}")
    raise Cpjump1Error(
        f"{what}: CellProfiler exited {run.returncode} (last image set {run.last_image}){where}; "
        f"end of its log:\n{_log_tail(run.log_path)}"
    )


# --------------------------------------------------------------------------- analysis


def run_analysis(
    batch: str, plate: str, shard: int = 0, settings: Settings | None = None, force: bool = False,
    progress: bool = True, validate: bool = True,
) -> StageResult:
    """CellProfiler features for one shard of a plate into ``Layout.analysis_shard_dir``.

    Checks the illumination functions exist before CellProfiler starts; a failure of
    CellProfiler names the unreadable file when there is one; the ``single_cell`` suite runs
    on the tables before they are published; skipped when the shard's marker matches."""
    t_start = time.perf_counter()
    settings, layout, csv_url, full = _open_plate(batch, plate, LOAD_DATA_WITH_ILLUM_CSV, settings)
    timing: dict[str, float] = {}
    what = f"analysis {batch}/{plate} shard {shard}"
    rows = shard_rows(batch, plate, shard, settings, len(full))
    table = full.iloc[rows].reset_index(drop=True)
    channels = channels_of(table.columns)
    missing_cols = [f"FileName_Illum{c}" for c in channels if f"FileName_Illum{c}" not in table.columns]
    if missing_cols:
        raise InputDataError(f"{csv_url}: no illumination column(s) {', '.join(missing_cols)}")
    illum = sorted({u for c in channels for u in image_urls(table, [f"Illum{c}"]).get(f"Illum{c}", [])})
    absent = [u for u in illum if not storage.exists(u, settings)]
    if absent:
        raise InputDataError(
            f"{what}: missing illumination function(s) {', '.join(absent)}; run `cpjump1 illum --batch {batch} "
            f"--plate {plate}` first"
        )
    text = pipeline_text("analysis", channels, settings)
    version = check_environment(settings)
    images = [u for urls in image_urls(table, ["Orig"]).values() for u in urls]
    fp = storage.fingerprint(
        "analysis", STAGE_VERSION, version, text, rows, table.to_csv(index=False),
        sorted(stamps(images + illum, settings).items()), json.dumps(_suite_bounds(settings), sort_keys=True),
    )
    out_dir = layout.analysis_shard_dir(batch, plate, shard)
    timing["prepare"] = time.perf_counter() - t_start
    if not force and storage.marker_matches(out_dir, fp, settings):
        log.info("%s: outputs are complete; skipped", what)
        return StageResult(out_dir, {t: storage.join(out_dir, f"{t}.csv") for t in TABLES}, True, len(table), channels)
    log_url = storage.join(out_dir, LOG_NAME)
    with tempfile.TemporaryDirectory(prefix="cpjump1-analysis-") as tmp:
        scratch = Path(tmp)
        t0 = time.perf_counter()
        local = stage_inputs(table, ["Orig", "Illum"], scratch / "images", settings)
        data_file, pipe = scratch / "load_data_shard.csv", scratch / "analysis.cppipe"
        local.to_csv(data_file, index=False)
        pipe.write_text(text)
        out = scratch / "out"
        timing["stage"] = time.perf_counter() - t0
        run = run_cellprofiler(settings, pipe, data_file, out, scratch / LOG_NAME, len(table), what, progress)
        timing["cellprofiler"] = run.seconds
        if run.returncode != 0:
            # keep the failed run's log (no marker: the shard stays incomplete)
            storage.remove(storage.join(out_dir, storage.MARKER_NAME), settings)
            storage.put_file(run.log_path, log_url, settings)
            _raise_failure(run, local, ["Orig", "Illum"], what, log_url, settings)
        t0 = time.perf_counter()
        files = {f"{t}.csv": out / f"{t}.csv" for t in TABLES}
        lacking = [n for n, p in files.items() if not p.exists()]
        if lacking:
            raise Cpjump1Error(f"{what}: CellProfiler wrote no {', '.join(lacking)}; log:\n{_log_tail(run.log_path)}")
        drop_digest_columns(out / "Image.csv")
        tables = {t: pd.read_csv(out / f"{t}.csv") for t in TABLES}
        counts = {t: int(len(tables[t])) for t in COMPARTMENTS}
        timing["read"] = time.perf_counter() - t0
        if validate:
            t0 = time.perf_counter()
            try:
                validate_single_cells(tables, batch, plate, shard, settings)
            except ValidationFailed:
                storage.remove(storage.join(out_dir, storage.MARKER_NAME), settings)
                storage.put_file(run.log_path, log_url, settings)
                raise
            finally:
                timing["validation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        files[LOG_NAME] = run.log_path
        files["analysis.cppipe"] = pipe
        published = publish(
            files, out_dir, fp, settings, stage="analysis", batch=batch, plate=plate, shard=shard,
            sites=len(table), channels=channels, objects=counts, cellprofiler_version=version,
            cellprofiler_seconds=round(run.seconds, 2),
        )
        timing["publish"] = time.perf_counter() - t0
    timing["total"] = time.perf_counter() - t_start
    log.info(
        "%s: %d sites, %s in %.1f s (CellProfiler %.1f s)", what, len(table),
        ", ".join(f"{n} {t}" for t, n in counts.items()), timing["total"], timing["cellprofiler"],
    )
    return StageResult(out_dir, published, False, len(table), channels, counts, timing)


# --------------------------------------------------------------------------- single-cell suite


FEATURE_FAMILIES = (
    "AreaShape", "Intensity", "Granularity", "Texture", "RadialDistribution", "Correlation", "Neighbors", "Location",
)


def _suite_bounds(settings: Settings) -> dict[str, Any]:
    path = Path(settings.expectations_dir) / f"{SUITE}.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return {}


def feature_nan_table(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (compartment, feature): the fraction of objects whose value is NaN."""
    rows = []
    for comp in COMPARTMENTS:
        df = tables[comp]
        feats = [c for c in df.columns if c.split("_", 1)[0] in FEATURE_FAMILIES]
        if not len(df):
            continue
        frac = df[feats].isna().mean()
        rows += [{"compartment": comp, "feature": f, "nan_fraction": float(v)} for f, v in frac.items()]
    return pd.DataFrame(rows, columns=["compartment", "feature", "nan_fraction"])


def validation_tables(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables the ``single_cell`` suite's expectations name in ``meta.table``."""
    out = {t: tables[t] for t in TABLES}
    out["features"] = feature_nan_table(tables)
    return out


def _named_columns(expectations: list[dict]) -> set[str]:
    names: set[str] = set()
    for e in expectations:
        kw = e.get("kwargs", {})
        for key in ("column", "column_A", "column_B"):
            if isinstance(kw.get(key), str):
                names.add(kw[key])
        for key in ("column_list", "column_set"):
            names.update(kw.get(key) or [])
    return names


def validate_single_cells(
    tables: dict[str, pd.DataFrame], batch: str, plate: str, shard: int, settings: Settings
) -> list[Any]:
    """Run ``expectations/single_cell.json`` on a shard's tables with :func:`cpjump1.validation.run_suite`.

    Each expectation's ``meta.table`` names the table it applies to (``Image``, ``Nuclei``,
    ``Cells``, ``Cytoplasm``, or ``features`` = the per-feature NaN fractions); the suite is run
    once per table, and reports land in ``Layout.qc_dir("analysis", batch, plate)`` as
    ``single_cell-<table>-shard-NNNN.json``/``.html``. Raises
    :class:`~cpjump1.errors.ValidationFailed` naming every failed expectation.
    """
    from cpjump1.validation import load_suite, run_suite

    spec = load_suite(SUITE, settings)
    data = validation_tables(tables)
    by_table: dict[str, list[dict]] = {}
    for e in spec["expectations"]:
        t = (e.get("meta") or {}).get("table")
        if t not in data:
            raise MetadataError(f"suite {SUITE}: expectation {e['type']} has meta.table {t!r}; one of {', '.join(data)}")
        by_table.setdefault(t, []).append(e)
    reports, failed = [], []
    with tempfile.TemporaryDirectory(prefix="cpjump1-suite-") as tmp:
        for t, exps in by_table.items():
            # Great Expectations' pandas engine copies the frame per metric: pass only the
            # columns the expectations name (a missing one stays missing and fails).
            named = _named_columns(exps)
            frame = data[t][[c for c in data[t].columns if c in named]] if t != "features" else data[t]
            name = f"{SUITE}-{t}-shard-{shard:04d}"
            path = Path(tmp) / f"{name}.json"
            path.write_text(json.dumps({"name": name, "expectations": exps, "meta": spec.get("meta", {})}))
            rep = run_suite(
                frame, str(path), batch=batch, plate=plate, stage="analysis", settings=settings,
                extra_context={"shard": shard, "table": t}, raise_on_failure=False,
                row_id_columns=("compartment", "feature") if t == "features" else None,
            )
            reports.append(rep)
            if not rep.success:
                failed.append(rep)
    if failed:
        raise ValidationFailed(
            f"analysis {batch}/{plate} shard {shard}: single-cell checks failed\n"
            + "\n".join(r.summary() for r in failed)
        )
    return reports


# --------------------------------------------------------------------------- CLI


def _settings(storage_root: str | None) -> Settings:
    return get_settings(storage_root=storage_root)


@click.command("illum")
@click.option("--batch", required=True, help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plate", required=True, help="Plate barcode, e.g. BR00117010.")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete.")
@click.option("--storage-root", default=None, help="Output root (default: settings).")
def illum_command(batch: str, plate: str, force: bool, storage_root: str | None) -> None:
    """Illumination functions of a plate (CellProfiler, pipelines/illum.cppipe)."""
    result = run_illum(batch, plate, _settings(storage_root), force=force, progress=False)
    click.echo(f"{'skipped (complete)' if result.skipped else 'wrote'} {len(result.channels)} functions in {result.folder}")


@click.command("analysis")
@click.option("--batch", required=True, help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plate", required=True, help="Plate barcode, e.g. BR00117010.")
@click.option("--shard", default=0, show_default=True, type=int, help="Shard index from shards.json.")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete.")
@click.option("--storage-root", default=None, help="Output root (default: settings).")
def analysis_command(batch: str, plate: str, shard: int, force: bool, storage_root: str | None) -> None:
    """CellProfiler features of one shard of a plate (pipelines/analysis.cppipe)."""
    result = run_analysis(batch, plate, shard, _settings(storage_root), force=force, progress=False)
    objects = ", ".join(f"{n} {t}" for t, n in result.counts.items())
    click.echo(
        f"{'skipped (complete)' if result.skipped else 'wrote'} shard {shard}: {result.n_sites} sites"
        f"{', ' + objects if objects else ''} in {result.folder}"
    )
