"""Tiny Harmony-style plates for the load_data / validation tests and the benchmark.

A plate folder holds ``Images/`` with ``rRRcCCfFFp01-chNsk1fk1fl1.tiff`` files (small 16-bit
TIFFs written by tifffile), optionally ``Images/Index.idx.xml`` in the schema of the shared
pe2loaddata test index (Plates / Wells / Maps / Images), and ``synthetic.json`` with the
expected image count — the layout ``cpjump1 synthesize`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

#: (channel number, Harmony ChannelName, excitation, emission) of the CPJUMP1 channels.
CHANNELS = [
    (1, "Alexa 647", 640, 706),
    (2, "Alexa 568", 561, 599),
    (3, "488 long", 488, 599),
    (4, "Alexa 488", 488, 522),
    (5, "HOECHST 33342", 405, 456),
    (6, "LowZBF", 740, 0),
    (7, "Brightfield", 740, 0),
    (8, "HighZBF", 740, 0),
]
NS = "http://www.perkinelmer.com/PEHH/HarmonyV5"


def well_rc(well: str) -> tuple[int, int]:
    return ord(well[0]) - ord("A") + 1, int(well[1:])


def image_name(row: int, col: int, site: int, ch: int) -> str:
    return f"r{row:02d}c{col:02d}f{site:02d}p01-ch{ch}sk1fk1fl1.tiff"


def _tiff_bytes(size: int, seed: int) -> bytes:
    import io

    import tifffile

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    tifffile.imwrite(buf, rng.integers(0, 4096, (size, size), dtype=np.uint16))
    return buf.getvalue()


def write_plate(
    plate_dir: Path,
    plate: str,
    wells=("A01", "A02", "B01"),
    sites: int = 2,
    channels=CHANNELS,
    index: bool = True,
    size: int = 8,
    expected_images: int | None = None,
    extra_images: list[tuple[str, int, int]] = (),
) -> Path:
    """Write a plate folder; returns its ``Images/`` folder. ``extra_images`` adds
    (well, site, channel) images beyond the regular grid (e.g. wells outside 384)."""
    images = plate_dir / "Images"
    images.mkdir(parents=True, exist_ok=True)
    data = _tiff_bytes(size, 0)
    grid = [(w, s, ch) for w in wells for s in range(1, sites + 1) for ch, *_ in channels]
    grid += list(extra_images)
    by_ch = {c[0]: c for c in channels}
    for w, s, ch in grid:
        r, c = well_rc(w)
        (images / image_name(r, c, s, ch)).write_bytes(data)
    if index:
        (images / "Index.idx.xml").write_text(index_xml(plate, grid, by_ch))
    n = len(grid) if expected_images is None else expected_images
    (plate_dir / "synthetic.json").write_text(
        json.dumps({"expected_images": n, "wells": list(wells), "sites": sites, "size": size, "seed": 0})
    )
    return images


def index_xml(plate: str, grid, by_ch) -> str:
    """A Harmony ``Index.idx.xml`` (Version 1 schema) listing ``grid`` images."""
    wells: dict[str, list[str]] = {}
    image_xml = []
    for w, s, ch in grid:
        r, c = well_rc(w)
        wid = f"{r:02d}{c:02d}"
        iid = f"{wid}K1F{s}P1R{ch}"
        wells.setdefault(wid, []).append(iid)
        _, name, ex, em = by_ch.get(ch, (ch, f"ch{ch}", 0, 0))
        pz = {6: -6e-06, 7: 0, 8: 6e-06}.get(ch, -4e-06)
        image_xml.append(
            f"""    <Image Version="1">
      <id>{iid}</id>
      <State>Ok</State>
      <URL>{image_name(r, c, s, ch)}</URL>
      <Row>{r}</Row>
      <Col>{c}</Col>
      <FieldID>{s}</FieldID>
      <PlaneID>1</PlaneID>
      <TimepointID>0</TimepointID>
      <ChannelID>{ch}</ChannelID>
      <FlimID>1</FlimID>
      <ChannelName>{escape(name)}</ChannelName>
      <ImageResolutionX Unit="m">6.5E-07</ImageResolutionX>
      <ImageResolutionY Unit="m">6.5E-07</ImageResolutionY>
      <ImageSizeX>8</ImageSizeX>
      <ImageSizeY>8</ImageSizeY>
      <BinningX>2</BinningX>
      <BinningY>2</BinningY>
      <MaxIntensity>65535</MaxIntensity>
      <PositionX Unit="m">{(s - 1) % 3 * 0.0006:.6g}</PositionX>
      <PositionY Unit="m">{(s - 1) // 3 * 0.0006:.6g}</PositionY>
      <PositionZ Unit="m">{pz:.6g}</PositionZ>
      <AbsPositionZ Unit="m">0.1346</AbsPositionZ>
      <AbsTime>2020-11-05T19:51:{ch:02d}.000-05:00</AbsTime>
      <MainExcitationWavelength Unit="nm">{ex}</MainExcitationWavelength>
      <MainEmissionWavelength Unit="nm">{em}</MainEmissionWavelength>
      <ObjectiveMagnification Unit="">20</ObjectiveMagnification>
      <ObjectiveNA Unit="">1</ObjectiveNA>
      <ExposureTime Unit="s">0.01</ExposureTime>
    </Image>"""
        )
    plate_wells = "\n".join(f'      <Well id="{wid}" />' for wid in wells)
    well_xml = []
    for wid, ids in wells.items():
        imgs = "\n".join(f'      <Image id="{i}" />' for i in ids)
        well_xml.append(
            f"    <Well>\n      <id>{wid}</id>\n      <Row>{int(wid[:2])}</Row>\n      <Col>{int(wid[2:])}</Col>\n{imgs}\n    </Well>"
        )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<EvaluationInputData Version="1" xmlns="{NS}">
  <InstrumentType>Phenix</InstrumentType>
  <Plates>
    <Plate>
      <PlateID>{plate}</PlateID>
      <Name>{plate}</Name>
      <PlateTypeName>384 PerkinElmer CellCarrier Ultra</PlateTypeName>
      <PlateRows>16</PlateRows>
      <PlateColumns>24</PlateColumns>
{plate_wells}
    </Plate>
  </Plates>
  <Wells>
{chr(10).join(well_xml)}
  </Wells>
  <Maps>
    <Map>
    </Map>
  </Maps>
  <Images>
{chr(10).join(image_xml)}
  </Images>
</EvaluationInputData>
"""
