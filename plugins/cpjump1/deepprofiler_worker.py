"""Helpers that run *inside* the DeepProfiler 0.5.1 environment (TensorFlow 2.15, Python 3.11).

This file is executed by path with the DeepProfiler interpreter
(``settings.deepprofiler_python <this file> <verb> …``); it imports only the standard library
at module level and DeepProfiler / TensorFlow / h5py inside the verbs, never ``cpjump1``
(the package is not installed in that environment). Every verb prints one JSON object on the
last line of stdout; :mod:`cpjump1.deepprofiler` reads it.

Verbs
-----
``build-checkpoint``
    Build the EfficientNet model exactly as ``deepprofiler.profiling.build_model`` does (so
    the layer names are DeepProfiler's own), initialise it from a fixed seed and save the
    weights as a Keras-2 HDF5 file. The file carries a ``cpjump1_provenance`` attribute
    saying that it is a *seeded test checkpoint, not the Cell Painting CNN*. The same seed
    gives a byte-identical file.
``verify``
    The checkpoint guard. DeepProfiler's ``Profile.configure`` loads weights with
    ``load_weights(checkpoint, by_name=True)``, and Keras 2.15 silently skips every file
    layer whose name matches no model layer (and leaves those model layers at their random
    initialisation). This verb runs DeepProfiler's own CLI group (same config resolution as
    ``profile``), builds and configures the ``Profile`` object, and then compares every
    model layer that has weights with the arrays stored under the same name in the file,
    bit for bit. Only the renamed head (``classifier``) may be absent.
``reference-features``
    An independent path to the features of one site: builds the same model with no
    checkpoint, assigns every layer's weights *explicitly* from the HDF5 file with h5py (no
    Keras loading), then runs DeepProfiler's ``extract_features`` on that site and writes the
    npz elsewhere. Tests compare it bit-exactly with the features of the real ``profile`` run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys

# Run by path, Python puts this file's folder first on sys.path, where cpjump1's own
# ``deepprofiler.py`` would shadow the DeepProfiler package: drop it.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

SEEDED_LABEL = "seeded test checkpoint, not the Cell Painting CNN"
HEAD_LAYER = "classifier"  # DeepProfiler renames the Dense head before loading by name


def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _emit(obj: dict) -> None:
    sys.stdout.write("\n" + json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _model_config(channels: int, box_size: int, conv_blocks: int) -> dict:
    return {
        "dataset": {
            "images": {"channels": [f"ch{i}" for i in range(channels)]},
            "locations": {"box_size": box_size},
        },
        "train": {"model": {"params": {"conv_blocks": conv_blocks}}},
        "profile": {},
        "num_classes": 2,
    }


def build_checkpoint(out: str, seed: int, channels: int, box_size: int, conv_blocks: int,
                     nested: bool) -> dict:
    """Save a seeded EfficientNet-B<conv_blocks> with DeepProfiler's layer names to ``out``."""
    _quiet_tf()
    import deepprofiler.profiling as dpp  # switches TF to v1 graph mode, as the CLI does
    import h5py
    import tensorflow as tf

    if not out.endswith((".h5", ".hdf5")) or out.endswith(".weights.h5"):
        raise SystemExit(f"checkpoint name must end in .h5 or .hdf5 (not .weights.h5): {out}")
    config = _model_config(channels, box_size, conv_blocks)
    tf.keras.utils.set_random_seed(seed)
    model = dpp.build_model(config)
    if nested:
        # Deliberately wrong layout used by tests: the backbone as one nested sub-model, so
        # that the file's top-level layer names match none of DeepProfiler's.
        inner = tf.keras.Model(model.inputs, model.get_layer("pool5").output, name="efficientnet-b0")
        inp = tf.keras.layers.Input(model.inputs[0].shape[1:])
        model = tf.keras.Model(inp, model.get_layer("ClassProb")(inner(inp)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.h5"
    model.save_weights(tmp)
    provenance = {
        "kind": SEEDED_LABEL,
        "seed": seed,
        "backbone": f"EfficientNetB{conv_blocks}",
        "channels": channels,
        "box_size": box_size,
        "nested": nested,
        "builder": "cpjump1 deep-profiles build-checkpoint (deepprofiler.profiling.build_model)",
    }
    with h5py.File(tmp, "a") as f:
        f.attrs["cpjump1_provenance"] = json.dumps(provenance, sort_keys=True)
    os.replace(tmp, out)
    layers = [layer for layer in model.layers if layer.weights]
    return {
        "checkpoint": out,
        "layers_with_weights": len(layers),
        "params": int(model.count_params()),
        "provenance": provenance,
    }


def _file_weights(f, name: str):
    """Arrays stored for layer ``name`` in a Keras-2 HDF5 weights file, or None."""
    if name not in f:
        return None
    group = f[name]
    return [group[w][()] for w in (n.decode() if isinstance(n, bytes) else n
                                   for n in group.attrs.get("weight_names", []))]


def _open_weights(h5py, path: str):
    f = h5py.File(path, "r")
    root = f if "layer_names" in f.attrs else f.get("model_weights")
    if root is None or "layer_names" not in root.attrs:
        f.close()
        raise ValueError(f"{path}: not a Keras HDF5 weights file (no layer_names attribute)")
    return f, root


def _provenance(f) -> dict | None:
    raw = f.attrs.get("cpjump1_provenance")
    if raw is None:
        return None
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _dp_context(root: str, config: str, exp: str, metadata: str, gpu: str) -> dict:
    """Run DeepProfiler's own click group with a no-op verb to resolve the config exactly as
    ``profile`` does; return its context object."""
    import click
    import deepprofiler.__main__ as dpmain

    captured: dict = {}

    @click.command("cpjump1-capture")
    @click.pass_context
    def capture(context):
        if context.obj["config"]["prepare"]["compression"]["implement"]:
            context.obj["config"]["paths"]["images"] = context.obj["config"]["paths"]["compressed_images"]
        captured.update(context.obj)

    dpmain.cli.add_command(capture)
    dpmain.cli.main(
        args=["--root", root, "--config", config, "--exp", exp, "--metadata", metadata, "--gpu", gpu,
              "cpjump1-capture"],
        obj={}, standalone_mode=False,
    )
    return captured


def _configured_profile(ctx: dict):
    import deepprofiler.dataset.image_dataset as dpi
    import deepprofiler.profiling as dpp

    dset = dpi.read_dataset(ctx["config"], mode="profile")
    profile = dpp.Profile(ctx["config"], dset)
    with contextlib.redirect_stdout(io.StringIO()):  # model.summary() is 300 lines
        profile.configure()
    return profile, dset


def verify(root: str, config: str, exp: str, metadata: str, gpu: str) -> dict:
    """The structural checkpoint guard (see module docstring)."""
    _quiet_tf()
    import h5py
    import numpy as np

    ctx = _dp_context(root, config, exp, metadata, gpu)
    cfg = ctx["config"]
    checkpoint = os.path.join(cfg["paths"]["checkpoints"], cfg["profile"]["checkpoint"])
    result: dict = {"checkpoint": checkpoint}
    try:
        profile, _ = _configured_profile(ctx)
    except Exception as exc:  # e.g. shape mismatch: ValueError at stem_conv
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        return result
    f, weights = _open_weights(h5py, checkpoint)
    with f:
        matched, missing, mismatched = [], [], []
        model_names = set()
        for layer in profile.feature_model.layers:
            if not layer.weights:
                continue
            model_names.add(layer.name)
            if layer.name == HEAD_LAYER:
                continue
            stored = _file_weights(weights, layer.name)
            if stored is None:
                missing.append(layer.name)
                continue
            live = layer.get_weights()
            same = len(stored) == len(live) and all(
                a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
                for a, b in zip(stored, live))
            (matched if same else mismatched).append(layer.name)
        file_layers = [n.decode() if isinstance(n, bytes) else n for n in weights.attrs["layer_names"]]
        unused = [n for n in file_layers if n not in model_names and _file_weights(weights, n)]
        result.update(
            ok=not missing and not mismatched and bool(matched),
            backbone_layers=len(matched) + len(missing) + len(mismatched),
            matched=len(matched),
            missing_in_file=missing,
            mismatched=mismatched,
            unused_file_layers=unused,
            provenance=_provenance(f),
            feature_layer=cfg["profile"]["feature_layer"],
        )
    return result


def reference_features(root: str, config: str, exp: str, metadata: str, gpu: str,
                       checkpoints: list[str], row: int, out_dir: str) -> dict:
    """Features of index row ``row`` with weights assigned explicitly from each checkpoint."""
    _quiet_tf()
    import deepprofiler.dataset.pixels as dpx
    import h5py

    ctx = _dp_context(root, config, exp, metadata, gpu)
    cfg = ctx["config"]
    cfg["profile"]["checkpoint"] = "None"  # build with random init; we assign below
    profile, dset = _configured_profile(ctx)
    meta = dset.meta.data.iloc[row]
    key, paths, outlines = dset.get_image_paths(meta)
    image = dpx.openImage(paths, outlines)
    written = []
    for i, ckpt in enumerate(checkpoints):
        f, weights = _open_weights(h5py, ckpt)
        with f:
            assigned = 0
            head = profile.feature_model.layers[-1]  # not renamed when no checkpoint is loaded
            for layer in profile.feature_model.layers:
                if not layer.weights or layer is head:
                    continue
                stored = _file_weights(weights, layer.name)
                if stored is None:
                    raise SystemExit(f"{ckpt}: no weights for layer {layer.name}")
                layer.set_weights(stored)
                assigned += 1
        target = os.path.join(out_dir, str(i))
        profile.config["paths"]["features"] = target
        with contextlib.redirect_stdout(io.StringIO()):
            profile.extract_features(None, image, meta)
        written.append({"checkpoint": ckpt, "assigned_layers": assigned,
                        "npz": os.path.join(target, "{}/{}/{}.npz".format(
                            meta["Metadata_Plate"], meta["Metadata_Well"], meta["Metadata_Site"]))})
    return {"key": key, "outputs": written}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepprofiler_worker")
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build-checkpoint")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--channels", type=int, default=5)
    b.add_argument("--box-size", type=int, default=96)
    b.add_argument("--conv-blocks", type=int, default=0)
    b.add_argument("--nested", action="store_true")
    for name in ("verify", "reference-features"):
        p = sub.add_parser(name)
        p.add_argument("--root", required=True)
        p.add_argument("--config", required=True)
        p.add_argument("--exp", required=True)
        p.add_argument("--metadata", default="index.csv")
        p.add_argument("--gpu", default="")
        if name == "reference-features":
            p.add_argument("--checkpoint", action="append", required=True)
            p.add_argument("--row", type=int, default=0)
            p.add_argument("--out-dir", required=True)
    args = parser.parse_args(argv)
    if args.verb == "build-checkpoint":
        result = build_checkpoint(args.out, args.seed, args.channels, args.box_size,
                                  args.conv_blocks, args.nested)
    elif args.verb == "verify":
        result = verify(args.root, args.config, args.exp, args.metadata, args.gpu)
    else:
        result = reference_features(args.root, args.config, args.exp, args.metadata, args.gpu,
                                    args.checkpoint, args.row, args.out_dir)
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
