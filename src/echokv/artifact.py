"""The trained artifact: a folder with ``config.json`` and ``reconstructor.safetensors``.

Loading reads JSON and tensors only (never pickle, never code from the artifact), and refuses a
model whose KV geometry or K/V projection weights differ from the ones it was trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import key_latent
from .mixes import MixLayout, Mixes
from .models import kv_geometry
from .reconstructor import Reconstructor
from .selection import HeadLayout
from .stats.capture import attention_modules
from .util import atomic_dir

FORMAT = "echokv-artifact/1"
CONFIG, WEIGHTS, REPORT = "config.json", "reconstructor.safetensors", "train_report.json"
STAGE1_WEIGHTS = "reconstructor_stage1.safetensors"  # the closed-form start, for ablations


class ArtifactError(ValueError):
    """An artifact is missing, malformed, or made for another model."""


def fingerprint(model) -> str:
    """sha256 of every layer's K/V projection weights, rounded to bfloat16 so that float32 and
    bfloat16 loads of the same checkpoint agree."""
    h = hashlib.sha256()
    for layer, mod in sorted(attention_modules(model).items()):
        for name in ("k_proj", "v_proj"):
            proj = getattr(mod, name)
            for t in (proj.weight, proj.bias):
                if t is not None:
                    h.update(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"echokv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save(
    recon: Reconstructor | Mixes,
    model,
    out_dir: str | Path,
    report: dict | None = None,
    overwrite: bool = False,
    stage1_state: dict | None = None,
):
    """Write the artifact atomically (:func:`~echokv.util.atomic_dir`)."""
    geo = kv_geometry(model)
    config = {
        "format": FORMAT,
        "model": {
            "name": getattr(model, "echokv_name", None),
            "model_type": geo.model_type,
            "geometry": geo.to_dict(),
            "kv_fingerprint": fingerprint(model),
        },
        "layout": recon.layout.to_dict(),
        "head_dim": recon.layout.head_dim if isinstance(recon, Mixes) else recon.head_dim,
        "bias": True if isinstance(recon, Mixes) else recon.groups[0].use_bias if len(recon.groups) else True,
        "reconstructor_parameters": recon.num_parameters(),
        "reconstructor_bytes": recon.num_bytes(),
        "training": (report or {}).get("config", {}),
        "versions": _versions(),
    }
    head_dim = config["head_dim"]
    tensors = _pack(recon.state_dict(), head_dim)
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        stage1_state = stage1_state if stage1_state is not None else getattr(recon, "stage1_state", None)
        if stage1_state is not None:
            save_file(_pack(stage1_state, head_dim), str(tmp / STAGE1_WEIGHTS), metadata={"format": FORMAT})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return Path(out_dir).expanduser()


def read_config(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder not found: {folder} (train one with `echokv train --out {folder}`)")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder} is not a complete echokv artifact: {name} is missing")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{folder / CONFIG} is not valid JSON: {exc}") from exc
    if config.get("format") != FORMAT:
        raise ArtifactError(f"{folder} has format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def config_ratio(config: dict) -> float:
    """The compression ratio an artifact (its ``config.json``) was trained for."""
    training = config.get("training") or {}
    return float(training.get("compression_ratio", 1 - config["layout"]["kept_fraction"]))


def config_variant(config: dict) -> str:
    """The variant of an artifact, from its layout: ``"mix"`` or ``"heads"`` with retained components
    (:mod:`echokv.mixes`), or the RoPE-commuting forms: ``"hybrid"`` (keys as a latent) or ``"heads"`` (which
    artifacts written before the rename record as ``"echo"``)."""
    layout = config["layout"]
    if "parts" in layout:
        return layout.get("variant", "mix")
    return "hybrid" if layout.get("key_latent") is not None else "heads"


def config_keys(config: dict) -> str:
    """How an artifact rebuilds keys: ``"pre-rope"`` (retained components) or ``"rope-commuting"``."""
    return config["layout"].get("keys", "pre-rope") if "parts" in config["layout"] else "rope-commuting"


def check_compatible(config: dict, model, path="artifact") -> None:
    """Refuse an artifact made for another geometry or other K/V weights."""
    geo = kv_geometry(model).to_dict()
    want = config["model"]["geometry"]
    for key in ("num_layers", "num_kv_heads", "head_dim", "num_attention_heads", "sliding_layers"):
        if want.get(key) != geo.get(key):
            raise ArtifactError(
                f"{path} was trained for a model with {key}={want.get(key)}, but this model has {geo.get(key)} "
                f"(artifact model: {config['model'].get('name')}); train an artifact for this model"
            )
    if config["model"]["kv_fingerprint"] != fingerprint(model):
        raise ArtifactError(
            f"{path} was trained on a different model (its K/V projection weights differ; artifact model: "
            f"{config['model'].get('name')}); train an artifact for this model"
        )


_FREQ, _AXES = "_freq", "_axes"


def _pack(state: dict, head_dim: int) -> dict[str, torch.Tensor]:
    """float32 tensors to save; hybrid key bases in their complex form (64x smaller at head_dim 64)."""
    out = {}
    for name, t in state.items():
        t = t.detach().contiguous().float()
        form = key_latent.complex_form(t, head_dim) if name.endswith("k_basis") else None
        if form is None:
            out[name] = t
        else:
            out[name + _FREQ], out[name + _AXES] = form
    return out


def _unpack(state: dict, head_dim: int) -> dict[str, torch.Tensor]:
    for name in [n for n in state if n.endswith("k_basis" + _AXES)]:
        base = name[: -len(_AXES)]
        state[base] = key_latent.from_complex_form(state.pop(base + _FREQ), state.pop(name), head_dim)
    return state


def load(path: str | Path, model=None, stage: int = 2) -> Reconstructor | Mixes:
    """Load the network of an artifact (a :class:`~echokv.mixes.Mixes` or a :class:`Reconstructor`); with
    ``model``, check it is the model the artifact was trained for.

    ``stage=1`` loads the stage-1 (closed-form) weights, when the artifact has them.
    """
    config = read_config(path)
    if model is not None:
        check_compatible(config, model, str(path))
    if "parts" in config["layout"]:
        recon = Mixes(MixLayout.from_dict(config["layout"]))
    else:
        layout = HeadLayout.from_dict(config["layout"])
        recon = Reconstructor(layout, config["head_dim"], bias=config.get("bias", True))
    weights = Path(path) / (WEIGHTS if stage == 2 else STAGE1_WEIGHTS)
    if not weights.is_file():
        raise ArtifactError(f"{path} has no stage-{stage} weights ({weights.name})")
    state = _unpack(load_file(str(weights)), config["head_dim"])
    missing = set(recon.state_dict()) - set(state)
    if missing:
        raise ArtifactError(f"{weights} lacks tensors {sorted(missing)[:3]}")
    recon.load_state_dict(state, strict=True)
    recon.requires_grad_(False)
    return recon
