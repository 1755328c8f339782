"""Synthetic Cell Painting plates in the real Harmony (PerkinElmer Phenix) layout.

``cpjump1 synthesize`` writes ``<images root>/<batch>/images/<plate>/Images/`` holding one
16-bit TIFF per site and channel, named as the Phenix names them
(``r01c01f01p01-ch1sk1fk1fl1.tiff``), and an ``Index.idx.xml`` in the schema of the Harmony
V5 export (the one in ``pe2loaddata``'s test data), plus ``synthetic.json`` beside ``Images/``
that records the expected image count and the generator's parameters.

What the images show (the Cell Painting assay, Bray et al. 2016, Nature Protocols 11:1757):

* ch5 Hoechst 33342 (DNA): nuclei with chromatin texture;
* ch4 Alexa 488 (ER): a perinuclear reticular network fading towards the cell edge;
* ch3 Alexa 488 long (RNA): nucleoli inside nuclei and diffuse cytoplasmic RNA;
* ch2 Alexa 568 (AGP: actin, Golgi, plasma membrane): bright cell borders, stress fibres
  and a perinuclear Golgi patch;
* ch1 Alexa 647 (Mito): punctate mitochondria concentrated around the nucleus;
* ch6-8 bright-field at three focal planes (low-z, mid, high-z): low-contrast outlines,
  blurred differently per plane.

Every channel is multiplied by a smooth, channel-specific illumination field (vignetting,
so that the illum stage has something to correct), sits on a camera offset, and carries
shot and read noise.

Perturbations change appearance reproducibly: each ``broad_sample`` of the plate map gets a
fixed *phenotype* (nucleus size, cell size, cell count and per-channel intensity and texture
changes) derived from a hash of its identity, independent of ``--seed`` (the seed draws only
cell placement and noise), so replicate wells on different plates resemble each other and
the benchmark finds real signal. Compounds share a component of their phenotype with the
CRISPR and ORF perturbations of their target gene, so compound-gene matching has signal too.
Negative controls (DMSO, non-targeting guides, control ORFs) have no phenotype.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape

import click
import numpy as np
import tifffile
from scipy import ndimage
from tqdm import tqdm

from cpjump1 import storage
from cpjump1.catalog import Well, load_catalog
from cpjump1.errors import Cpjump1Error
from cpjump1.settings import Settings, get_settings

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
PIXEL_SIZE_M = 5.979760809567617e-07  # Phenix 20x, binning 2 (from the Harmony index)


@dataclass(frozen=True)
class Channel:
    number: int
    name: str  # Harmony ChannelName
    dye_channel: str  # CellProfiler channel name (without the Orig prefix)
    excitation: int
    emission: int
    channel_type: str


#: The CPJUMP1 channels (DESIGN.md; wavelengths as in the Harmony index of a JUMP Phenix plate).
CHANNELS: tuple[Channel, ...] = (
    Channel(1, "Alexa 647", "Mito", 640, 706, "Fluorescence"),
    Channel(2, "Alexa 568", "AGP", 561, 599, "Fluorescence"),
    Channel(3, "488 long", "RNA", 488, 599, "Fluorescence"),
    Channel(4, "Alexa 488", "ER", 488, 522, "Fluorescence"),
    Channel(5, "HOECHST 33342", "DNA", 405, 456, "Fluorescence"),
    Channel(6, "LowZBF", "LowZBF", 740, 0, "Brightfield"),
    Channel(7, "Brightfield", "Brightfield", 740, 0, "Brightfield"),
    Channel(8, "HighZBF", "HighZBF", 740, 0, "Brightfield"),
)
FLUORESCENT = ("DNA", "ER", "RNA", "AGP", "Mito")

#: Phenotype axes: each perturbation moves cells along these (0 = unperturbed).
AXES = (
    "nucleus_size",
    "cell_size",
    "cell_count",
    "dna_intensity",
    "chromatin_texture",
    "er_intensity",
    "er_texture",
    "rna_intensity",
    "nucleoli",
    "agp_intensity",
    "agp_edges",
    "fibres",
    "mito_intensity",
    "mito_puncta",
    "elongation",
    "golgi",
)


def _hash_rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=len(AXES))
    return v / np.linalg.norm(v)


def phenotype(well: Well, targets: dict[str, str]) -> np.ndarray:
    """The fixed phenotype vector of a well's perturbation (zeros for negative controls).

    Identity-hashed, so the same perturbation looks the same on every plate and every seed.
    """
    if not well.broad_sample or well.control_type == "negcon":
        return np.zeros(len(AXES))
    own = _unit(_hash_rng("sample", well.broad_sample))
    gene = well.gene or targets.get(well.broad_sample, "") or well.target
    if gene:
        shared = _unit(_hash_rng("gene", gene.split("|")[0]))
        direction = 0.6 * shared + 0.8 * own
        direction /= np.linalg.norm(direction)
    else:
        direction = own
    # Strength: a heavy tail, so some perturbations are strong and many are subtle;
    # positive controls are strong by design.
    strength = float(_hash_rng("strength", well.broad_sample).gamma(2.0, 0.25))
    if well.control_type.startswith("poscon"):
        strength = max(strength, 0.8)
    return np.clip(direction * strength, -0.9, 0.9)


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return field / (field.std() + 1e-6)


def _illumination(size: int, channel: Channel, plate: str) -> np.ndarray:
    """A smooth vignetting field in [~0.55, 1] with a channel-specific off-centre peak."""
    rng = _hash_rng("illum", plate, channel.number)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    cx, cy = rng.uniform(-0.15, 0.15, size=2)
    a, b = rng.uniform(0.9, 1.6, size=2)
    field = 1.0 - 0.45 * (a * (x - cx) ** 2 + b * (y - cy) ** 2) / 0.5
    field += 0.04 * np.sin(2 * np.pi * (x * rng.uniform(0.5, 1.5) + y * rng.uniform(0.5, 1.5)))
    return np.clip(field, 0.5, 1.05).astype(np.float32)


def render_site(
    size: int,
    pheno: np.ndarray,
    rng: np.random.Generator,
    plate: str,
) -> dict[str, np.ndarray]:
    """Render one site: a dict channel name -> uint16 image."""
    p = dict(zip(AXES, pheno))
    shape = (size, size)
    # Physical scale as on the Phenix at 20x: nuclei ~10-14 px radius, cells ~2.3x larger.
    nuc_r = 11.0 * (1 + 0.35 * p["nucleus_size"])
    cell_r = nuc_r * 2.3 * (1 + 0.3 * p["cell_size"])
    density = 0.55 / (np.pi * cell_r**2)  # ~55 % confluence, as for U2OS at 48 h
    expected = density * size * size * (1 + 0.5 * p["cell_count"])
    n_cells = max(1, int(rng.poisson(max(expected, 1.0))))

    # Place nuclei with a minimum spacing (dart throwing).
    centers: list[tuple[float, float]] = []
    min_d = nuc_r * 2.4
    for _ in range(n_cells * 30):
        if len(centers) >= n_cells:
            break
        c = rng.uniform(0, size, size=2)
        if all((c[0] - a) ** 2 + (c[1] - b) ** 2 >= min_d**2 for a, b in centers):
            centers.append((float(c[0]), float(c[1])))
    k = len(centers)
    cy = np.array([c[0] for c in centers])
    cx = np.array([c[1] for c in centers])

    # Nearest-centre territories (Voronoi) and per-pixel offsets from the own centre.
    seeds = np.ones(shape, dtype=bool)
    iy = np.clip(cy.astype(int), 0, size - 1)
    ix = np.clip(cx.astype(int), 0, size - 1)
    seeds[iy, ix] = False
    label_at = np.full(shape, -1, dtype=np.int32)
    label_at[iy, ix] = np.arange(k)
    _, (ny, nx) = ndimage.distance_transform_edt(seeds, return_indices=True)
    owner = label_at[ny, nx]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy = yy - cy[owner]
    dx = xx - cx[owner]
    theta = np.arctan2(dy, dx)
    dist = np.hypot(dy, dx)

    # Per-cell shape: orientation, elongation and two harmonics of the outline.
    orient = rng.uniform(0, np.pi, k)
    elong = np.clip(1.0 + rng.gamma(2.0, 0.08, k) + 0.25 * p["elongation"], 0.8, 2.2)
    h2, h3 = rng.normal(0, 0.08, (2, k))
    ph2, ph3 = rng.uniform(0, 2 * np.pi, (2, k))
    size_jit = rng.normal(1.0, 0.08, k).clip(0.75, 1.3)
    rel = theta - orient[owner]
    ellipse = 1.0 / np.sqrt(np.cos(rel) ** 2 / elong[owner] ** 2 + np.sin(rel) ** 2)
    ellipse *= np.sqrt(elong[owner])  # keep area roughly constant
    outline = 1 + h2[owner] * np.cos(2 * theta + ph2[owner]) + h3[owner] * np.cos(3 * theta + ph3[owner])
    r_cell = cell_r * size_jit[owner] * outline * ellipse
    r_nuc = nuc_r * size_jit[owner] * np.sqrt(ellipse) * (1 + 0.5 * (outline - 1))
    cell = dist < r_cell
    nucleus = dist < r_nuc
    cyto = cell & ~nucleus
    # Soft profiles for smooth edges.
    nuc_soft = ndimage.gaussian_filter(nucleus.astype(np.float32), 0.8)
    cell_soft = ndimage.gaussian_filter(cell.astype(np.float32), 1.2)
    frac = np.clip(dist / np.maximum(r_cell, 1e-3), 0, 1)  # 0 at centre -> 1 at cell border
    border = cell_soft * np.exp(-(((1 - frac) * r_cell) ** 2) / (2 * 2.0**2))
    perinuclear = cyto * np.exp(-((frac - r_nuc / np.maximum(r_cell, 1e-3)) ** 2) / 0.08)
    brightness = rng.lognormal(0, 0.15, k).astype(np.float32)[owner]  # cell-to-cell variation

    img: dict[str, np.ndarray] = {}
    # DNA: chromatin texture, brighter rims.
    chrom = 1 + 0.25 * (1 + p["chromatin_texture"]) * _smooth_noise(rng, shape, 1.5)
    img["DNA"] = 9000 * (1 + 0.5 * p["dna_intensity"]) * nuc_soft * chrom * brightness
    # ER: reticular, perinuclear.
    reticulum = np.clip(1 + 0.6 * (1 + p["er_texture"]) * _smooth_noise(rng, shape, 1.0), 0, None)
    img["ER"] = 3500 * (1 + 0.5 * p["er_intensity"]) * (0.4 * cyto + 1.2 * perinuclear) * reticulum * brightness
    img["ER"] += 1200 * nuc_soft * 0.3
    # RNA: nucleoli (bright spots inside nuclei) + diffuse cytoplasm.
    spots = np.zeros(shape, np.float32)
    n_spots = int(max(1, 3 * (1 + p["nucleoli"]))) * k
    sy = np.clip((cy[rng.integers(0, k, n_spots)] + rng.normal(0, nuc_r * 0.4, n_spots)).astype(int), 0, size - 1)
    sx = np.clip((cx[rng.integers(0, k, n_spots)] + rng.normal(0, nuc_r * 0.4, n_spots)).astype(int), 0, size - 1)
    spots[sy, sx] = 1.0
    spots = ndimage.gaussian_filter(spots, 1.6) * 2 * np.pi * 1.6**2 * nucleus
    img["RNA"] = (2000 * cyto * (1 + 0.3 * _smooth_noise(rng, shape, 3)) + 700 * nuc_soft + 9000 * spots) * (
        1 + 0.5 * p["rna_intensity"]
    ) * brightness
    # AGP: membrane, stress fibres oriented with the cell, perinuclear Golgi.
    # Stress fibres: noise smeared along the dominant cell axis (anisotropic Gaussian).
    axis_sigma = (0.7, 6.0) if abs(np.cos(orient.mean())) > 0.5 else (6.0, 0.7)
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), axis_sigma)
    fibres = np.clip(fibres / (fibres.std() + 1e-6), 0, None)
    golgi = perinuclear * np.clip(_smooth_noise(rng, shape, 2.0), 0, None)
    img["AGP"] = (
        2500 * (1 + 0.6 * p["agp_edges"]) * border
        + 900 * (1 + 0.6 * p["fibres"]) * fibres * cyto
        + 1500 * (1 + 0.6 * p["golgi"]) * golgi
        + 300 * cyto
    ) * (1 + 0.4 * p["agp_intensity"]) * brightness
    # Mito: puncta concentrated near the nucleus.
    puncta = np.clip(_smooth_noise(rng, shape, 0.9 * (1 + 0.4 * p["mito_puncta"])) + 0.2, 0, None)
    img["Mito"] = 4000 * (1 + 0.5 * p["mito_intensity"]) * (0.3 * cyto + perinuclear) * puncta * brightness
    # Bright-field planes: phase-like outlines, defocus differs per plane.
    edges = ndimage.gaussian_gradient_magnitude(cell_soft + 0.6 * nuc_soft, 1.0)
    for name, sigma, sign in (("LowZBF", 3.0, -1.0), ("Brightfield", 1.0, 1.0), ("HighZBF", 3.0, 1.0)):
        img[name] = 8000 + sign * 6000 * ndimage.gaussian_filter(edges, sigma) + 300 * ndimage.gaussian_filter(
            cyto.astype(np.float32), sigma
        )

    out: dict[str, np.ndarray] = {}
    for ch in CHANNELS:
        signal = img[ch.dye_channel].astype(np.float32)
        if ch.channel_type == "Fluorescence":
            signal = signal * _illumination(size, ch, plate)
            offset = 500.0
            signal = rng.poisson(np.clip(signal, 0, None) / 4.0).astype(np.float32) * 4.0  # shot noise
        else:
            offset = 0.0
        noisy = signal + offset + rng.normal(0, 12.0, shape).astype(np.float32)
        out[ch.dye_channel] = np.clip(noisy, 0, 65535).astype(np.uint16)
    return out


# --------------------------------------------------------------------------- the plate


def choose_wells(wells: list[Well], n: int) -> list[Well]:
    """``n`` wells of the plate map: about a quarter negative controls, the rest treated wells
    spread over the plate (every (384 // n)-th), all in plate order. Deterministic."""
    if n >= len(wells):
        return list(wells)
    negcon = [w for w in wells if w.is_negcon]
    treated = [w for w in wells if not w.is_negcon and w.broad_sample]
    n_neg = min(len(negcon), max(1, n // 4)) if n > 1 else 0
    n_trt = n - n_neg
    pick = lambda pool, m: [pool[int(i * len(pool) / m)] for i in range(m)] if m else []  # noqa: E731
    chosen = pick(negcon, n_neg) + pick(treated, n_trt)
    return sorted(chosen, key=lambda w: (w.row, w.col))


def _site_positions(sites: int, size: int) -> list[tuple[float, float]]:
    """Field positions (m) on a square grid centred on the well, as the Phenix lays them out."""
    side = int(np.ceil(np.sqrt(sites)))
    step = size * PIXEL_SIZE_M * 1.05
    out = []
    for i in range(sites):
        r, c = divmod(i, side)
        out.append(((c - (side - 1) / 2) * step, -(r - (side - 1) / 2) * step))
    return out


def tiff_name(row: int, col: int, site: int, channel: int) -> str:
    return f"r{row:02d}c{col:02d}f{site:02d}p01-ch{channel}sk1fk1fl1.tiff"


def _image_xml(
    row: int, col: int, site: int, ch: Channel, size: int, pos: tuple[float, float], when: dt.datetime
) -> str:
    fields = [
        ("id", f"{row:02d}{col:02d}K1F{site}P1R{ch.number}"),
        ("State", "Ok"),
        ("URL", tiff_name(row, col, site, ch.number)),
        ("Row", row),
        ("Col", col),
        ("FieldID", site),
        ("PlaneID", 1),
        ("TimepointID", 0),
        ("ChannelID", ch.number),
        ("FlimID", 1),
        ("ChannelName", ch.name),
        ("ImageType", "Signal"),
        ("AcquisitionType", "NonConfocal"),
        ("IlluminationType", "Epifluorescence" if ch.channel_type == "Fluorescence" else "Transmitted"),
        ("ChannelType", ch.channel_type),
        ("ImageResolutionX", PIXEL_SIZE_M, "m"),
        ("ImageResolutionY", PIXEL_SIZE_M, "m"),
        ("ImageSizeX", size),
        ("ImageSizeY", size),
        ("BinningX", 2),
        ("BinningY", 2),
        ("MaxIntensity", 65535),
        ("CameraType", "AndorZylaCam"),
        ("PositionX", f"{pos[0]:.6g}", "m"),
        ("PositionY", f"{pos[1]:.6g}", "m"),
        ("PositionZ", {"LowZBF": "-1.1E-05", "HighZBF": "1E-06"}.get(ch.dye_channel, "-5E-06"), "m"),
        ("AbsPositionZ", "0.134611905", "m"),
        ("MeasurementTimeOffset", 0, "s"),
        ("AbsTime", when.isoformat(timespec="milliseconds")),
        ("MainExcitationWavelength", ch.excitation, "nm"),
        ("MainEmissionWavelength", ch.emission, "nm"),
        ("ObjectiveMagnification", 20, ""),
        ("ObjectiveNA", 1, ""),
        ("ExposureTime", 0.01, "s"),
        ("OrientationMatrix", "[[0.979062,0,0,-8.8],[0,-0.979062,0,39.9],[0,0,1.00,5.671]]"),
    ]
    lines = ['    <Image Version="1">']
    for f in fields:
        name, value = f[0], f[1]
        unit = f' Unit="{f[2]}"' if len(f) > 2 else ""
        lines.append(f"      <{name}{unit}>{escape(str(value))}</{name}>")
    lines.append("    </Image>")
    return "\n".join(lines)


def index_xml(plate: str, wells: list[Well], sites: int, size: int, seed: int) -> str:
    """A Harmony V5 ``Index.idx.xml`` listing every image of the synthetic plate."""
    start = dt.datetime(2020, 11, 4, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    measurement = uuid.uuid5(uuid.NAMESPACE_URL, f"cpjump1-synthetic/{plate}/{seed}")
    positions = _site_positions(sites, size)
    well_ids = [f"{ord(w.row) - 64:02d}{w.col:02d}" for w in wells]
    out = [
        '<?xml version="1.0" encoding="utf-8"?>',
        '<EvaluationInputData xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" Version="1" '
        'xmlns="http://www.perkinelmer.com/PEHH/HarmonyV5">',
        "  <User>cpjump1-synthetic</User>",
        "  <InstrumentType>Phenix</InstrumentType>",
        "  <Plates>",
        "    <Plate>",
        f"      <PlateID>{escape(plate)}</PlateID>",
        f"      <MeasurementID>{measurement}</MeasurementID>",
        f"      <MeasurementStartTime>{start.isoformat()}</MeasurementStartTime>",
        f"      <Name>{escape(plate)}</Name>",
        "      <PlateTypeName>384 PerkinElmer CellCarrier Ultra</PlateTypeName>",
        "      <PlateRows>16</PlateRows>",
        "      <PlateColumns>24</PlateColumns>",
        *[f'      <Well id="{wid}" />' for wid in well_ids],
        "    </Plate>",
        "  </Plates>",
        "  <Wells>",
    ]
    for w, wid in zip(wells, well_ids):
        out += ["    <Well>", f"      <id>{wid}</id>", f"      <Row>{ord(w.row) - 64}</Row>", f"      <Col>{w.col}</Col>"]
        out += [
            f'      <Image id="{wid}K1F{s}P1R{ch.number}" />' for s in range(1, sites + 1) for ch in CHANNELS
        ]
        out.append("    </Well>")
    out += ["  </Wells>", "  <Maps>", "    <Map>"]
    for ch in CHANNELS:
        out += [
            f'      <Entry ChannelID="{ch.number}">',
            f"        <ChannelName>{escape(ch.name)}</ChannelName>",
            "      </Entry>",
        ]
    out += ["    </Map>", "  </Maps>", "  <Images>"]
    i = 0
    for w in wells:
        for s in range(1, sites + 1):
            for ch in CHANNELS:
                when = start + dt.timedelta(seconds=0.5 * i)
                out.append(_image_xml(ord(w.row) - 64, w.col, s, ch, size, positions[s - 1], when))
                i += 1
    out += ["  </Images>", "</EvaluationInputData>", ""]
    return "\n".join(out)


def plate_folder(settings: Settings, batch: str, plate: str) -> str:
    return storage.join(settings.resolved_images_root, batch, "images", plate)


def run_synthesize(
    batch: str,
    plate: str,
    settings: Settings | None = None,
    wells: int = 4,
    sites: int = 2,
    size: int = 512,
    seed: int = 0,
    well_names: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> str:
    """Write a synthetic plate; returns its folder. Skips when an identical plate is complete."""
    settings = settings or get_settings()
    cat = load_catalog(settings.metadata_dir)
    plate_rec = cat.plate(batch, plate)  # validates batch and plate
    all_wells = cat.wells(batch, plate)
    if well_names:
        by_name = {w.well: w for w in all_wells}
        unknown = [n for n in well_names if n not in by_name]
        if unknown:
            raise Cpjump1Error(f"plate {plate_rec.key}: wells not in plate map {plate_rec.plate_map}: {unknown}")
        chosen = [by_name[n] for n in well_names]
    else:
        if not 1 <= wells <= 384:
            raise Cpjump1Error(f"--wells must be between 1 and 384, got {wells}")
        chosen = choose_wells(all_wells, wells)
    if not 1 <= sites <= 16:
        raise Cpjump1Error(f"--sites must be between 1 and 16, got {sites}")
    if not 64 <= size <= 2160:
        raise Cpjump1Error(f"--size must be between 64 and 2160 pixels, got {size}")

    folder = plate_folder(settings, batch, plate)
    images_dir = storage.join(folder, "Images")
    manifest = {
        "generator": "cpjump1.synthetic",
        "generator_version": GENERATOR_VERSION,
        "batch": batch,
        "plate": plate,
        "plate_map": plate_rec.plate_map,
        "wells": [w.well for w in chosen],
        "sites": sites,
        "size": size,
        "seed": seed,
        "channels": [c.dye_channel for c in CHANNELS],
        "expected_images": len(chosen) * sites * len(CHANNELS),
    }
    manifest_url = storage.join(folder, "synthetic.json")
    if not force and storage.exists(manifest_url, settings):
        try:
            old = json.loads(storage.read_text(manifest_url, settings))
        except json.JSONDecodeError:
            old = None
        if old == manifest:
            log.info("synthetic plate %s/%s is complete; skipping", batch, plate)
            return folder

    targets = {}
    if plate_rec.perturbation == "compound":
        tl = cat.compound_targets()
        targets = dict(zip(tl.broad_sample, tl.target_list))
    log.info(
        "synthesizing %s/%s: %d wells x %d sites x %d channels at %d px",
        batch, plate, len(chosen), sites, len(CHANNELS), size,
    )
    plate_offset = _hash_rng("plate", batch, plate, seed).normal(0, 0.03, len(AXES))
    tasks = [(w, s) for w in chosen for s in range(1, sites + 1)]
    for w, s in tqdm(tasks, desc=f"{plate} sites", unit="site", disable=not progress):
        pheno = phenotype(w, targets)
        well_rng = _hash_rng("well", batch, plate, w.well, seed)
        well_pheno = pheno + plate_offset + well_rng.normal(0, 0.04, len(AXES))
        rng = _hash_rng("site", batch, plate, w.well, s, seed)
        channels = render_site(size, well_pheno, rng, plate)
        for ch in CHANNELS:
            url = storage.join(images_dir, tiff_name(ord(w.row) - 64, w.col, s, ch.number))
            buf = io.BytesIO()
            tifffile.imwrite(buf, channels[ch.dye_channel], photometric="minisblack")
            with storage.atomic_write(url, settings) as fh:
                fh.write(buf.getvalue())
    with storage.atomic_write(storage.join(images_dir, "Index.idx.xml"), settings, mode="w") as fh:
        fh.write(index_xml(plate, chosen, sites, size, seed))
    with storage.atomic_write(manifest_url, settings, mode="w") as fh:
        json.dump(manifest, fh, indent=2)
    return folder


@click.command("synthesize")
@click.option("--batch", required=True, help="CPJUMP1 batch (see `cpjump1 catalog`).")
@click.option("--plate", required=True, help="Plate barcode in that batch.")
@click.option("--wells", default=4, show_default=True, help="Number of wells (chosen from the plate map).")
@click.option("--well", "well_names", multiple=True, help="Explicit well(s), e.g. --well A01 --well A02.")
@click.option("--sites", default=2, show_default=True, help="Sites (fields) per well.")
@click.option("--size", default=512, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed for placement and noise.")
@click.option("--images-root", default=None, help="Where to write (default: settings).")
@click.option("--force", is_flag=True, help="Rewrite even when an identical plate exists.")
def command(batch, plate, wells, well_names, sites, size, seed, images_root, force):
    """Write a synthetic Cell Painting plate in the Harmony layout."""
    settings = get_settings(images_root=images_root)
    folder = run_synthesize(
        batch, plate, settings, wells=wells, sites=sites, size=size, seed=seed,
        well_names=list(well_names) or None, force=force,
    )
    click.echo(folder)
