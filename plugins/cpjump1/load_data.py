"""Stage 1, ``load_data``: a plate's images → CellProfiler ``load_data.csv`` and
``load_data_with_illum.csv`` (plus a shard manifest), checked by a Great Expectations suite.

Method
------
CellProfiler's *LoadData* module reads one row per site with one ``FileName_<Ch>`` /
``PathName_<Ch>`` pair per channel plus ``Metadata_*`` columns. The Broad Institute's
``pe2loaddata`` tool (github.com/broadinstitute/pe2loaddata, BSD-3) defines the column layout
the JUMP / CPJUMP1 data sets use; this module writes the same layout:

* channel columns ``FileName_<Orig…>``, ``PathName_<Orig…>`` ordered by the Harmony channel
  name with spaces removed (pe2loaddata sorts its config keys that way);
* then ``Metadata_Plate``, ``Metadata_Well`` (``A01``), ``Metadata_Site`` (= Harmony FieldID);
* then every requested metadata key in sorted order; a key whose value is the same in all
  channels of a site is one column ``Metadata_<key>``, otherwise one column per channel
  ``Metadata_<key>_<Orig…>`` in the order of the channel configuration.
  (pe2loaddata decides this from one sample well; here it is decided over the whole plate,
  which gives the same columns whenever the sample well is representative.)
* rows ordered by plate, by the plate's well order in the index, then by
  field / plane / timepoint.

pe2loaddata's own code (a SAX parser holding every XML element as a Python object) is too
slow for a 27648-image plate and silently drops sites that miss a channel; this module parses
the index with ``xml.etree.ElementTree.iterparse`` and builds the table with pandas, keeps
incomplete sites (so the suite reports them), and is checked against pe2loaddata's output in
``tests/test_load_data.py`` (exact reproduction of pe2loaddata's test CSV) and compared with
it in ``benchmarks/bench_load_data.py``. pe2loaddata's YAML configuration format (``channels``:
Harmony name → Orig name, ``metadata``: keys) is accepted through :func:`channel_config`.

Sources of images
-----------------
The plate folder is ``storage.plate_images_dir(images_root, batch, plate)``; images are in its
``Images/`` folder (Harmony export layout). The index ``Index.idx.xml`` is looked for in
``Images/`` and then in the plate folder. Without an index the table is built from the folder
listing, parsing Harmony file names ``rRRcCCfFFpPP-chNskTfkKflL.tiff``; then channel names come
from the channel ID (CPJUMP1 mapping below) and the stage positions are unknown (empty
``Metadata_PositionX/Y/Z``).

CPJUMP1 channels (Chandrasekaran et al. 2024, and the JUMP Cell Painting protocol):
ch1 Alexa 647 → Mito, ch2 Alexa 568 → AGP, ch3 Alexa 488 long → RNA, ch4 Alexa 488 → ER,
ch5 HOECHST 33342 → DNA, ch6–8 bright-field planes → LowZBF, Brightfield, HighZBF.

Outputs (``Layout.load_data_dir(batch, plate)``)
-----------------------------------------------
``load_data.csv``, ``load_data_with_illum.csv`` (adds ``FileName_Illum<Ch>`` =
``<plate>_Illum<Ch>.npy`` and ``PathName_Illum<Ch>`` = ``Layout.illum_dir(batch, plate)``),
``shards.json`` (``{"n_shards": K, "shards": [{"index", "rows", "sites"}]}``: contiguous
blocks of whole sites, rows index ``load_data_with_illum.csv``) and a completion marker whose
fingerprint covers the listing, the index and the options; a rerun with the same inputs is
skipped. The suite ``expectations/load_data.json`` runs before anything is written; a failed
suite raises :class:`~cpjump1.errors.ValidationFailed` and leaves no CSV behind.

Validation hook: :func:`load_for_validation` (the convention of :mod:`cpjump1.validation`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import struct
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import storage
from cpjump1.errors import Cpjump1Error, InputDataError, MetadataError, StorageError
from cpjump1.settings import Settings, get_settings

log = logging.getLogger(__name__)

STAGE = "load_data"
LOAD_DATA_CSV = "load_data.csv"
LOAD_DATA_WITH_ILLUM_CSV = "load_data_with_illum.csv"
SHARDS_JSON = "shards.json"
ILLUM_SUFFIX = ".npy"
#: Version of the table-building rules; part of the rerun fingerprint.
FORMAT_VERSION = 1
#: How many images' TIFF headers are read on remote storage (all are read on local disk).
REMOTE_HEADER_SAMPLE = 16
#: Harmony export file names: r<row>c<col>f<field>p<plane>-ch<channel>sk<time>fk<k>fl<flim>.tiff
HARMONY_NAME = re.compile(
    r"^r(?P<Row>\d{2})c(?P<Col>\d{2})f(?P<FieldID>\d{2,3})p(?P<PlaneID>\d{2})"
    r"-ch(?P<ChannelID>\d{1,2})sk(?P<sk>\d+)fk(?P<fk>\d+)fl(?P<FlimID>\d+)\.tiff?$",
    re.IGNORECASE,
)
INDEX_NAMES = ("Index.idx.xml", "Index.xml")


@contextlib.contextmanager
def _no_gc():
    """Pause Python's cyclic garbage collector: building a million XML elements and
    DataFrame cells creates no cycles, and the collector's full passes over them would
    otherwise double the time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass(frozen=True)
class Channel:
    """One imaging channel: Harmony ``ChannelName`` → LoadData name (``OrigDNA`` …)."""

    harmony_name: str
    name: str
    channel_id: int | None = None

    @property
    def key(self) -> str:
        """pe2loaddata's key for the channel: the Harmony name without spaces."""
        return self.harmony_name.replace(" ", "")

    @property
    def illum_name(self) -> str:
        """``IllumDNA`` for ``OrigDNA``."""
        return "Illum" + self.name.removeprefix("Orig")


@dataclass(frozen=True)
class ChannelConfig:
    """Channels (in configuration order) and the metadata keys that go into the CSV."""

    channels: tuple[Channel, ...]
    metadata: tuple[str, ...]

    def by_key(self) -> dict[str, Channel]:
        return {c.key: c for c in self.channels}

    def by_id(self) -> dict[int, Channel]:
        return {c.channel_id: c for c in self.channels if c.channel_id is not None}

    def sorted_channels(self) -> list[Channel]:
        """Channel order of the FileName/PathName columns (pe2loaddata: sorted keys)."""
        return sorted(self.channels, key=lambda c: c.key)


#: The metadata keys pe2loaddata's JUMP configuration requests (config_v1.yml).
DEFAULT_METADATA: tuple[str, ...] = (
    "Row", "Col", "FieldID", "PlaneID", "ChannelID", "ChannelName", "ImageResolutionX",
    "ImageResolutionY", "ImageSizeX", "ImageSizeY", "BinningX", "BinningY", "MaxIntensity",
    "PositionX", "PositionY", "PositionZ", "AbsPositionZ", "AbsTime", "MainExcitationWavelength",
    "MainEmissionWavelength", "ObjectiveMagnification", "ObjectiveNA", "ExposureTime",
)  # fmt: skip

#: CPJUMP1: 5 fluorescent channels + 3 bright-field planes (DESIGN.md).
CPJUMP1_CHANNELS = ChannelConfig(
    channels=(
        Channel("HOECHST 33342", "OrigDNA", 5),
        Channel("Alexa 568", "OrigAGP", 2),
        Channel("Alexa 647", "OrigMito", 1),
        Channel("Alexa 488", "OrigER", 4),
        Channel("488 long", "OrigRNA", 3),
        Channel("LowZBF", "OrigLowZBF", 6),
        Channel("Brightfield", "OrigBrightfield", 7),
        Channel("HighZBF", "OrigHighZBF", 8),
    ),
    metadata=DEFAULT_METADATA,
)

#: Metadata keys a folder listing can provide (from the Harmony file name).
LISTING_METADATA = ("Row", "Col", "FieldID", "PlaneID", "TimepointID", "ChannelID", "ChannelName", "FlimID")


def channel_config(path: str | None = None) -> ChannelConfig:
    """The channel configuration: CPJUMP1's by default, or a pe2loaddata YAML file.

    A pe2loaddata config has ``channels`` (Harmony name → Orig name) and ``metadata`` (keys);
    an optional ``channel_ids`` section (Harmony name → channel number) enables listing mode.
    """
    if path is None:
        return CPJUMP1_CHANNELS
    import yaml

    try:
        with open(path) as fh:
            raw = yaml.load(fh, Loader=yaml.BaseLoader)
    except (OSError, yaml.YAMLError) as exc:
        raise MetadataError(f"channel config {path}: cannot read: {exc}") from exc
    if isinstance(raw, list):
        raw = raw[0]
    if not isinstance(raw, dict) or not isinstance(raw.get("channels"), dict):
        raise MetadataError(f"channel config {path}: needs a 'channels' mapping")
    ids = raw.get("channel_ids") or {}
    channels = tuple(
        Channel(str(k), str(v), int(ids[k]) if k in ids else None) for k, v in raw["channels"].items()
    )
    metadata = tuple(str(k) for k in (raw.get("metadata") or {}))
    return ChannelConfig(channels, metadata)


# --------------------------------------------------------------------------- index parsing


@dataclass
class HarmonyIndex:
    """What LoadData needs from a Harmony ``Index.idx.xml``."""

    plates: list[tuple[str, list[str]]]  # (plate name, well ids in order)
    wells: dict[str, tuple[str, str, list[str]]]  # well id -> (Row, Col, image ids)
    images: pd.DataFrame  # one row per image, all values as text, indexed by image id
    maps: dict[str, dict[str, str]]  # ChannelID -> channel-level metadata


def parse_index(fh, source: str = "Index.idx.xml") -> HarmonyIndex:
    """Parse a Harmony index (``Plates``, ``Wells``, ``Maps``, ``Images``).

    The document is parsed by the C parser of ``xml.etree.ElementTree`` in one call; Python
    then touches each ``<Image>`` once (a dict of its children), which is what makes a
    27648-image index fast (per-element events cost more than the parse itself)."""
    with _no_gc():
        return _parse_index(fh, source)


def _parse_index(fh, source: str) -> HarmonyIndex:
    try:
        root = ET.parse(fh).getroot()
    except ET.ParseError as exc:
        raise InputDataError(f"{source}: not a readable Harmony index: {exc}") from exc
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""

    def text(el, name: str) -> str:
        return (el.findtext(ns + name) or "").strip()

    plates = [
        (text(p, "Name") or text(p, "PlateID"), [w.get("id", "") for w in p.findall(ns + "Well")])
        for p in root.iterfind(f"{ns}Plates/{ns}Plate")
    ]
    wells = {
        text(w, "id"): (text(w, "Row"), text(w, "Col"), [i.get("id", "") for i in w.findall(ns + "Image")])
        for w in root.iterfind(f"{ns}Wells/{ns}Well")
    }
    maps: dict[str, dict[str, str]] = {}
    for entry in root.iterfind(f"{ns}Maps/{ns}Map/{ns}Entry"):
        maps.setdefault(entry.get("ChannelID", ""), {}).update({c.tag: c.text for c in entry})
    records = [{c.tag: (c.text or "").strip() for c in img} for img in root.iterfind(f"{ns}Images/{ns}Image")]
    if not records:
        raise InputDataError(f"{source}: the index lists no images")
    images = pd.DataFrame.from_records(records)
    images.columns = [c[len(ns):] if c.startswith(ns) else c for c in images.columns]
    if "id" not in images.columns:
        raise InputDataError(f"{source}: images without <id>")
    images = images.set_index("id", drop=False)
    maps = {
        cid: {k[len(ns):] if k.startswith(ns) else k: (v or "").strip() for k, v in entry.items()}
        for cid, entry in maps.items()
    }
    return HarmonyIndex(plates, wells, images, maps)


def index_to_images(index: HarmonyIndex, config: ChannelConfig, source: str) -> pd.DataFrame:
    """One row per image: Plate, Well, Channel (Orig name), site keys and metadata values."""
    rows = []
    for plate_name, well_ids in index.plates:
        for order, wid in enumerate(well_ids):
            if wid not in index.wells:
                raise InputDataError(f"{source}: plate {plate_name} lists well {wid} missing from <Wells>")
            row, col, image_ids = index.wells[wid]
            rows.append((plate_name, wid, order, row, col, image_ids))
    if not rows:
        raise InputDataError(f"{source}: the index lists no plates with wells")
    link = pd.DataFrame(
        [(p, w, o, r, c, i) for p, w, o, r, c, ids in rows for i in ids],
        columns=["Plate", "_well_id", "_well_order", "_well_row", "_well_col", "id"],
    )
    plate_order = {p: i for i, p in enumerate(sorted({p for p, *_ in rows}))}
    link["_plate_order"] = link["Plate"].map(plate_order)
    images = index.images
    missing = sorted(set(link["id"]) - set(images.index))
    if missing:
        raise InputDataError(f"{source}: wells refer to images not in <Images>: {missing[:5]}")
    df = link.join(images.drop(columns=["id"], errors="ignore"), on="id")
    # Newer Harmony versions keep channel-level metadata (ChannelName, wavelengths, …) in <Maps>.
    if index.maps:
        maps = pd.DataFrame.from_dict(index.maps, orient="index")
        maps.index.name = "ChannelID"
        for key in maps.columns:
            if key not in df.columns:
                df[key] = np.nan
            fill = df["ChannelID"].map(maps[key])
            df[key] = df[key].where(df[key].notna() & (df[key] != ""), fill)
    for needed in ("URL", "FieldID", "ChannelID"):
        if needed not in df.columns:
            raise InputDataError(f"{source}: images lack <{needed}>")
    if "ChannelName" not in df.columns:
        raise InputDataError(f"{source}: images carry no <ChannelName> (neither in <Images> nor in <Maps>)")
    df["Well"] = _well_names(df["_well_row"], df["_well_col"], source)
    by_key = config.by_key()
    keys = df["ChannelName"].fillna("").str.replace(" ", "", regex=False)
    df["Channel"] = keys.map({k: c.name for k, c in by_key.items()})
    unknown = sorted(set(df.loc[df["Channel"].isna(), "ChannelName"].fillna("<none>")))
    if unknown:
        log.warning("%s: ignoring images of channels not in the configuration: %s", source, unknown)
        df = df[df["Channel"].notna()]
    return df


def _well_names(rows: pd.Series, cols: pd.Series, source: str) -> pd.Series:
    try:
        r = rows.astype(int)
        c = cols.astype(int)
    except (TypeError, ValueError) as exc:
        raise InputDataError(f"{source}: a well has a non-numeric Row/Col: {exc}") from exc
    letters = np.array([chr(ord("A") + i - 1) if 1 <= i <= 26 else f"R{i}" for i in range(0, 100)])
    return pd.Series(letters[r.clip(0, 99).to_numpy()], index=rows.index) + c.map("{:02d}".format)


# --------------------------------------------------------------------------- listing parsing


def listing_to_images(names: Iterable[str], config: ChannelConfig, plate: str, source: str) -> pd.DataFrame:
    """One row per image from Harmony file names (no index): positions unknown."""
    recs = []
    for name in names:
        m = HARMONY_NAME.match(name)
        if m:
            recs.append((name, *m.group("Row", "Col", "FieldID", "PlaneID", "ChannelID", "sk", "FlimID")))
    if not recs:
        raise InputDataError(
            f"plate {plate}: no Index.idx.xml and no Harmony-named images "
            f"(rXXcXXfXXpXX-chXskXfkXflX.tiff) in {source}"
        )
    df = pd.DataFrame.from_records(
        recs, columns=["URL", "Row", "Col", "FieldID", "PlaneID", "ChannelID", "sk", "FlimID"]
    )
    for key in ("Row", "Col", "FieldID", "PlaneID", "ChannelID", "FlimID"):
        df[key] = df[key].astype(int).astype(str)
    df["TimepointID"] = (df["sk"].astype(int) - 1).astype(str)
    by_id = config.by_id()
    if not by_id:
        raise MetadataError("the channel configuration has no channel_ids; listing mode needs them")
    ids = df["ChannelID"].astype(int)
    df["Channel"] = ids.map({i: c.name for i, c in by_id.items()})
    df["ChannelName"] = ids.map({i: c.harmony_name for i, c in by_id.items()})
    unknown = sorted(set(ids[df["Channel"].isna()]))
    if unknown:
        log.warning("%s: ignoring images of channel numbers not in the configuration: %s", source, unknown)
        df = df[df["Channel"].notna()].copy()
    df["Plate"] = plate
    df["Well"] = _well_names(df["Row"], df["Col"], source)
    df["_plate_order"] = 0
    df["_well_order"] = df["Row"].astype(int) * 100 + df["Col"].astype(int)
    for key in ("PositionX", "PositionY", "PositionZ"):
        df[key] = np.nan
    return df


# --------------------------------------------------------------------------- wide table


SITE_KEYS = ["Plate", "Well", "_field", "_plane", "_time"]


def images_to_load_data(
    images: pd.DataFrame, config: ChannelConfig, path_name: str, source: str = "", metadata: Sequence[str] | None = None
) -> pd.DataFrame:
    """The LoadData table (pe2loaddata layout) from one-row-per-image records.

    Raises :class:`InputDataError` on duplicate images (two files for one site and channel).
    A site that lacks a channel keeps an empty ``FileName_`` cell (the suite reports it).
    """
    df = images.copy()
    metadata = list(config.metadata if metadata is None else metadata)
    df["_field"] = pd.to_numeric(df["FieldID"], errors="coerce")
    if df["_field"].isna().any():
        bad = df.loc[df["_field"].isna(), "URL"].head(3).tolist()
        raise InputDataError(f"{source}: images with a non-numeric FieldID: {bad}")
    df["_plane"] = pd.to_numeric(df.get("PlaneID", 1), errors="coerce").fillna(1)
    df["_time"] = pd.to_numeric(df.get("TimepointID", 1), errors="coerce").fillna(1)
    dup = df.duplicated(SITE_KEYS + ["Channel"], keep=False)
    if dup.any():
        d = df[dup].sort_values(SITE_KEYS + ["Channel"])
        examples = [
            f"{p} {w} site {int(f)} {c}: {u}"
            for p, w, f, c, u in d[["Plate", "Well", "_field", "Channel", "URL"]].head(6).itertuples(index=False)
        ]
        raise InputDataError(
            f"{source}: {int(dup.sum())} duplicate images (more than one file for a site and channel), "
            f"e.g. {'; '.join(examples)}"
        )
    channels = config.sorted_channels()
    in_order = [c.name for c in config.channels]
    sites = (
        df[SITE_KEYS + ["_plate_order", "_well_order"]]
        .drop_duplicates(SITE_KEYS)
        .sort_values(["_plate_order", "Plate", "_well_order", "_field", "_plane", "_time"], kind="stable")
        .reset_index(drop=True)
    )
    pos = pd.MultiIndex.from_frame(sites[SITE_KEYS])
    present_keys = [k for k in metadata if k in df.columns]
    value_cols = ["URL", *present_keys]
    # one reshape: (site) x (value, channel); (site, channel) is unique after the check above
    piv = df.set_index([*SITE_KEYS, "Channel"])[value_cols].unstack("Channel")
    piv = piv.reindex(pos)
    out: dict[str, Any] = {}
    for ch in channels:
        fname = piv[("URL", ch.name)] if ("URL", ch.name) in piv.columns else pd.Series(np.nan, index=piv.index)
        out[f"FileName_{ch.name}"] = fname.to_numpy()
        out[f"PathName_{ch.name}"] = np.where(fname.notna().to_numpy(), path_name, None)
    out["Metadata_Plate"] = sites["Plate"].to_numpy()
    out["Metadata_Well"] = sites["Well"].to_numpy()
    out["Metadata_Site"] = sites["_field"].astype(int).astype(str).to_numpy()
    for key in sorted(metadata):
        if key not in present_keys:
            continue
        cols = [(key, c) for c in in_order if (key, c) in piv.columns]
        if not cols:  # no value anywhere (e.g. positions in listing mode): one empty column
            out[f"Metadata_{key}"] = np.full(len(sites), None, dtype=object)
            continue
        block = piv[cols]
        # same value in every channel of every site -> one column, else one per channel
        vals = block.to_numpy(dtype=object)
        null = pd.isna(vals)
        if not null.any():
            first = vals[:, 0]
            single = bool((vals == first[:, None]).all())
        else:  # compare with the first channel that has a value
            first = block.bfill(axis=1).iloc[:, 0].to_numpy(dtype=object)
            single = bool((null | (vals == first[:, None])).all())
        if single:
            out[f"Metadata_{key}"] = first
        else:
            for c in in_order:
                col = piv[(key, c)] if (key, c) in piv.columns else pd.Series(np.nan, index=piv.index)
                out[f"Metadata_{key}_{c}"] = col.to_numpy()
    table = pd.DataFrame(out)
    return table.astype(object).where(table.notna(), None)


def add_illum_columns(table: pd.DataFrame, config: ChannelConfig, plate: str, illum_dir: str) -> pd.DataFrame:
    """pe2loaddata's ``append_illum_cols``: ``FileName_Illum<Ch>``/``PathName_Illum<Ch>`` for every
    channel, sorted by Orig name, pointing at the illum stage's ``<plate>_Illum<Ch>.npy``."""
    extra = {}
    for ch in sorted(config.channels, key=lambda c: c.name):
        extra[f"FileName_{ch.illum_name}"] = f"{plate}_{ch.illum_name}{ILLUM_SUFFIX}"
        extra[f"PathName_{ch.illum_name}"] = illum_dir
    return table.assign(**extra)


def to_csv_text(table: pd.DataFrame) -> str:
    """CSV as pe2loaddata writes it (``csv`` module defaults, ``\\n`` line ends, empty = '')."""
    return table.to_csv(index=False, lineterminator="\n", na_rep="")


# --------------------------------------------------------------------------- shards


def make_shards(table: pd.DataFrame, shards: int | None = None, sites_per_shard: int | None = None) -> dict:
    """Split a plate into ``K`` contiguous blocks of whole sites (all channels, planes and
    timepoints of a site stay in one shard); deterministic for the same table."""
    if shards is not None and sites_per_shard is not None:
        raise click.UsageError("give --shards or --sites-per-shard, not both")
    site = table["Metadata_Well"].astype(str) + "-" + table["Metadata_Site"].astype(str)
    site_ids = list(dict.fromkeys(site))
    n_sites = len(site_ids)
    if sites_per_shard is not None:
        if sites_per_shard < 1:
            raise click.BadParameter("--sites-per-shard must be at least 1")
        k = max(1, math.ceil(n_sites / sites_per_shard))
    else:
        k = 1 if shards is None else shards
        if k < 1:
            raise click.BadParameter("--shards must be at least 1")
        k = min(k, max(1, n_sites))
    blocks = np.array_split(np.arange(n_sites), k)
    rows_of_site: dict[str, list[int]] = {}
    for i, s in enumerate(site):
        rows_of_site.setdefault(s, []).append(i)
    manifest = {"n_shards": k, "n_sites": n_sites, "n_rows": len(table), "shards": []}
    for i, block in enumerate(blocks):
        sites = [site_ids[j] for j in block]
        rows = [r for s in sites for r in rows_of_site[s]]
        manifest["shards"].append({"index": i, "rows": rows, "sites": sites})
    return manifest


# --------------------------------------------------------------------------- file checks


TIFF_MAGIC = {b"II*\x00": "<", b"MM\x00*": ">"}
BIGTIFF_MAGIC = {b"II+\x00", b"MM\x00+"}


class _Reader:
    """Reads of a file through one first block (most TIFF headers and IFDs fit in it).

    ``source`` is an open binary file object or a raw OS file descriptor (``os.pread``: no
    Python buffering, the cheapest way to look at 27648 local files)."""

    BLOCK = 4096

    def __init__(self, source):
        self.fd = source if isinstance(source, int) else None
        self.fh = None if isinstance(source, int) else source
        self.head = os.pread(self.fd, self.BLOCK, 0) if self.fd is not None else self.fh.read(self.BLOCK)

    def get(self, off: int, n: int) -> bytes:
        if off + n <= len(self.head):
            return self.head[off : off + n]
        if self.fd is not None:
            return os.pread(self.fd, n, off)
        self.fh.seek(off)
        return self.fh.read(n)


def tiff_problem(fh, size: int | None) -> str | None:
    """Check a TIFF's header and first image directory; ``None`` when it looks whole.

    Reads the 8-byte header (byte order + magic 42), the first IFD and the strip/tile
    offset and byte-count arrays, and checks that the IFD, every tag's data and the image
    data lie inside the file — a truncated copy fails that (TIFF 6.0 specification, Adobe
    1992, sections 2 and 3). BigTIFF files get the magic check only. ``fh``: a binary file
    object or an OS file descriptor.
    """
    r = _Reader(fh)
    head = r.head[:8]
    if size is None and len(r.head) < _Reader.BLOCK:
        size = len(r.head)
    if len(head) < 8:
        return f"truncated: {len(head)} bytes, no TIFF header"
    if head[:4] in BIGTIFF_MAGIC:
        return None
    order = TIFF_MAGIC.get(head[:4])
    if order is None:
        return f"not a TIFF (starts with {head[:4]!r})"
    (ifd,) = struct.unpack(order + "I", head[4:8])
    if size is not None and (ifd < 8 or ifd + 2 > size):
        return f"truncated: first image directory at byte {ifd} of {size}"
    raw = r.get(ifd, 2)
    if len(raw) < 2:
        return "truncated: image directory missing"
    (n,) = struct.unpack(order + "H", raw)
    entries = r.get(ifd + 2, 12 * n)
    if len(entries) < 12 * n:
        return "truncated: image directory cut short"
    tags: dict[int, tuple[int, ...]] = {}
    u32 = struct.Struct(order + "I").unpack
    for tag, typ, count, value in struct.iter_unpack(order + "HHI4s", entries):
        nbytes = _TIFF_TYPE_SIZE.get(typ, 1) * count
        off = u32(value)[0] if nbytes > 4 else None
        if off is not None and size is not None and off + nbytes > size:
            return f"truncated: tag {tag} data ends at byte {off + nbytes}, file has {size}"
        if tag not in (273, 279, 324, 325) or typ not in _TIFF_INT_FORMAT:
            continue
        data = value[:nbytes] if off is None else r.get(off, nbytes)
        if len(data) < nbytes:
            return f"truncated: tag {tag} array cut short"
        tags[tag] = struct.unpack(order + _TIFF_INT_FORMAT[typ] * count, data)
    offsets = tags.get(273) or tags.get(324)
    counts = tags.get(279) or tags.get(325)
    if not offsets or not counts or len(offsets) != len(counts):
        return "not a readable TIFF image (no strip/tile offsets)"
    end = max(o + c for o, c in zip(offsets, counts))
    if size is not None and end > size:
        return f"truncated: image data needs {end} bytes, file has {size}"
    return None


_TIFF_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_TIFF_INT_FORMAT = {1: "B", 3: "H", 4: "I", 16: "Q"}


def _check_one(url: str, size: int | None, settings: Settings) -> str | None:
    try:
        if storage.is_remote(url):
            with storage.open_file(url, "rb", settings, block_size=_Reader.BLOCK) as fh:
                return tiff_problem(fh, size)
        fd = os.open(url.removeprefix("file://"), os.O_RDONLY)  # local: no fsspec/buffering per file
        try:
            return tiff_problem(fd, size)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return "missing"
    except (OSError, struct.error) as exc:
        return f"unreadable: {exc}"


def file_problems(table: pd.DataFrame, settings: Settings, listing: dict[str, dict[str, int | None]] | None = None,
                  header_sample: int | None = None) -> pd.Series:
    """Per row: ``None`` when every image of the site exists and has a whole TIFF header,
    else a text naming each bad file. Existence comes from one listing per image folder;
    headers are read for every image on local disk and for ``header_sample`` images
    (spread evenly over the plate) on remote storage; unchecked rows stay ``None``."""
    fcols = [c for c in table.columns if c.startswith("FileName_Orig")]
    problems: dict[int, list[str]] = {}
    listings: dict[str, dict[str, int | None]] = dict(listing or {})
    to_check: list[tuple[int, str, str, int | None]] = []
    for fc in fcols:
        pc = "PathName_" + fc.removeprefix("FileName_")
        for i, (fname, pname) in enumerate(zip(table[fc], table[pc])):
            if fname is None or (isinstance(fname, float) and math.isnan(fname)):
                continue
            if pname not in listings:
                listings[pname] = _list_sizes(pname, settings)
            sizes = listings[pname]
            if fname not in sizes:
                problems.setdefault(i, []).append(f"{fname}: missing")
                continue
            to_check.append((i, fname, pname, sizes[fname]))
    remote = any(storage.is_remote(p) for _, _, p, _ in to_check)
    if remote:
        n = REMOTE_HEADER_SAMPLE if header_sample is None else header_sample
        if 0 < n < len(to_check):
            picks = np.unique(np.linspace(0, len(to_check) - 1, n).round().astype(int))
            to_check = [to_check[j] for j in picks]
        elif n <= 0:
            to_check = []
    # plain string joins: pathlib per file costs more than reading the header
    urls = [f"{p.rstrip('/')}/{f}" if storage.is_remote(p) else os.path.join(p, f) for _, f, p, _ in to_check]
    sizes = [s for *_, s in to_check]
    if remote:  # network latency: overlap the requests
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda a: _check_one(a[0], a[1], settings), zip(urls, sizes)))
    else:  # page-cache reads of one block: a thread pool's per-task cost exceeds the read
        results = [_check_one(u, n, settings) for u, n in zip(urls, sizes)]
    for (i, fname, _, _), res in zip(to_check, results):
        if res is not None:
            problems.setdefault(i, []).append(f"{fname}: {res}")
    out = pd.Series([None] * len(table), dtype=object, index=table.index)
    for i, msgs in problems.items():
        out.iloc[i] = "; ".join(msgs)
    return out


def _list_sizes(folder: str, settings: Settings) -> dict[str, int | None]:
    entries = storage.listdir(folder, settings, detail=True)
    out: dict[str, int | None] = {}
    for e in entries:
        if e.get("type") == "directory":
            continue
        out[storage.basename(e["name"])] = e.get("size")
    return out


# --------------------------------------------------------------------------- qc frame


def qc_frame(
    table: pd.DataFrame, settings: Settings, listing: dict[str, dict[str, int | None]] | None = None,
    header_sample: int | None = None,
) -> pd.DataFrame:
    """The load_data table plus the ``_qc_*`` columns the suite checks:

    ``_qc_missing_channels`` (channels without a file at that site, else null),
    ``_qc_n_images`` (images of the row), ``_qc_sites_in_well``, ``_qc_site_number``, ``_qc_file_problem``
    (missing / non-TIFF / truncated files of the row, else null).
    """
    fcols = [c for c in table.columns if c.startswith("FileName_Orig")]
    present = table[fcols].notna()
    names = [c.removeprefix("FileName_") for c in fcols]
    absent = ~present.to_numpy()
    missing = [",".join(n for n, a in zip(names, row) if a) if row.any() else None for row in absent]
    q = table.copy()
    q["_qc_missing_channels"] = pd.Series(missing, index=table.index, dtype=object)
    q["_qc_n_images"] = present.sum(axis=1).astype(int)
    if "Metadata_Well" in q.columns and "Metadata_Site" in q.columns:
        key = q["Metadata_Plate"].astype(str) + "/" + q["Metadata_Well"].astype(str)
        q["_qc_sites_in_well"] = q.groupby(key)["Metadata_Site"].transform("nunique").astype(int)
        q["_qc_site_number"] = pd.to_numeric(q["Metadata_Site"], errors="coerce")
    with _no_gc():
        q["_qc_file_problem"] = file_problems(table, settings, listing, header_sample)
    return q


def expected_counts(batch: str, plate: str, settings: Settings, synthetic_url: str | None = None) -> dict[str, Any]:
    """Suite parameters: the expected image count (``synthetic.json`` beside a synthetic plate's
    images, else the catalog's Number_of_images) and the most sites a well may have."""
    params: dict[str, Any] = {
        "plates": [plate], "expected_images": None, "max_sites_per_well": 16, "expected_source": "unknown",
    }
    if synthetic_url is not None:
        try:
            info = json.loads(storage.read_text(synthetic_url, settings))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputDataError(f"plate {plate}: {synthetic_url} is not valid JSON: {exc}") from exc
        if "expected_images" not in info:
            raise InputDataError(f"plate {plate}: {synthetic_url} has no expected_images")
        params["expected_images"] = int(info["expected_images"])
        if info.get("sites"):
            params["max_sites_per_well"] = int(info["sites"])
        params["expected_source"] = synthetic_url
        return params
    from cpjump1.catalog import load_catalog

    p = load_catalog(settings.metadata_dir).plate(batch, plate)
    params["expected_images"] = p.expected_images
    params["expected_source"] = f"catalog {batch}/{plate} Number_of_images"
    if p.expected_images is None:
        log.warning("plate %s/%s: the catalog has no Number_of_images; the count is not checked", batch, plate)
    return params


# --------------------------------------------------------------------------- stage


@dataclass
class PlateSource:
    """Where a plate's images are and how they were listed."""

    plate_dir: str
    images_dir: str
    index_url: str | None
    sizes: dict[str, int | None]
    stamps: list = field(default_factory=list)
    synthetic_url: str | None = None


def _entries(folder: str, settings: Settings) -> list[dict]:
    """A fresh listing (no cached directory listings: a rerun must see new files)."""
    fs, path = storage.filesystem(folder, settings)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    return [e for e in storage.listdir(folder, settings, detail=True) if e.get("type") != "directory"]


def locate_images(batch: str, plate: str, settings: Settings) -> PlateSource:
    """Find the plate folder, its ``Images/`` folder, the index and ``synthetic.json``, and list
    the images (one listing per folder; no per-file requests)."""
    plate_dir = storage.plate_images_dir(settings.resolved_images_root, batch, plate, settings)
    images_dir = storage.join(plate_dir, "Images")
    entries = _entries(images_dir, settings)
    if not entries:
        raise InputDataError(f"plate {plate} of batch {batch}: no images in {images_dir} (folder empty or absent)")
    sizes: dict[str, int | None] = {}
    stamps = []
    for e in entries:
        name = storage.basename(e["name"])
        sizes[name] = e.get("size")
        stamps.append((name, e.get("size"), str(e.get("ETag") or e.get("mtime") or "")))
    top = {storage.basename(e["name"]): e for e in _entries(plate_dir, settings)}
    index_url = None
    for folder, names in ((images_dir, sizes), (plate_dir, top)):
        found = next((c for c in INDEX_NAMES if c in names), None)
        if found:
            index_url = storage.join(folder, found)
            if names is top:
                e = top[found]
                stamps.append((found, e.get("size"), str(e.get("ETag") or e.get("mtime") or "")))
            break
    synthetic_url = storage.join(plate_dir, "synthetic.json") if "synthetic.json" in top else None
    if synthetic_url:
        e = top["synthetic.json"]
        stamps.append(("synthetic.json", e.get("size"), str(e.get("ETag") or e.get("mtime") or "")))
    if index_url is None:
        log.info("plate %s: no Index.idx.xml; building load_data from the listing of %s", plate, images_dir)
    return PlateSource(plate_dir, images_dir, index_url, sizes, sorted(stamps, key=str), synthetic_url)


def build_load_data(
    batch: str, plate: str, settings: Settings, config: ChannelConfig | None = None, source: PlateSource | None = None
) -> tuple[pd.DataFrame, PlateSource]:
    """The LoadData table of a plate (no illum columns), from its index or its listing."""
    with _no_gc():
        return _build_load_data(batch, plate, settings, config, source)


def _build_load_data(batch, plate, settings, config, source) -> tuple[pd.DataFrame, PlateSource]:
    config = config or CPJUMP1_CHANNELS
    source = source or locate_images(batch, plate, settings)
    if source.index_url:
        with storage.open_file(source.index_url, "rb", settings) as fh:
            index = parse_index(fh, source.index_url)
        images = index_to_images(index, config, source.index_url)
        origin = source.index_url
    else:
        images = listing_to_images(source.sizes, config, plate, source.images_dir)
        origin = source.images_dir
    metadata = config.metadata if source.index_url else [k for k in config.metadata if k in
                                                         (*LISTING_METADATA, "PositionX", "PositionY", "PositionZ")]
    table = images_to_load_data(images, config, source.images_dir, origin, metadata)
    plates = sorted(set(table["Metadata_Plate"]))
    if plates != [plate]:
        log.warning("plate %s: the index names plate(s) %s; Metadata_Plate is set to %s", plate, plates, plate)
        table["Metadata_Plate"] = plate
    return table, source


@dataclass
class LoadDataResult:
    load_data: str
    load_data_with_illum: str
    shards: str
    n_sites: int
    n_images: int
    n_shards: int
    skipped: bool = False
    qc_json: str | None = None
    seconds: float = 0.0


def run_load_data(
    batch: str,
    plate: str,
    settings: Settings | None = None,
    shards: int | None = None,
    sites_per_shard: int | None = None,
    force: bool = False,
    config_path: str | None = None,
) -> LoadDataResult:
    """Write ``load_data.csv``, ``load_data_with_illum.csv`` and ``shards.json`` for one plate.

    Skips the work when the output folder's marker matches the inputs (listing, index, options)
    unless ``force``. Runs the ``load_data`` suite before writing; a failure raises
    :class:`~cpjump1.errors.ValidationFailed` and writes no CSV.
    """
    settings = settings or get_settings()
    try:
        return _run_load_data(batch, plate, settings, shards, sites_per_shard, force, config_path)
    except Cpjump1Error:
        raise
    except PermissionError as exc:
        raise StorageError(
            f"plate {plate} of batch {batch}: access denied ({exc}) under {settings.resolved_images_root} "
            f"or {settings.storage_root}; check the credentials or CPJUMP1_S3_ANONYMOUS"
        ) from exc
    except Exception as exc:
        if type(exc).__name__ not in ("NoCredentialsError", "PartialCredentialsError"):
            raise
        raise StorageError(
            f"plate {plate} of batch {batch}: no S3 credentials for {settings.resolved_images_root}; "
            "set AWS credentials or CPJUMP1_S3_ANONYMOUS=true for public buckets"
        ) from exc


def _run_load_data(batch, plate, settings, shards, sites_per_shard, force, config_path) -> LoadDataResult:
    from cpjump1.validation import run_suite

    t0 = time.perf_counter()
    config = channel_config(config_path)
    layout = storage.Layout(settings.storage_root)
    out_dir = layout.load_data_dir(batch, plate)
    paths = {n: storage.join(out_dir, n) for n in (LOAD_DATA_CSV, LOAD_DATA_WITH_ILLUM_CSV, SHARDS_JSON)}
    source = locate_images(batch, plate, settings)
    fp = storage.fingerprint(
        FORMAT_VERSION, batch, plate, source.images_dir, source.stamps,
        [c.__dict__ for c in config.channels], config.metadata, shards, sites_per_shard,
        layout.illum_dir(batch, plate),
    )
    if not force and storage.marker_matches(out_dir, fp, settings):
        marker = storage.read_marker(out_dir, settings) or {}
        log.info("load_data %s/%s: outputs are complete for these inputs; skipped", batch, plate)
        return LoadDataResult(
            paths[LOAD_DATA_CSV], paths[LOAD_DATA_WITH_ILLUM_CSV], paths[SHARDS_JSON],
            marker.get("n_sites", 0), marker.get("n_images", 0), marker.get("n_shards", 0), skipped=True,
        )
    storage.remove(storage.join(out_dir, storage.MARKER_NAME), settings)
    table, source = build_load_data(batch, plate, settings, config, source)
    illum = add_illum_columns(table, config, plate, layout.illum_dir(batch, plate))
    params = expected_counts(batch, plate, settings, source.synthetic_url)
    qc = qc_frame(table, settings, {source.images_dir: source.sizes})
    report = run_suite(
        qc, STAGE, batch=batch, plate=plate, stage=STAGE, settings=settings,
        extra_context={**params, "images_dir": source.images_dir, "index": source.index_url},
    )
    manifest = make_shards(illum, shards, sites_per_shard)
    manifest.update({"batch": batch, "plate": plate, "load_data": LOAD_DATA_WITH_ILLUM_CSV})
    with storage.atomic_write(paths[LOAD_DATA_CSV], settings, mode="w") as fh:
        fh.write(to_csv_text(table))
    with storage.atomic_write(paths[LOAD_DATA_WITH_ILLUM_CSV], settings, mode="w") as fh:
        fh.write(to_csv_text(illum))
    with storage.atomic_write(paths[SHARDS_JSON], settings, mode="w") as fh:
        json.dump(manifest, fh, indent=1)
    n_images = int(qc["_qc_n_images"].sum())
    storage.write_marker(
        out_dir, fp, settings, n_sites=manifest["n_sites"], n_images=n_images, n_shards=manifest["n_shards"],
        source=source.index_url or source.images_dir,
    )
    secs = time.perf_counter() - t0
    log.info(
        "load_data %s/%s: %d sites, %d images, %d shard(s) from %s in %.1f s -> %s",
        batch, plate, manifest["n_sites"], n_images, manifest["n_shards"],
        "the index" if source.index_url else "the folder listing", secs, out_dir,
    )
    return LoadDataResult(
        paths[LOAD_DATA_CSV], paths[LOAD_DATA_WITH_ILLUM_CSV], paths[SHARDS_JSON], manifest["n_sites"],
        n_images, manifest["n_shards"], qc_json=report.json_path, seconds=secs,
    )


def load_for_validation(batch: str, plate: str, settings: Settings):
    """The :mod:`cpjump1.validation` hook: the written ``load_data_with_illum.csv`` with the
    ``_qc_*`` columns recomputed (files re-checked) and the suite parameters."""
    layout = storage.Layout(settings.storage_root)
    url = storage.join(layout.load_data_dir(batch, plate), LOAD_DATA_WITH_ILLUM_CSV)
    if not storage.exists(url, settings):
        raise InputDataError(f"plate {plate} of batch {batch}: {url} does not exist; run `cpjump1 load-data` first")
    with storage.open_file(url, "rb", settings) as fh:
        table = pd.read_csv(fh, dtype=str, keep_default_na=False, na_values=[""])
    table = table.astype(object).where(table.notna(), None)
    try:
        synthetic_url = locate_images(batch, plate, settings).synthetic_url
    except Cpjump1Error:
        synthetic_url = None
    params = expected_counts(batch, plate, settings, synthetic_url)
    return qc_frame(table, settings), {**params, "load_data": url}


# --------------------------------------------------------------------------- CLI


@click.command("load-data")
@click.option("--batch", required=True, help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plate", required=True, help="Plate barcode, e.g. BR00117010.")
@click.option("--shards", type=int, default=None, help="Split the plate into K shards of whole sites.")
@click.option("--sites-per-shard", type=int, default=None, help="Or: shards of at most N sites.")
@click.option("--force", is_flag=True, help="Rebuild even when the outputs match their inputs.")
@click.option("--config", "config_path", default=None, help="pe2loaddata-style channel config (YAML).")
@click.option("--storage-root", default=None, help="Output root (default: settings).")
@click.option("--images-root", default=None, help="Images root (default: settings).")
def command(batch, plate, shards, sites_per_shard, force, config_path, storage_root, images_root) -> None:
    """List a plate's images and write CellProfiler load_data CSVs (+ shard manifest)."""
    settings = get_settings(storage_root=storage_root, images_root=images_root)
    res = run_load_data(batch, plate, settings, shards=shards, sites_per_shard=sites_per_shard, force=force,
                        config_path=config_path)
    state = "up to date (skipped)" if res.skipped else f"{res.n_sites} sites, {res.n_images} images"
    click.echo(f"{res.load_data_with_illum}: {state}, {res.n_shards} shard(s)")
