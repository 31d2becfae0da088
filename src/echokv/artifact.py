"""The trained artifact: a folder with ``config.json`` and ``network.safetensors``.

Loading reads JSON and tensors only (never pickle, never code from the artifact), and refuses a
model whose KV geometry or K/V projection weights differ from the ones it was trained on.

Every problem with an artifact is an :class:`ArtifactError` that names the file and what to do, raised by
:func:`validate_artifact` (which :func:`read_config` runs) before any model is loaded: a missing or misnamed
folder, a missing file, a ``config.json`` that is not JSON or not of the right shape, weights that are not a
safetensors file or whose tensors do not have the names and shapes the layout needs (read from the header,
without loading them). An artifact written by this version also records SHA-256 checksums of its files
(``config.json``'s ``checksums``; ``config.json``'s own is computed with its value zeroed), so any change of
a byte is refused; artifacts written before carry none and are checked for shape only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .mixes import Mixes, MixLayout
from .models import kv_geometry
from .placement import onloaded
from .stats.capture import attention_modules
from .util import atomic_dir, is_unfinished_output

FORMAT = "echokv-artifact/1"
#: what a weights file's format says when its artifact records checksums
WITH_CHECKSUMS = "; checksums=sha256"
CONFIG, WEIGHTS, REPORT = "config.json", "network.safetensors", "train_report.json"
STAGE1_WEIGHTS = "network_stage1.safetensors"  # the closed-form start, for ablations
#: the weights file of each training stage
STAGE_FILES = {2: WEIGHTS, 1: STAGE1_WEIGHTS}
#: the names older artifacts gave the weights files (read, never written)
OLD_NAMES = {WEIGHTS: "reconstructor.safetensors", STAGE1_WEIGHTS: "reconstructor_stage1.safetensors"}


def stage_file(folder: Path, stage: int) -> Path:
    """The weights file of a training stage in an artifact folder: its name, or the one an older artifact gave it."""
    name = STAGE_FILES[stage]
    old = folder / OLD_NAMES[name]
    return old if not (folder / name).exists() and old.exists() else folder / name

_ZERO_SUM = "0" * 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_RETRAIN = "train it again with `echokv train`, or restore the folder from a copy"


class ArtifactError(ValueError):
    """An artifact is missing, malformed, corrupt, or made for another model; the message names the file and
    what to do."""


def _kv_weights(mod) -> list[torch.Tensor | None]:
    """The K and V projections' weights and biases of an attention module (Phi-3: the K/V rows of ``qkv_proj``)."""
    if hasattr(mod, "k_proj"):
        return [mod.k_proj.weight, mod.k_proj.bias, mod.v_proj.weight, mod.v_proj.bias]
    q = mod.config.num_attention_heads * mod.head_dim
    kv = mod.config.num_key_value_heads * mod.head_dim
    w, b = mod.qkv_proj.weight, mod.qkv_proj.bias
    return [w[q : q + kv], None if b is None else b[q : q + kv], w[q + kv : q + 2 * kv],
            None if b is None else b[q + kv : q + 2 * kv]]


def fingerprint(model, via: torch.dtype | None = None) -> str:
    """sha256 of every layer's K/V projection weights, rounded to bfloat16 so that float32 and
    bfloat16 loads of the same checkpoint agree (``via``: through that dtype first)."""
    def layers():
        for _, mod in sorted(attention_modules(model).items()):
            with onloaded(mod):  # weights accelerate offloaded are meta outside a forward
                yield _kv_weights(mod)

    return hash_kv_weights(layers(), via)


def hash_kv_weights(layers, via: torch.dtype | None = None) -> str:
    """The fingerprint of K/V weights given layer by layer (K weight, K bias, V weight, V bias; None where absent);
    also for weights read from a checkpoint without a model (a serving engine's folder)."""
    h = hashlib.sha256()
    for tensors in layers:
        for t in tensors:
            if t is not None:
                t = t.detach().to("cpu")
                t = t if via is None else t.to(via)
                h.update(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def fingerprints(model) -> dict[str, str]:
    """The K/V weights' fingerprints an artifact records: ``kv_fingerprint`` (:func:`fingerprint`) and
    ``kv_fingerprint_fp16``, the same through float16 first. A float16 load rounds the weights to float16,
    which bfloat16 rounding of the float32 weights does not reproduce; through float16 first, the float32 and
    float16 loads of one checkpoint agree (measured on SmolLM2-135M: float32, float16 and bfloat16 loads match
    the artifact of any of the first two)."""
    return {"kv_fingerprint": fingerprint(model), "kv_fingerprint_fp16": fingerprint(model, torch.float16)}


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"echokv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def sha256_file(path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_checksum(path, config: dict | None = None) -> str:
    """sha256 of an artifact's weights: what its ``config.json`` records, else read from the file."""
    sums = (config or {}).get("checksums") or {}
    return sums.get(WEIGHTS) or sums.get(OLD_NAMES[WEIGHTS]) or sha256_file(stage_file(Path(path), 2))


def _config_bytes(config: dict) -> bytes:
    """``config.json``'s bytes, its ``checksums[config.json]`` the SHA-256 of these bytes with that value
    zeroed (so that a change of any byte, whitespace included, is seen)."""
    sums = config.setdefault("checksums", {})
    sums[CONFIG] = _ZERO_SUM
    text = (json.dumps(config, indent=2) + "\n").encode()
    digest = hashlib.sha256(text).hexdigest()
    sums[CONFIG] = digest
    return text.replace(_checksum_entry(_ZERO_SUM), _checksum_entry(digest), 1)


def _checksum_entry(digest: str) -> bytes:
    return f'"{CONFIG}": "{digest}"'.encode()


def save(
    network: Mixes,
    model,
    out_dir: str | Path,
    report: dict | None = None,
    overwrite: bool = False,
    stage1_state: dict | None = None,
):
    """Write the artifact atomically (:func:`~echokv.util.atomic_dir`: an existing ``out_dir`` is replaced
    only with ``overwrite`` and only when it holds nothing but echokv's output)."""
    if not isinstance(network, Mixes):
        raise TypeError(f"save needs the network that train() returned (echokv.mixes.Mixes), got "
                        f"{type(network).__name__}")
    if not isinstance(out_dir, (str, Path)) or not str(out_dir).strip():
        raise TypeError(f"save needs an output folder path (str or pathlib.Path), got {out_dir!r}")
    geo = kv_geometry(model)
    config = {
        "format": FORMAT,
        "model": {
            "name": getattr(model, "echokv_name", None),
            "model_type": geo.model_type,
            "geometry": geo.to_dict(),
            **fingerprints(model),
        },
        "layout": network.layout.to_dict(),
        "head_dim": network.layout.head_dim,
        "network_parameters": network.num_parameters(),
        "network_bytes": network.num_bytes(),
        "training": (report or {}).get("config", {}),
        "versions": _versions(),
    }
    tensors = _pack(network.state_dict(), network)
    # one metadata key: safetensors writes its metadata in no fixed order, and the format must open the file (so
    # that a truncated artifact of echokv's is still recognised as its own, util.OWN_FILES)
    meta = {"format": FORMAT + WITH_CHECKSUMS}
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=meta)
        stage1_state = stage1_state if stage1_state is not None else getattr(network, "stage1_state", None)
        if stage1_state is not None:
            save_file(_pack(stage1_state, network), str(tmp / STAGE1_WEIGHTS), metadata=meta)
        config["checksums"] = {n: sha256_file(tmp / n) for n in STAGE_FILES.values() if (tmp / n).is_file()}
        (tmp / CONFIG).write_bytes(_config_bytes(config))
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2))
    return Path(out_dir).expanduser()


def rewrite_config(path: str | Path, config: dict) -> None:
    """Replace an artifact's ``config.json`` by ``config``, with a new checksum: for tools and tests that
    change an artifact on purpose (any other change of the file is refused as corruption)."""
    folder = _folder(path)
    config = json.loads(json.dumps(config))
    if isinstance(config.get("checksums"), dict):
        config["checksums"].pop(CONFIG, None)
    else:
        config.pop("checksums", None)
    tmp = folder / f".{CONFIG}.tmp"
    tmp.write_bytes(_config_bytes(config) if "checksums" in config else (json.dumps(config, indent=2) + "\n").encode())
    tmp.replace(folder / CONFIG)


# -- validation: every problem an ArtifactError naming the file, before any model is loaded ----------------


def _folder(path) -> Path:
    if isinstance(path, str) and not path.strip():  # a command line's --artifact '': the user's input
        raise ArtifactError("the artifact path is empty: pass the folder `echokv train` wrote")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"an artifact is a folder path (str or pathlib.Path), got {path!r}")
    folder = Path(path).expanduser()
    if folder.is_file():
        hint = (f"; pass the folder that holds it, {folder.parent}"
                if folder.name in (CONFIG, *STAGE_FILES.values(), *OLD_NAMES.values()) else "")
        raise ArtifactError(f"{folder} is a file, not an artifact folder (an artifact is a folder with {CONFIG} and "
                            f"{WEIGHTS}){hint}")
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder not found: {folder} (train one with `echokv train --out {folder}`)")
    if is_unfinished_output(folder):
        raise ArtifactError(f"{folder} is the unfinished output of an interrupted echokv run, not an artifact; "
                            "delete it (the next write to the same folder also removes it)")
    return folder


def _fail(file: Path, problem: str, todo: str = _RETRAIN) -> ArtifactError:
    return ArtifactError(f"{file}: {problem}; {todo}")


def _read_json(file: Path) -> tuple[dict, bytes]:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise _fail(file, f"cannot be read ({exc.strerror})", "check its permissions") from None
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _fail(file, f"is not UTF-8 text (byte {exc.start}); the file is corrupt") from None
    except json.JSONDecodeError as exc:
        raise _fail(file, f"is not valid JSON ({exc}); the file is truncated or corrupt") from None
    if not isinstance(config, dict):
        raise _fail(file, f"holds a JSON {type(config).__name__}, not the object of an echokv artifact")
    return config, raw


def _check_checksums(folder: Path, config: dict, raw: bytes) -> None:
    """An artifact that records checksums: every file as it was written (config.json's own with its value
    zeroed). One that records none: its weights must not say they had some."""
    file = folder / CONFIG
    sums = config.get("checksums")
    files = [stage_file(folder, stage) for stage in STAGE_FILES]
    if sums is None:
        for path in files:
            meta = _header(path)[1] if path.is_file() else {}
            if meta.get("checksums") or meta.get("format", "").endswith(WITH_CHECKSUMS):
                raise _fail(file, f"has no 'checksums', yet {path.name} was written with them: the file is corrupt")
        return
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _HEX64.match(v) for v in sums.values()):
        raise _fail(file, "has malformed 'checksums': the file is corrupt")
    own = sums.get(CONFIG)
    entry = _checksum_entry(own) if own else b""
    if not own or raw.count(entry) != 1 or hashlib.sha256(
            raw.replace(entry, _checksum_entry(_ZERO_SUM))).hexdigest() != own:
        raise _fail(file, "does not match the checksum recorded when it was written: it was changed or is corrupt",
                    _RETRAIN + " (a deliberate edit: write it with echokv.artifact.rewrite_config)")
    for path in files:
        name, present = path.name, path.is_file()
        if not present and path.name != WEIGHTS and (name in sums or OLD_NAMES[name] in sums):
            raise _fail(path, "is missing, but the artifact was written with it")
        if present and name not in sums:
            raise _fail(file, f"records no checksum of {name}, which was written with the artifact: the file is "
                        "corrupt")
        if present and sha256_file(path) != sums[name]:
            raise _fail(path, "does not match the checksum recorded when the artifact was written: the "
                        "file is truncated or corrupt")


def _need(cond: bool, file: Path, problem: str) -> None:
    if not cond:
        raise _fail(file, problem)


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_config(folder: Path, config: dict) -> Mixes:
    """The shape of ``config.json``; returns an empty network of its layout (the tensors it needs)."""
    file = folder / CONFIG
    _need(config.get("format") == FORMAT, file,
          f"has format {config.get('format')!r}, expected {FORMAT!r} (not an echokv artifact, or another version)")
    model = config.get("model")
    _need(isinstance(model, dict), file, "lacks the 'model' object (which model it was trained for)")
    geo = model.get("geometry")
    _need(isinstance(geo, dict), file, "lacks 'model.geometry'")
    for key in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim"):
        _need(_is_int(geo.get(key), 1), file, f"has no positive integer 'model.geometry.{key}'")
    _need(isinstance(geo.get("sliding_layers", []), list), file, "has a 'model.geometry.sliding_layers' that is "
          "not a list")
    _need(isinstance(model.get("kv_fingerprint"), str), file, "lacks 'model.kv_fingerprint'")
    head_dim = config.get("head_dim")
    _need(_is_int(head_dim, 2), file, f"has no valid 'head_dim' (got {head_dim!r})")
    _need(head_dim == geo["head_dim"], file, f"says head_dim {head_dim}, but its model geometry has head_dim "
          f"{geo['head_dim']}")
    _need(isinstance(config.get("bias", True), bool), file, "has a 'bias' that is not true or false")
    raw_layout = config.get("layout")
    _need(isinstance(raw_layout, dict), file, "lacks the 'layout' object (which heads are kept)")
    if "parts" not in raw_layout and "retained_k" in raw_layout:
        raise retired(file, raw_layout)
    return _check_mix_layout(file, raw_layout, geo, head_dim)


def retired(file: Path, layout: dict) -> ArtifactError:
    """The one line for an artifact of a retired form: the RoPE-commuting retained heads and the hybrid's key
    latent (artifacts without a ``parts`` layout)."""
    variant = "hybrid" if layout.get("key_latent") is not None else "heads"
    return ArtifactError(f"{file} was trained by a retired variant ({variant} with RoPE-commuting keys, echokv 0.1); "
                         f"retrain with `echokv train --variant {variant}` (keys are now rebuilt before RoPE)")


def _check_mix_layout(file: Path, raw_layout: dict, geo: dict, head_dim: int) -> Mixes:
    """A mixes layout (retained components) against the model geometry; returns an empty network of it."""
    try:
        layout = MixLayout.from_dict(raw_layout)
    except Exception as exc:  # noqa: BLE001 - any malformed layout
        raise _fail(file, f"has a malformed 'layout' ({type(exc).__name__}: {exc})") from None
    _need(layout.num_kv_heads == geo["num_kv_heads"] and layout.head_dim == head_dim, file,
          f"has a layout of {layout.num_kv_heads} KV heads of {layout.head_dim} for a model of "
          f"{geo['num_kv_heads']} of {head_dim}")
    layers = set(range(geo["num_layers"]))
    _need(all(_is_int(i) and i in layers for i in layout.layers), file, "has layout layers outside the model")
    _need(len(layout.parts) == 2 * len(layout.groups), file, "needs one key and one value part per group")
    try:
        return Mixes(layout)
    except Exception as exc:  # noqa: BLE001 - a layout the network cannot be built from
        raise _fail(file, f"has a layout the network cannot be built from ({type(exc).__name__}: {exc})") from None


def _header(file: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict]:
    """Names, shapes and dtypes of a safetensors file's tensors, and its metadata, from the header only."""
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
            tensors = {}
            for name in f.keys():  # noqa: SIM118 - safe_open is not iterable
                part = f.get_slice(name)
                tensors[name] = (tuple(part.get_shape()), part.get_dtype())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _fail(file, f"is not a readable safetensors file ({exc}); it is truncated or corrupt") from None
    return tensors, meta


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
           torch.int64: "I64"}


def _check_weights(file: Path, network: Mixes, head_dim: int) -> None:
    """The tensors of a weights file against those the layout needs: names, shapes and dtypes (header only)."""
    stored, _ = _header(file)
    left = dict(stored)
    for name, tensor in network.state_dict().items():
        want = (tuple(tensor.shape), _DTYPES[network.stored_dtype(name)])
        _need(name in stored, file, f"lacks tensor {name}, which {CONFIG}'s layout needs")
        left.pop(name)
        # (artifacts written before the bfloat16 decoders hold float32 ones)
        _need(stored[name] in (want, (want[0], "F32")), file, f"tensor {name} is {stored[name][1]} "
              f"{list(stored[name][0])}, but {CONFIG}'s layout and head_dim {head_dim} need {want[1]} {list(want[0])}")
    _need(not left, file, f"holds tensors {CONFIG}'s layout has no place for ({', '.join(sorted(left)[:4])})")


def validate_artifact(path: str | Path) -> dict:
    """Check an artifact without loading a model or any tensor, and return its ``config.json``.

    Raises :class:`ArtifactError` naming the file: the folder is missing, is a file, or is an interrupted
    write; a file is missing; ``config.json`` is not UTF-8 JSON, not an object, of another format, or lacks
    or mistypes a field; a checksum does not match (artifacts that record checksums); a weights file is not a
    safetensors file or its tensors' names, shapes or dtypes are not those the layout and ``head_dim`` need.
    """
    folder = _folder(path)
    for file in (folder / CONFIG, stage_file(folder, 2)):
        if not file.is_file():
            raise ArtifactError(f"{folder} is not a complete echokv artifact: {file.name} is missing; {_RETRAIN}")
    config, raw = _read_json(folder / CONFIG)
    _check_checksums(folder, config, raw)
    network = _check_config(folder, config)
    for stage in STAGE_FILES:
        if stage_file(folder, stage).is_file():
            _check_weights(stage_file(folder, stage), network, config["head_dim"])
    return config


def read_config(path: str | Path) -> dict:
    """An artifact's ``config.json``, after the whole artifact was checked (:func:`validate_artifact`)."""
    return validate_artifact(path)


def config_ratio(config: dict) -> float:
    """The compression ratio an artifact (its ``config.json``) was trained for."""
    training = config.get("training") or {}
    return float(training.get("compression_ratio", 1 - config["layout"]["kept_fraction"]))


def config_variant(config: dict) -> str:
    """The variant of an artifact (``"mix"``, ``"heads"`` or ``"hybrid"``), from its layout."""
    return config["layout"].get("variant", "mix")


def check_compatible(config: dict, model, path="artifact") -> None:
    """Refuse an artifact made for another geometry or other K/V weights (or the same model in a dtype that
    rounds its weights differently, which the message says)."""
    geo = kv_geometry(model).to_dict()
    want = config["model"]["geometry"]
    for key in ("num_layers", "num_kv_heads", "head_dim", "num_attention_heads", "sliding_layers"):
        if want.get(key) != geo.get(key):
            raise ArtifactError(
                f"{path} was trained for a model with {key}={want.get(key)}, but this model has {geo.get(key)} "
                f"(artifact model: {config['model'].get('name')}); train an artifact for this model"
            )
    recorded = {k: v for k, v in config["model"].items() if k.startswith("kv_fingerprint")}
    mine = fingerprints(model)
    if any(mine.get(k) == v for k, v in recorded.items()):
        return
    trained, loaded = want.get("dtype"), geo.get("dtype")
    if trained and loaded and trained != loaded:
        raise ArtifactError(
            f"{path}: the K/V projection weights of this model, loaded in {loaded}, do not match those the artifact "
            f"was trained on (in {trained}; artifact model: {config['model'].get('name')}). If this is the same "
            f"model, load it in {trained} (--dtype {trained}); otherwise train an artifact for this model"
        )
    raise ArtifactError(f"{path} was trained on a different model (its K/V projection weights differ; artifact model: "
                        f"{config['model'].get('name')}); train an artifact for this model")


def _pack(state: dict, network: Mixes) -> dict[str, torch.Tensor]:
    """The tensors to save, each in its stored dtype (:meth:`~echokv.mixes.Mixes.stored_dtype`)."""
    return {name: t.detach().contiguous().to(network.stored_dtype(name)) for name, t in state.items()}


def load(path: str | Path, model=None, stage: int = 2) -> Mixes:
    """Load the network of an artifact (a :class:`~echokv.mixes.Mixes`); with
    ``model``, check it is the model the artifact was trained for.

    ``stage=1`` loads the stage-1 (closed-form) weights, when the artifact has them. The artifact is
    checked whole first (:func:`validate_artifact`); every problem is an :class:`ArtifactError`.
    """
    if isinstance(stage, bool) or stage not in STAGE_FILES:
        raise ValueError(f"stage must be 2 (the trained weights, the default) or 1 (the closed-form stage-1 "
                         f"weights), got {stage!r}")
    config = read_config(path)
    if model is not None:
        check_compatible(config, model, str(path))
    network = Mixes(MixLayout.from_dict(config["layout"]))
    weights = stage_file(Path(path).expanduser(), stage)
    if not weights.is_file():
        raise ArtifactError(f"{path} has no stage-{stage} weights ({weights.name}); load stage 2 instead")
    try:
        network.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, IndexError, KeyError) as exc:
        raise _fail(weights, f"could not be loaded into the network ({type(exc).__name__}: {exc})") from None
    bad = [name for name, t in network.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise _fail(weights, f"holds NaN or infinite values ({', '.join(bad[:3])}): the file is corrupt")
    network.requires_grad_(False)
    return network
