"""Deep profiles: DeepProfiler single-cell embeddings → well profiles → spherized profiles.

Method (Moshkov et al. 2024, "Learning representations for image-based profiling of
perturbations", Nature Communications; DeepProfiler 0.5.1, github.com/cytomining/DeepProfiler):
for every cell a ``box_size`` × ``box_size`` crop of the five illumination-corrected
fluorescent channels is taken around its nucleus center, each crop and channel is min–max
scaled to [0, 1], and an EfficientNet (B0 as in the Cell Painting CNN v1) maps it to a vector
(the ``feature_layer`` activation, spatially averaged). Cells are averaged per well, the
wells are annotated with the plate map and perturbation metadata, normalised against the
plate's negative controls (pycytominer ``mad_robustize``) and spherized (pycytominer
``normalize(method="spherize")``, ZCA-cor, fitted on negative controls) as in the CPJUMP1
paper (Chandrasekaran et al. 2024, Nature Methods).

Runs in two environments: this module runs in the project env and builds a DeepProfiler
project (index CSV, illumination-corrected 16-bit TIFFs, per-site nuclei locations, config,
checkpoint); DeepProfiler itself runs as ``<deepprofiler_python> -m deepprofiler … profile`` in
its own Python 3.11 / TensorFlow 2.15 env, preceded by the checkpoint guard
(:mod:`cpjump1.deepprofiler_worker` ``verify``) because DeepProfiler loads weights by layer
name and silently skips layers it cannot match.

The checkpoint is a configured artifact (local path or ``s3://``). The Cell Painting CNN
cannot be downloaded on the project machines, so tests and the demo use a small seeded
checkpoint built by :func:`build_checkpoint`; every table made with it says so in
``Metadata_Model_Checkpoint_Kind`` and in ``provenance.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import pandas as pd

from cpjump1 import storage
from cpjump1.errors import Cpjump1Error, InputDataError
from cpjump1.settings import Settings, get_settings

log = logging.getLogger(__name__)

STAGE = "deep_profiles"
STAGE_VERSION = "1"
WORKER = Path(__file__).with_name("deepprofiler_worker.py")
CONFIG_NAME = "config.json"
SEEDED_LABEL = "seeded test checkpoint, not the Cell Painting CNN"
USER_LABEL = "user-supplied checkpoint"
#: Output suffixes, parallel to the CellProfiler profiles stage.
LEVELS = ("", "_augmented", "_normalized_negcon", "_spherized")
FLOAT_FORMAT = "%.5g"


class CheckpointError(Cpjump1Error):
    """The model checkpoint is missing, unreadable, or does not match the model."""


class DeepProfilerError(Cpjump1Error):
    """DeepProfiler (or its environment) failed; the message carries the tail of its log."""


@dataclass
class DeepProfilesResult:
    """What :func:`run_deep_profiles` wrote (or found complete)."""

    batch: str
    plate: str
    outputs: dict[str, str]
    skipped: bool
    sites: int = 0
    cells: int = 0
    seconds: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- config


def load_config(settings: Settings, path: str | None = None) -> dict[str, Any]:
    """The DeepProfiler config template (``pipelines/deepprofiler/config.json``)."""
    path = path or storage.join(settings.pipelines_dir, "deepprofiler", CONFIG_NAME)
    try:
        config = json.loads(storage.read_text(path, settings))
    except FileNotFoundError as exc:
        raise InputDataError(f"DeepProfiler config not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise InputDataError(f"DeepProfiler config {path} is not valid JSON: {exc}") from exc
    for keys in (("dataset", "images", "channels"), ("dataset", "locations", "box_size"),
                 ("profile", "feature_layer"), ("train", "model", "params", "conv_blocks")):
        node: Any = config
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                raise InputDataError(f"DeepProfiler config {path}: missing {'.'.join(keys)}")
            node = node[k]
    if config["profile"].get("use_pretrained_input_size"):
        raise InputDataError(
            f"DeepProfiler config {path}: profile.use_pretrained_input_size downloads ImageNet "
            "weights at run time; remove it"
        )
    return config


def _extra(config: dict[str, Any]) -> dict[str, Any]:
    return {"bits": 16, "feature_prefix": "DP_efficientnet_", "aggregation": "mean",
            **config.get("_cpjump1", {})}


# --------------------------------------------------------------------------- inputs


def read_load_data(batch: str, plate: str, settings: Settings, channels: list[str]) -> pd.DataFrame:
    """The plate's ``load_data_with_illum.csv`` (pe2loaddata layout), checked for the columns used."""
    url = storage.join(storage.Layout(settings.storage_root).load_data_dir(batch, plate),
                       "load_data_with_illum.csv")
    try:
        with storage.open_file(url, "rb", settings) as fh:
            frame = pd.read_csv(fh, dtype={"Metadata_Plate": str, "Metadata_Well": str})
    except FileNotFoundError as exc:
        raise InputDataError(
            f"plate {batch}/{plate}: no load_data_with_illum.csv at {url} (run `cpjump1 load-data` and `cpjump1 illum` first)"
        ) from exc
    needed = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    for ch in channels:
        needed += [f"FileName_Orig{ch}", f"PathName_Orig{ch}", f"FileName_Illum{ch}", f"PathName_Illum{ch}"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputDataError(f"{url}: missing column(s) {', '.join(missing)}")
    if frame.empty:
        raise InputDataError(f"{url}: no image sets")
    frame = frame.copy()
    frame["Metadata_Site"] = frame["Metadata_Site"].astype(int)
    other = sorted(set(frame["Metadata_Plate"]) - {plate})
    if other:
        raise InputDataError(f"{url}: rows of other plates {other} in the load_data of plate {plate}")
    dup = frame.duplicated(["Metadata_Well", "Metadata_Site"])
    if dup.any():
        first = frame.loc[dup, ["Metadata_Well", "Metadata_Site"]].iloc[0].tolist()
        raise InputDataError(f"{url}: site {first[0]}-{first[1]} listed more than once")
    frame = frame.sort_values(["Metadata_Well", "Metadata_Site"]).reset_index(drop=True)
    frame.attrs["source"] = url
    return frame


def read_locations(batch: str, plate: str, settings: Settings) -> tuple[pd.DataFrame, dict[tuple[str, int], int], list[str]]:
    """Nuclei centers of every complete analysis shard.

    Returns (centers with a ``_source`` column, {(well, site): Count_Nuclei} from shard
    ``Image.csv`` files where present, the Nuclei.csv files read).
    """
    layout = storage.Layout(settings.storage_root)
    root = layout.analysis_dir(batch, plate)
    shards = sorted(storage.listdir(root, settings))
    complete = [s for s in shards if storage.read_marker(s, settings) is not None]
    if not complete:
        raise InputDataError(
            f"plate {batch}/{plate}: no complete analysis shard (with {storage.MARKER_NAME}) under {root}; "
            "run `cpjump1 analysis` first"
        )
    frames, files = [], []
    counts: dict[tuple[str, int], int] = {}
    cols = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Location_Center_X", "Location_Center_Y"]
    for shard in complete:
        url = storage.join(shard, "Nuclei.csv")
        try:
            with storage.open_file(url, "rb", settings) as fh:
                frame = pd.read_csv(fh, dtype={"Metadata_Plate": str, "Metadata_Well": str})
        except FileNotFoundError as exc:
            raise InputDataError(f"analysis shard {shard} is marked complete but has no Nuclei.csv") from exc
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame(columns=cols)
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise InputDataError(f"{url}: missing column(s) {', '.join(missing)}")
        frame = frame[cols].copy()
        frame["_source"] = url
        frames.append(frame)
        files.append(url)
        image_url = storage.join(shard, "Image.csv")
        if storage.exists(image_url, settings):
            with storage.open_file(image_url, "rb", settings) as fh:
                image = pd.read_csv(fh, dtype={"Metadata_Well": str})
            if {"Metadata_Well", "Metadata_Site", "Count_Nuclei"} <= set(image.columns):
                for r in image.itertuples(index=False):
                    counts[(str(r.Metadata_Well), int(r.Metadata_Site))] = int(r.Count_Nuclei)
    centers = pd.concat([f for f in frames if not f.empty] or frames[:1], ignore_index=True)
    centers["Metadata_Site"] = centers["Metadata_Site"].astype(int)
    bad = centers[["Location_Center_X", "Location_Center_Y"]].isna().any(axis=1)
    if bad.any():
        src = centers.loc[bad, "_source"].iloc[0]
        raise InputDataError(f"{src}: {int(bad.sum())} nuclei without a center (NaN Location_Center_X/Y)")
    return centers, counts, files


# --------------------------------------------------------------------------- images


def _read_tiff(url: str, settings: Settings) -> np.ndarray:
    import tifffile

    try:
        with storage.open_file(url, "rb", settings) as fh:
            return tifffile.imread(fh)
    except FileNotFoundError as exc:
        raise InputDataError(f"image not found: {url}") from exc
    except Exception as exc:  # tifffile raises several types for corrupt files
        if isinstance(exc, Cpjump1Error):
            raise
        raise InputDataError(f"cannot read image {url}: {exc}") from exc


def _read_illum(url: str, settings: Settings) -> np.ndarray:
    try:
        with storage.open_file(url, "rb", settings) as fh:
            arr = np.load(fh, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InputDataError(f"illumination function not found: {url}") from exc
    except ValueError as exc:
        raise InputDataError(f"cannot read illumination function {url}: {exc}") from exc
    if arr.ndim != 2 or not np.isfinite(arr).all() or (arr <= 0).any():
        raise InputDataError(
            f"illumination function {url}: expected a 2-D array of positive finite values, got shape "
            f"{arr.shape} with min {np.nanmin(arr) if arr.size else 'n/a'}"
        )
    return arr.astype(np.float32)


def correct_image(image: np.ndarray, illum: np.ndarray, url: str, bits: int, shape: tuple[int, int] | None) -> np.ndarray:
    """Illumination correction as CellProfiler's CorrectIlluminationApply (divide), kept 16-bit.

    Checks that ``image`` has the configured bit depth (``uint16`` for 16 bits) and the
    plate's image size, and that the illumination function has the same size.
    """
    want = np.dtype(f"uint{bits}")
    if image.dtype != want:
        raise InputDataError(f"image {url}: bit depth {image.dtype} but the DeepProfiler config expects {want} ({bits}-bit)")
    if image.ndim != 2:
        raise InputDataError(f"image {url}: expected one 2-D plane, got shape {image.shape}")
    if shape is not None and image.shape != shape:
        raise InputDataError(f"image {url}: size {image.shape[1]}x{image.shape[0]} differs from the plate's {shape[1]}x{shape[0]}")
    if illum.shape != image.shape:
        raise InputDataError(f"image {url}: size {image.shape} differs from its illumination function's {illum.shape}")
    corrected = np.rint(image.astype(np.float32) / illum)
    return np.clip(corrected, 0, np.iinfo(want).max).astype(want)


# --------------------------------------------------------------------------- checkpoint


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_checkpoint(url: str | None, dest_dir: Path, settings: Settings) -> tuple[Path, str]:
    """Copy the configured checkpoint (local path or URL) into ``dest_dir``; return (path, sha256)."""
    if not url:
        raise CheckpointError(
            "no DeepProfiler checkpoint configured: pass --checkpoint PATH-or-s3-URL (the Cell Painting "
            "CNN .h5, or a seeded test checkpoint from `cpjump1 deep-profiles build-checkpoint`)"
        )
    name = storage.basename(url)
    if not name.endswith((".h5", ".hdf5")) or name.endswith(".weights.h5"):
        raise CheckpointError(
            f"checkpoint {url}: DeepProfiler needs a Keras-2 HDF5 weights file named *.h5 or *.hdf5 "
            "(with .weights.h5 or .keras, Keras ignores by-name loading)"
        )
    if not storage.exists(url, settings):
        raise CheckpointError(f"checkpoint not found: {url}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    local = dest_dir / name
    tmp = dest_dir / f".{name}.part"
    storage.get_file(url, tmp, settings)
    os.replace(tmp, local)
    return local, _sha256(local)


def _worker(settings: Settings, args: list[str], what: str, timeout: float | None = None) -> dict[str, Any]:
    """Run a :mod:`cpjump1.deepprofiler_worker` verb in the DeepProfiler env; its JSON result."""
    python = _dp_python(settings)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise DeepProfilerError(f"{what} failed in the DeepProfiler env (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def _dp_python(settings: Settings) -> str:
    python = settings.deepprofiler_python
    if not Path(python).exists():
        raise DeepProfilerError(
            f"DeepProfiler environment not found: {python} (run `make deepprofiler-env` or set CPJUMP1_DEEPPROFILER_PYTHON)"
        )
    return python


def build_checkpoint(out: str, settings: Settings | None = None, seed: int = 0, channels: int = 5,
                     box_size: int = 96, conv_blocks: int = 0, nested: bool = False) -> dict[str, Any]:
    """Build the small seeded test checkpoint (EfficientNet-B``conv_blocks``, DeepProfiler's layer
    names, weights from ``tf.keras.utils.set_random_seed(seed)``) and store it at ``out``.

    The file says it is a seeded test checkpoint (HDF5 attribute ``cpjump1_provenance``) and
    a ``<out>.provenance.json`` sidecar repeats that with its sha256. The same seed gives a
    byte-identical file. ``nested=True`` writes a deliberately wrong layout (the backbone as
    one nested layer) that DeepProfiler would load silently as nothing; tests use it.
    """
    settings = settings or get_settings()
    with tempfile.TemporaryDirectory(prefix="cpjump1-ckpt-") as tmp:
        local = Path(tmp) / storage.basename(out)
        args = ["build-checkpoint", "--out", str(local), "--seed", str(seed), "--channels", str(channels),
                "--box-size", str(box_size), "--conv-blocks", str(conv_blocks)]
        result = _worker(settings, args + (["--nested"] if nested else []), "building the seeded checkpoint")
        result["sha256"] = _sha256(local)
        result["checkpoint"] = out
        storage.put_file(local, out, settings)
        with storage.atomic_write(out + ".provenance.json", settings, mode="w") as fh:
            json.dump(result, fh, indent=2)
    log.info("seeded test checkpoint (seed %d, %d layers with weights) written to %s", seed,
             result["layers_with_weights"], out)
    return result


def verify_checkpoint(project: Path, exp: str, settings: Settings, gpu: str) -> dict[str, Any]:
    """The checkpoint guard: every backbone layer of the configured model must equal, bit for
    bit, the arrays stored under its name in the file (only the renamed head may be absent)."""
    result = _worker(settings, ["verify", "--root", str(project), "--config", CONFIG_NAME, "--exp", exp,
                                "--gpu", gpu], "checkpoint verification")
    if not result.get("ok"):
        ckpt = result.get("checkpoint")
        if result.get("error"):
            raise CheckpointError(f"checkpoint {ckpt} does not fit the configured model: {result['error']}")
        parts = []
        if result.get("missing_in_file"):
            miss = result["missing_in_file"]
            parts.append(f"{len(miss)} layer(s) absent from the file, which DeepProfiler would silently "
                         f"leave at random initialisation: {', '.join(miss[:8])}{' …' if len(miss) > 8 else ''}")
        if result.get("mismatched"):
            parts.append(f"layer(s) whose loaded weights differ from the file: {', '.join(result['mismatched'][:8])}")
        if result.get("unused_file_layers"):
            parts.append(f"file layers no model layer uses: {', '.join(result['unused_file_layers'][:8])}")
        raise CheckpointError(
            f"checkpoint {ckpt}: only {result.get('matched', 0)} of {result.get('backbone_layers', '?')} backbone "
            f"layers match the file; " + "; ".join(parts)
        )
    return result


# --------------------------------------------------------------------------- project


def default_workdir(batch: str, plate: str, settings: Settings) -> Path:
    """Scratch folder of the DeepProfiler project: under the storage root's ``workspace/`` when
    local (so a rerun resumes), else a local temporary folder."""
    if storage.is_remote(settings.storage_root):
        return Path(tempfile.gettempdir()) / "cpjump1-deepprofiler" / batch / plate
    return Path(storage.join(settings.storage_root, "workspace", "deepprofiler", batch, plate))


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reset_project_if_stale(project: Path, fp: str, force: bool) -> None:
    """Keep the project (and DeepProfiler's per-site resume) only for the same inputs."""
    import shutil

    stamp = project / ".cpjump1-inputs"
    if force or not stamp.exists() or stamp.read_text().strip() != fp:
        for sub in ("inputs", "outputs", "checkpoints"):
            shutil.rmtree(project / sub, ignore_errors=True)
        _write_text_atomic(stamp, fp)


@dataclass
class _Site:
    well: str
    site: int
    key: tuple[str, str, str]  # (plate, well, site) as DeepProfiler formats them
    n_cells: int
    row: int  # position in load_data


def _site_sources(r: Any, channels: list[str]) -> list[tuple[str, str, str]]:
    """(channel, image URL, illumination URL) of one load_data row."""
    return [(ch, storage.join(getattr(r, f"PathName_Orig{ch}"), getattr(r, f"FileName_Orig{ch}")),
             storage.join(getattr(r, f"PathName_Illum{ch}"), getattr(r, f"FileName_Illum{ch}"))) for ch in channels]


def _image_name(well: str, site: int, ch: str) -> str:
    return f"{well}_s{site}_{ch}.tif"


def build_project(batch: str, plate: str, settings: Settings, config: dict[str, Any], project: Path,
                  load_data: pd.DataFrame, centers: pd.DataFrame, counts: dict[tuple[str, int], int],
                  nuclei_files: list[str]) -> tuple[list[_Site], dict[str, Any], list[str]]:
    """Write the DeepProfiler project's ``index.csv``, per-site locations and config.

    The plate's image size is taken from its first image (the others are checked against it
    when they are corrected, see :func:`write_site_images`). Returns the sites to profile,
    the filled-in config and the sites left out because the analysis counted zero nuclei.
    """
    channels = list(config["dataset"]["images"]["channels"])
    bits = int(_extra(config)["bits"])
    box = int(config["dataset"]["locations"]["box_size"])
    groups = {k: g for k, g in centers.groupby(["Metadata_Well", "Metadata_Site"])}
    rows, picked, empty = [], [], []
    for i, r in enumerate(load_data.itertuples(index=False)):
        well, site = str(r.Metadata_Well), int(r.Metadata_Site)
        found = groups.get((well, site))
        if found is None or found.empty:
            if counts.get((well, site)) == 0:
                empty.append(f"{well}-{site}")
                continue
            raise InputDataError(
                f"plate {batch}/{plate}: site {well}-{site} (from {load_data.attrs['source']}) has no nuclei "
                f"locations in {', '.join(nuclei_files)}"
            )
        row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
        row.update({ch: _image_name(well, site, ch) for ch in channels})
        rows.append(row)
        picked.append((i, well, site, found))
    if not rows:
        raise InputDataError(f"plate {batch}/{plate}: no site with nuclei to profile")
    first = load_data.iloc[picked[0][0]]
    _, url0, _ = _site_sources(first, channels)[0]
    image0 = _read_tiff(url0, settings)
    if image0.dtype != np.dtype(f"uint{bits}") or image0.ndim != 2:
        correct_image(image0, np.ones(image0.shape[-2:], np.float32), url0, bits, None)  # raises, naming it
    h, w = image0.shape
    if h < box or w < box:
        raise InputDataError(f"plate {batch}/{plate}: images {w}x{h} (e.g. {url0}) are smaller than the {box}-px crop")

    index = pd.DataFrame(rows)
    index["Metadata_Label"] = plate
    index_path = project / "inputs" / "metadata" / "index.csv"
    _write_text_atomic(index_path, index.to_csv(index=False))
    # DeepProfiler reads index.csv with type inference and formats keys with str(): use the
    # same reading to name the location files and to find the npz files.
    as_read = pd.read_csv(index_path)
    sites = []
    for (i, well, site, found), rr in zip(picked, as_read.itertuples(index=False)):
        xy = found[["Location_Center_X", "Location_Center_Y"]]
        outside = (xy["Location_Center_X"] < 0) | (xy["Location_Center_X"] >= w) | \
                  (xy["Location_Center_Y"] < 0) | (xy["Location_Center_Y"] >= h)
        if outside.any():
            raise InputDataError(
                f"{found['_source'].iloc[0]}: {int(outside.sum())} nuclei centers of site {well}-{site} lie "
                f"outside the {w}x{h} image"
            )
        key = tuple("{}".format(v) for v in (rr.Metadata_Plate, rr.Metadata_Well, rr.Metadata_Site))
        loc = project / "inputs" / "locations" / key[0] / f"{key[1]}-{key[2]}-Nuclei.csv"
        loc_frame = pd.DataFrame({"Nuclei_Location_Center_X": xy["Location_Center_X"].to_numpy(),
                                  "Nuclei_Location_Center_Y": xy["Location_Center_Y"].to_numpy()})
        _write_text_atomic(loc, loc_frame.to_csv(index=False))
        sites.append(_Site(well, site, key, len(loc_frame), i))

    filled = copy.deepcopy({k: v for k, v in config.items() if not k.startswith("_")})
    filled["dataset"]["images"]["height"], filled["dataset"]["images"]["width"] = int(h), int(w)
    filled["dataset"]["metadata"]["label_field"] = "Metadata_Label"
    filled["train"]["partition"]["targets"] = ["Metadata_Label"]
    filled["prepare"]["compression"]["implement"] = False
    return sites, filled, empty


def write_site_images(sites: list[_Site], load_data: pd.DataFrame, settings: Settings, config: dict[str, Any],
                      project: Path, illum_cache: dict[str, np.ndarray], progress: bool, desc: str) -> None:
    """Illumination-correct the five channels of ``sites`` into ``inputs/images/``."""
    import tifffile
    from tqdm import tqdm

    channels = list(config["dataset"]["images"]["channels"])
    bits = int(config["dataset"]["images"].get("bits", 16))
    shape = (int(config["dataset"]["images"]["height"]), int(config["dataset"]["images"]["width"]))
    images_dir = project / "inputs" / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for s in tqdm(sites, disable=not progress, desc=desc, unit="site"):
        r = load_data.iloc[s.row]
        for ch, src, illum_url in _site_sources(r, channels):
            target = images_dir / _image_name(s.well, s.site, ch)
            if target.exists():
                continue  # written atomically by an earlier (interrupted) run of the same inputs
            if illum_url not in illum_cache:
                illum_cache[illum_url] = _read_illum(illum_url, settings)
            corrected = correct_image(_read_tiff(src, settings), illum_cache[illum_url], src, bits, shape)
            tmp = target.with_name(f".{target.name}.tmp")
            tifffile.imwrite(tmp, corrected)
            os.replace(tmp, target)


def _remove_site_images(sites: list[_Site], config: dict[str, Any], project: Path) -> None:
    for s in sites:
        for ch in config["dataset"]["images"]["channels"]:
            (project / "inputs" / "images" / _image_name(s.well, s.site, ch)).unlink(missing_ok=True)


def _npz_path(features_dir: Path, s: _Site) -> Path:
    return features_dir / s.key[0] / s.key[1] / f"{s.key[2]}.npz"


def _drop_broken_npz(features_dir: Path, sites: list[_Site]) -> None:
    """DeepProfiler writes npz files in place and skips sites whose file exists: remove files
    an interrupted run left unreadable so that they are profiled again."""
    for s in sites:
        path = features_dir / s.key[0] / s.key[1] / f"{s.key[2]}.npz"
        if path.exists():
            try:
                with np.load(path, allow_pickle=True) as npz:
                    npz["features"]
            except Exception:
                log.warning("removing unreadable %s from an interrupted run", path)
                path.unlink()


def _run_profile(project: Path, exp: str, settings: Settings, gpu: str, n_sites: int, progress: bool,
                 metadata: str = "index.csv") -> str:
    """``python -m deepprofiler --root … --config … --exp … --gpu … profile`` in the DP env."""
    from tqdm import tqdm

    cmd = [_dp_python(settings), "-m", "deepprofiler", "--root", str(project), "--config", CONFIG_NAME,
           "--exp", exp, "--gpu", gpu, "--metadata", metadata, "profile"]
    log.info("running %s", " ".join(cmd))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    lines: list[str] = []
    bar = tqdm(total=n_sites, disable=not progress, desc="deep-profiles: DeepProfiler profile", unit="site")
    with subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if " cells)" in line or line.startswith("Already done"):
                bar.update(1)
                log.debug("deepprofiler: %s", line.rstrip())
        rc = proc.wait()
    bar.close()
    output = "\n".join(lines)
    if rc != 0:
        tail = "\n".join(lines[-20:])
        raise DeepProfilerError(f"DeepProfiler profile failed (exit {rc}) for project {project}:\n{tail}")
    return output


# --------------------------------------------------------------------------- features


def collect_well_features(project: Path, exp: str, sites: list[_Site], prefix: str) -> tuple[pd.DataFrame, int]:
    """Mean of the single-cell features per well, from DeepProfiler's per-site npz files.

    Checks that every site has its npz (DeepProfiler exits 0 when a site is skipped) and that
    it holds one feature row per nucleus location.
    """
    features_dir = project / "outputs" / exp / "features"
    missing = [s for s in sites if not (features_dir / s.key[0] / s.key[1] / f"{s.key[2]}.npz").exists()]
    if missing:
        names = ", ".join(f"{s.well}-{s.site}" for s in missing[:10])
        raise DeepProfilerError(
            f"DeepProfiler wrote {len(sites) - len(missing)} npz files for {len(sites)} index rows; missing "
            f"sites: {names} (under {features_dir})"
        )
    sums: dict[str, np.ndarray] = {}
    ncell: dict[str, int] = {}
    nsite: dict[str, int] = {}
    total = 0
    for s in sites:
        path = features_dir / s.key[0] / s.key[1] / f"{s.key[2]}.npz"
        with np.load(path, allow_pickle=True) as npz:  # "metadata" is a pickled dict we wrote
            feats = npz["features"].astype(np.float64)
        if feats.ndim != 2 or feats.shape[0] != s.n_cells:
            raise DeepProfilerError(f"{path}: {feats.shape[0] if feats.ndim else 0} feature rows for {s.n_cells} nuclei")
        if not np.isfinite(feats).all():
            raise DeepProfilerError(f"{path}: non-finite features")
        sums[s.well] = sums.get(s.well, 0) + feats.sum(axis=0)
        ncell[s.well] = ncell.get(s.well, 0) + feats.shape[0]
        nsite[s.well] = nsite.get(s.well, 0) + 1
        total += feats.shape[0]
    wells = sorted(sums)
    matrix = np.vstack([sums[w] / ncell[w] for w in wells])
    frame = pd.DataFrame(matrix, columns=[f"{prefix}{i}" for i in range(matrix.shape[1])])
    frame.insert(0, "Metadata_Well", wells)
    frame.insert(1, "Metadata_Count_Cells", [ncell[w] for w in wells])
    frame.insert(2, "Metadata_Count_Sites", [nsite[w] for w in wells])
    return frame, total


def make_profiles(wells: pd.DataFrame, features: list[str], batch: str, plate: str, settings: Settings,
                  allow_missing_wells: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Annotated, negcon-normalized and spherized well profiles, with the profiles stage's own
    functions (:mod:`cpjump1.profiles`: pycytominer ``annotate``; ``normalize`` with
    ``mad_robustize`` fitted on the negative controls; ``spherize``, ZCA-cor fitted on the
    negative controls, as the CPJUMP1 recipe applies to DeepProfiler profiles)."""
    from cpjump1 import profiles

    config = copy.deepcopy(profiles.load_config(settings))
    if allow_missing_wells:
        config["annotate"]["require_all_wells"] = False
    source = f"deep profiles of {batch}/{plate}"
    augmented = profiles.annotate(wells, batch, plate, settings, config=config, source=source)
    query = profiles.negcon_query(config)
    n_neg = int(profiles.negcon_mask(augmented, config, query).sum())
    if n_neg < 2:
        raise InputDataError(f"plate {batch}/{plate}: {n_neg} negative-control well(s) ({query}) profiled; "
                             "normalizing and spherizing need at least 2")
    normalized = profiles.normalize(augmented, samples=query, method="mad_robustize", features=features)
    spherized = profiles.spherize(normalized, samples=query, method="ZCA-cor", features=features)
    for name, frame in (("normalized_negcon", normalized), ("spherized", spherized)):
        values = frame[features].to_numpy()
        if not np.isfinite(values).all():
            bad = [f for f in features if not np.isfinite(frame[f]).all()]
            raise InputDataError(f"plate {batch}/{plate}: {name} deep profiles have non-finite values in "
                                 f"{len(bad)} feature(s), e.g. {', '.join(bad[:5])} (constant over the negative controls?)")
    return augmented, normalized, spherized


def _write_table(frame: pd.DataFrame, url: str, settings: Settings) -> list[str]:
    with storage.atomic_path(url, settings, suffix=".csv.gz") as tmp:
        frame.to_csv(tmp, index=False, float_format=FLOAT_FORMAT, compression="gzip")
    pq = url.removesuffix(".csv.gz") + ".parquet"
    with storage.atomic_path(pq, settings, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)
    return [url, pq]


# --------------------------------------------------------------------------- stage


def output_urls(batch: str, plate: str, settings: Settings) -> dict[str, str]:
    out = storage.Layout(settings.storage_root).deep_profiles_dir(batch, plate)
    urls = {(level.lstrip("_") or "aggregated"): storage.join(out, f"{plate}{level}.csv.gz") for level in LEVELS}
    urls["provenance"] = storage.join(out, "provenance.json")
    return urls


def _default_gpu() -> str:
    # The scheduler's choice, if any (DeepProfiler's --gpu overwrites CUDA_VISIBLE_DEVICES);
    # on a Kubernetes GPU pod the device plugin exposes the granted GPU as device 0.
    return os.environ.get("CUDA_VISIBLE_DEVICES", "0")


def run_deep_profiles(batch: str, plate: str, settings: Settings | None = None, checkpoint: str | None = None,
                      force: bool = False, workdir: str | os.PathLike | None = None, gpu: str | None = None,
                      config_path: str | None = None, keep_images: bool = False,
                      sites_per_chunk: int = 500, allow_missing_wells: bool = False,
                      progress: bool = True) -> DeepProfilesResult:
    """Deep profiles of one plate (see the module docstring for the method).

    Reads ``load_data_with_illum.csv``, the illumination functions and the complete analysis
    shards' ``Nuclei.csv``; writes ``<plate>.csv.gz`` (well means), ``_augmented``,
    ``_normalized_negcon`` and ``_spherized`` (each with a Parquet twin) and
    ``provenance.json`` under ``deep_profiles/<batch>/<plate>/``, then a completion marker.
    Skips when the marker matches the inputs' fingerprint unless ``force``.

    DeepProfiler runs once per chunk of ``sites_per_chunk`` sites (about 15 s start-up each);
    the corrected images of a chunk are deleted after it unless ``keep_images``.
    ``allow_missing_wells`` accepts plates with fewer wells than their plate map (synthetic
    demo plates), as ``cpjump1 profiles --allow-missing-wells`` does.
    """
    settings = settings or get_settings()
    started = time.time()
    checkpoint = checkpoint or getattr(settings, "deepprofiler_checkpoint", None)
    config = load_config(settings, config_path)
    extra = _extra(config)
    channels = list(config["dataset"]["images"]["channels"])
    layout = storage.Layout(settings.storage_root)
    out_dir = layout.deep_profiles_dir(batch, plate)
    urls = output_urls(batch, plate, settings)

    load_data = read_load_data(batch, plate, settings, channels)
    centers, counts, nuclei_files = read_locations(batch, plate, settings)
    if not checkpoint:
        fetch_checkpoint(checkpoint, Path(tempfile.gettempdir()), settings)  # raises the clear error
    if not storage.exists(checkpoint, settings):
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    fp = storage.fingerprint(
        STAGE, STAGE_VERSION, batch, plate, config,
        storage.file_digest(load_data.attrs["source"], settings),
        [storage.file_digest(f, settings) for f in nuclei_files],
        storage.file_stamp(checkpoint, settings), checkpoint,
    )
    if not force and storage.marker_matches(out_dir, fp, settings):
        log.info("deep profiles of %s/%s are complete for these inputs; skipping", batch, plate)
        return DeepProfilesResult(batch, plate, urls, skipped=True,
                                  provenance=json.loads(storage.read_text(urls["provenance"], settings)))

    project = Path(workdir) if workdir else default_workdir(batch, plate, settings)
    gpu = gpu if gpu is not None else _default_gpu()
    _reset_project_if_stale(project, fp, force)
    timings: dict[str, float] = {"correct_images": 0.0, "deepprofiler_profile": 0.0}
    t0 = time.time()
    sites, filled, empty = build_project(batch, plate, settings, config, project, load_data, centers, counts,
                                         nuclei_files)
    config_fp = storage.fingerprint(filled)[:8]
    staging = project / "checkpoints"
    local_ckpt, sha = fetch_checkpoint(checkpoint, staging, settings)
    exp = f"cpjump1-{sha[:12]}-{config_fp}"
    ckpt_dir = project / "outputs" / exp / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    os.replace(local_ckpt, ckpt_dir / local_ckpt.name)
    filled["profile"]["checkpoint"] = local_ckpt.name
    _write_text_atomic(project / "inputs" / "config" / CONFIG_NAME, json.dumps(filled, indent=2))
    timings["prepare_project"] = time.time() - t0

    # The guard needs only index.csv, config and checkpoint: run it before the heavy work.
    t0 = time.time()
    guard = verify_checkpoint(project, exp, settings, gpu)
    timings["checkpoint_guard"] = time.time() - t0
    log.info("checkpoint guard: %d of %d backbone layers of the model equal the file %s bit for bit",
             guard["matched"], guard["backbone_layers"], checkpoint)

    # Profile in chunks of sites so that the corrected images of a whole plate (~40 GB for
    # 3456 sites of 1080x1080 x 5 channels) never sit on the scratch disk at once.
    features_dir = project / "outputs" / exp / "features"
    _drop_broken_npz(features_dir, sites)
    todo = [s for s in sites if not _npz_path(features_dir, s).exists()]
    index_text = (project / "inputs" / "metadata" / "index.csv").read_text().splitlines()
    position = {id(s): i for i, s in enumerate(sites)}
    illum_cache: dict[str, np.ndarray] = {}
    chunks = [todo[i:i + sites_per_chunk] for i in range(0, len(todo), max(1, sites_per_chunk))]
    for c, chunk in enumerate(chunks):
        desc = f"deep-profiles {plate}: correct images ({c + 1}/{len(chunks)})"
        t0 = time.time()
        write_site_images(chunk, load_data, settings, filled, project, illum_cache, progress, desc)
        timings["correct_images"] += time.time() - t0
        name = f"index-chunk{c:04d}.csv"
        body = [index_text[0]] + [index_text[1 + position[id(s)]] for s in chunk]
        _write_text_atomic(project / "inputs" / "metadata" / name, "\n".join(body) + "\n")
        t0 = time.time()
        _run_profile(project, exp, settings, gpu, len(chunk), progress, metadata=name)
        timings["deepprofiler_profile"] += time.time() - t0
        if not keep_images:
            _remove_site_images(chunk, filled, project)
    t0 = time.time()

    wells, n_cells = collect_well_features(project, exp, sites, extra["feature_prefix"])
    feats = [c for c in wells.columns if c.startswith(extra["feature_prefix"])]
    kind = SEEDED_LABEL if (guard.get("provenance") or {}).get("kind") == SEEDED_LABEL else USER_LABEL
    label = f"{storage.basename(checkpoint)}@sha256:{sha[:12]}"
    wells.insert(0, "Metadata_Plate", plate)
    meta_cols = {"Metadata_Model": f"efficientnet-b{filled['train']['model']['params']['conv_blocks']}:"
                                   f"{filled['profile']['feature_layer']}",
                 "Metadata_Model_Checkpoint": label, "Metadata_Model_Checkpoint_Kind": kind}
    for i, (k, v) in enumerate(meta_cols.items()):
        wells.insert(2 + i, k, v)

    augmented, normalized, spherized = make_profiles(wells, feats, batch, plate, settings, allow_missing_wells)
    written: list[str] = []
    for level, frame in zip(LEVELS, (wells, augmented, normalized, spherized)):
        written += _write_table(frame, storage.join(out_dir, f"{plate}{level}.csv.gz"), settings)

    provenance = {
        "stage": STAGE, "batch": batch, "plate": plate,
        "checkpoint": checkpoint, "checkpoint_sha256": sha, "checkpoint_kind": kind,
        "checkpoint_provenance": guard.get("provenance"),
        "guard": {k: guard.get(k) for k in ("matched", "backbone_layers", "missing_in_file", "mismatched",
                                             "unused_file_layers")},
        "deepprofiler": "0.5.1", "experiment": exp, "gpu": gpu,
        "feature_layer": filled["profile"]["feature_layer"], "box_size": filled["dataset"]["locations"]["box_size"],
        "channels": channels, "image_size": [filled["dataset"]["images"]["width"], filled["dataset"]["images"]["height"]],
        "sites": len(sites), "cells": n_cells, "wells": len(wells), "empty_sites": empty,
        "features": len(feats), "aggregation": extra["aggregation"],
        "project": str(project), "chunks": len(chunks), "sites_per_chunk": sites_per_chunk,
        "config": filled,
    }
    timings["aggregate_normalize_write"] = time.time() - t0
    provenance["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    with storage.atomic_write(urls["provenance"], settings, mode="w") as fh:
        json.dump(provenance, fh, indent=2, default=str)
    storage.write_marker(out_dir, fp, settings, outputs=written, checkpoint_kind=kind)
    seconds = time.time() - started
    log.info("deep profiles of %s/%s: %d sites, %d cells, %d wells in %.1f s (%s)", batch, plate, len(sites),
             n_cells, len(wells), seconds, kind)
    return DeepProfilesResult(batch, plate, urls, skipped=False, sites=len(sites), cells=n_cells,
                              seconds=seconds, provenance=provenance)


def load_for_validation(batch: str, plate: str, settings: Settings) -> list:
    """Tables for ``cpjump1 validate --stage deep_profiles``: the annotated well means
    (``_augmented``) and the spherized profiles (Parquet twins), with the suite parameters
    taken from ``provenance.json``."""
    from cpjump1.validation import ValidationInput

    urls = output_urls(batch, plate, settings)
    try:
        prov = json.loads(storage.read_text(urls["provenance"], settings))
    except FileNotFoundError as exc:
        raise InputDataError(f"plate {batch}/{plate}: no deep profiles yet ({urls['provenance']} missing)") from exc
    params = {"plates": [plate], "wells": prov["wells"], "min_columns": prov["features"] + 4}
    items = []
    for name in ("augmented", "spherized"):
        pq = urls[name].removesuffix(".csv.gz") + ".parquet"
        with storage.open_file(pq, "rb", settings) as fh:
            frame = pd.read_parquet(fh)
        items.append(ValidationInput(df=frame, parameters={**params, "file": pq}, suite="deep_profiles",
                                     row_id_columns=("Metadata_Plate", "Metadata_Well")))
    return items


# --------------------------------------------------------------------------- CLI


@click.group("deep-profiles", invoke_without_command=True)
@click.option("--batch", help="Batch name, e.g. 2020_11_04_CPJUMP1.")
@click.option("--plate", help="Plate barcode, e.g. BR00117010.")
@click.option("--checkpoint", help="Model checkpoint (.h5/.hdf5): local path or s3:// URL.")
@click.option("--storage-root", default=None, help="Override CPJUMP1_STORAGE_ROOT.")
@click.option("--workdir", default=None, help="Scratch folder for the DeepProfiler project.")
@click.option("--gpu", default=None, help="GPU id passed to DeepProfiler (default: CUDA_VISIBLE_DEVICES or 0).")
@click.option("--sites-per-chunk", default=500, show_default=True, type=int,
              help="Sites per DeepProfiler run (bounds the corrected images on scratch disk).")
@click.option("--allow-missing-wells", is_flag=True, help="Accept plates with fewer wells than their plate map.")
@click.option("--keep-images", is_flag=True, help="Keep the illumination-corrected images in the workdir.")
@click.option("--force", is_flag=True, help="Recompute even when the outputs are complete.")
@click.pass_context
def command(ctx, batch, plate, checkpoint, storage_root, workdir, gpu, sites_per_chunk, allow_missing_wells,
            keep_images, force) -> None:
    """DeepProfiler features → well profiles → spherized profiles for one plate."""
    if ctx.invoked_subcommand is not None:
        return
    if not batch or not plate:
        raise click.UsageError("--batch and --plate are required (or use a sub-command: build-checkpoint)")
    settings = get_settings(storage_root=storage_root)
    result = run_deep_profiles(batch, plate, settings, checkpoint=checkpoint, force=force, workdir=workdir,
                               gpu=gpu, sites_per_chunk=sites_per_chunk, allow_missing_wells=allow_missing_wells,
                               keep_images=keep_images, progress=sys.stderr.isatty())
    state = "complete, skipped" if result.skipped else f"{result.sites} sites, {result.cells} cells"
    click.echo(f"deep profiles {batch}/{plate}: {state}")
    for name, url in result.outputs.items():
        click.echo(f"  {name}: {url}")


@command.command("build-checkpoint")
@click.option("--out", required=True, help="Where to store the checkpoint (.h5): local path or s3:// URL.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--channels", default=5, show_default=True, type=int)
@click.option("--box-size", default=96, show_default=True, type=int)
@click.option("--conv-blocks", default=0, show_default=True, type=int, help="EfficientNet variant (0 = B0).")
def build_checkpoint_command(out, seed, channels, box_size, conv_blocks) -> None:
    """Build the small seeded TEST checkpoint (not the Cell Painting CNN)."""
    result = build_checkpoint(out, get_settings(), seed=seed, channels=channels, box_size=box_size,
                              conv_blocks=conv_blocks)
    click.echo(f"{out}: {SEEDED_LABEL}; seed {seed}, {result['layers_with_weights']} layers, "
               f"{result['params']} parameters, sha256 {result['sha256'][:16]}…")
