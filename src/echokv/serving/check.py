"""Start-up checks of an engine that serves an echokv artifact: everything the plugin refuses, before any work,
in one line. Pure Python and torch (no vLLM import), so the main environment tests them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..artifact import ArtifactError, hash_kv_weights, load, read_config
from ..codecs import headq
from ..models import kv_geometry


class ServeError(ValueError):
    """An engine cannot serve this artifact; the message names the problem and what to do."""


_GEOMETRY = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "sliding_layers")


def _checkpoint_kv(folder: Path, num_layers: int):
    """Every layer's (K weight, K bias, V weight, V bias) from a safetensors checkpoint folder (Llama names)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if not index.is_file() and not (folder / "model.safetensors").is_file():
        raise ServeError(f"the served model {folder} has no weights (model.safetensors or "
                         "model.safetensors.index.json): serve a folder python -m echokv.serving.export wrote")
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            where = dict.fromkeys(f.keys(), "model.safetensors")
    handles: dict = {}

    def tensor(name):
        if name not in where:
            return None
        file = where[name]
        if file not in handles:
            handles[file] = safe_open(str(folder / file), "pt")
        return handles[file].get_tensor(name)

    for layer in range(num_layers):
        p = f"model.layers.{layer}.self_attn."
        ts = [tensor(p + n) for n in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")]
        if ts[0] is None or ts[2] is None:
            raise ServeError(f"{folder} has no {p}k_proj/v_proj weights: the plugin checks a Llama-style "
                             "safetensors folder (python -m echokv.serving.export makes one)")
        yield ts


def load_for_engine(artifact, hf_config, model_folder):
    """The artifact's :class:`~echokv.mixes.Mixes` (or an EchoKV-Q codec's :class:`HeadQuantCodec`, a folder
    :func:`echokv.codecs.headq.save` wrote), after checking it is one the engine can keep (covering every layer) and
    made for the served model (geometry and K/V weights of the checkpoint in ``model_folder``). Raises
    :class:`ServeError` (one line) otherwise.

    An engine builds its model under the model's default dtype; artifacts are float32, and are checked and loaded
    as such whatever the default."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return _load_for_engine(artifact, hf_config, model_folder)
    finally:
        torch.set_default_dtype(default)


def _load_for_engine(artifact, hf_config, model_folder):
    path = Path(str(artifact)).expanduser()
    fast = headq.read_config(path) if path.is_dir() else None
    try:
        config = fast or read_config(path)
    except ArtifactError as exc:
        raise ServeError(str(exc)) from None
    geo = kv_geometry(hf_config).to_dict()
    want = config["model"]["geometry"]
    for key in _GEOMETRY:
        if want.get(key) != geo.get(key):
            raise ServeError(f"{path} was trained for a model with {key}={want.get(key)}, but the served model has "
                             f"{geo.get(key)} (artifact model: {config['model'].get('name')}); train an artifact "
                             "for this model")
    layers = [int(x) for x in config["widths"]] if fast else config["layout"]["layers"]
    if sorted(layers) != geo["full_attention_layers"]:
        raise ServeError(f"{path} compresses layers {layers} only; the engine keeps one cache layout for every "
                         "layer, so the artifact must compress all of them (train it with the default layers)")
    folder = Path(str(model_folder)).expanduser()
    if not folder.is_dir():
        raise ServeError(f"the served model {model_folder} is not a local folder: the plugin checks the artifact "
                         "against its K/V weights; export one with python -m echokv.serving.export")
    recorded = {v for k, v in config["model"].items() if k.startswith("kv_fingerprint")}
    mine = hash_kv_weights(_checkpoint_kv(folder, geo["num_layers"]))
    if mine not in recorded:
        raise ServeError(f"{path} was trained on a different model than {folder} (its K/V projection weights "
                         f"differ; artifact model: {config['model'].get('name')}); train an artifact for this model")
    try:
        return headq.load(path) if fast else load(path)
    except (ArtifactError, ValueError) as exc:
        raise ServeError(str(exc)) from None
