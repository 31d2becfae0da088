"""Models split across devices: accelerate's big-model dispatch, and where echokv's tensors live on such a model.

A device map (``--device-map``, ``load_model(device_map=...)``) is accelerate's: a strategy (:data:`STRATEGIES`),
resolved on an empty (meta) model within ``max_memory``, or a dict module name -> device (an int for a GPU,
``"cpu"``, ``"disk"``, ``"cuda:N"``, ``"mps"``), also as JSON inline or in a file. Weights mapped to ``"disk"``
are written to the offload folder and read back at every forward by accelerate's ``AlignDevicesHook``; weights
mapped to ``"cpu"`` next to a GPU are moved to it at forward time.

A layer's *execution device* is where its Q/K/V are computed and its cache lives: its mapped device, or for
``"cpu"``/``"disk"`` the main device (the first accelerator of the map, else the CPU), as accelerate runs it.
Calibration capture sees each layer's Q/K/V inside that layer's forward (weights in place, tensors on the
execution device); code that reads weights outside a forward (training's ``o_proj``, the artifact's fingerprint)
onloads them with :func:`onloaded`.

A group of layers (EchoKV's S layers that share stored components) lives on its *group device*, the device most
of its layers run on (ties: the earliest layer's): its compressed tokens and its decoder maps. A layer of the group
that runs elsewhere moves, per decode step, the tensors :func:`straddle_bytes` counts; ``keep_groups_on_device``
refuses such a map instead (:func:`check_groups`).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from .geometry import ModelLoadError, attention_modules, check_device, kv_geometry

log = logging.getLogger(__name__)

#: accelerate's placement strategies (``auto`` = ``balanced``: layers spread evenly over the accelerators)
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: where a module's weights may be mapped besides torch devices
OFFLOADED = ("cpu", "disk")


class PlacementError(ValueError):
    """A device map, memory limit or offload folder that cannot be used; the message says what to pass."""


# -- reading what the user wrote -------------------------------------------------------------------------------------
def parse_device_map(value) -> str | dict | None:
    """A strategy name, or a dict module -> device, from ``value``: a dict, a strategy, a device (the whole model
    there), inline JSON or a ``.json`` file. Devices are checked by :func:`check_device_map`."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value.strip():
        raise PlacementError(f"device map {value!r}: pass a strategy ({', '.join(STRATEGIES)}), a device, a JSON "
                             "object of module -> device, or a .json file holding one")
    text = value.strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{"):
        source = "inline JSON"
    elif text.endswith(".json") or Path(text).expanduser().is_file() or Path(text).expanduser().is_dir():
        path = Path(text).expanduser()
        if path.is_dir():
            raise PlacementError(f"device map {path} is a folder: pass a .json file of module -> device, a JSON "
                                 f"object or a strategy ({', '.join(STRATEGIES)})")
        if not path.is_file():
            raise PlacementError(f"device map file not found: {path}")
        source, text = str(path), path.read_text(encoding="utf-8")
    else:
        return {"": _device_value(text, "")}  # one device for the whole model
    try:
        mapping = json.loads(text)
    except ValueError as exc:
        raise PlacementError(f"device map {source} is not valid JSON ({exc})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise PlacementError(f"device map {source} must be a non-empty JSON object of module name -> device")
    return mapping


def _device_value(value, module: str):
    """A device map value as accelerate takes it: an int (GPU index), ``"cpu"``, ``"disk"`` or a torch device
    string this torch can use."""
    where = f"device map: module {module or '(whole model)'!r} ->"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PlacementError(f"{where} {value!r} is not a device; use a GPU index, 'cpu', 'disk', "
                             "'cuda:N' or 'mps'")
    if value in OFFLOADED:
        return value
    if isinstance(value, int):
        if value < 0:
            raise PlacementError(f"{where} {value}: a GPU index is >= 0")
        target = f"cuda:{value}"
    else:
        target = value
    if target == "meta":
        raise PlacementError(f"{where} 'meta' holds no weights; use 'disk' to offload them")
    try:
        check_device(target)
    except ModelLoadError as exc:
        raise PlacementError(f"{where} {value!r}: {exc}") from None
    return value


def parse_max_memory(value) -> dict | None:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` (or a dict) -> accelerate's ``max_memory`` {device: bytes or size}."""
    from accelerate.utils import convert_file_size_to_int

    if value is None:
        return None
    items = value.items() if isinstance(value, dict) else \
        [part.split("=", 1) if "=" in part else (part, None) for part in str(value).split(",") if part.strip()]
    out = {}
    for key, size in items:
        key = key.strip() if isinstance(key, str) else key
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if not (isinstance(key, int) and key >= 0) and key not in ("cpu", "mps", "disk"):
            raise PlacementError(f"max memory {value!r}: {key!r} is not a device; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        if isinstance(key, int) and key >= torch.cuda.device_count():  # accelerate fails deep inside otherwise
            raise PlacementError(f"max memory {value!r} names GPU {key}, but torch sees {torch.cuda.device_count()} "
                                 "GPU(s) here; give memory only to devices this machine has (e.g. cpu=20GiB)")
        try:
            out[key] = convert_file_size_to_int(size.strip() if isinstance(size, str) else size)
        except (ValueError, AttributeError, TypeError):
            raise PlacementError(f"max memory {value!r}: {size!r} is not a size for {key!r}; write e.g. 70GiB, "
                                 "500MB or a number of bytes") from None
    if not out:
        raise PlacementError(f"max memory {value!r} names no device; write e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    return out


# -- resolving a map on the model ------------------------------------------------------------------------------------
def resolve(model, device_map, max_memory: dict | None = None) -> dict:
    """A complete dict module -> device for ``model`` (real or on the meta device): a strategy is resolved as
    transformers' ``from_pretrained`` does; a dict is checked (every module named exists, every weight placed)."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        if device_map == "sequential":
            memory = get_max_memory(max_memory)
        else:
            memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        return dict(infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split))
    if max_memory is not None:
        raise PlacementError("--max-memory limits a strategy (--device-map auto, balanced, sequential); a device map "
                             "that names every module already says where it goes: drop one of them")
    mapping = {str(k): _device_value(v, str(k)) for k, v in device_map.items()}
    names = dict(model.named_modules())
    unknown = [k for k in mapping if k and k not in names]
    if unknown:
        layers = [n for n in names if re.fullmatch(r".*layers\.0", n)]
        raise PlacementError(f"device map names module {unknown[0]!r}, which this model does not have (its first "
                             f"decoder layer is {layers[0] if layers else '?'!r})")
    unplaced = [n for n, _ in model.named_parameters() if _owner(mapping, n) is None]
    if unplaced:
        raise PlacementError(f"device map places no device for {unplaced[0]!r} (and {len(unplaced) - 1} more "
                             "weights); map its module or a parent of it (\"\": the rest of the model)")
    return mapping


def _owner(mapping: dict, name: str):
    """The map entry covering module or weight ``name``: the longest key that is it or a parent of it."""
    best = None
    for key in mapping:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def main_device(mapping: dict) -> torch.device:
    """Where accelerate runs offloaded (``"cpu"``/``"disk"``) modules: the first accelerator of the map, else the
    CPU."""
    devices = [v for v in mapping.values() if v not in OFFLOADED]
    return _torch_device(min(devices, key=str)) if devices else torch.device("cpu")


def _torch_device(value) -> torch.device:
    if isinstance(value, torch.device):
        return value
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def execution_devices(model, mapping: dict) -> dict[int, torch.device]:
    """layer -> the device its attention runs on under ``mapping`` (before or after dispatch)."""
    names = {id(m): n for n, m in model.named_modules()}
    main = main_device(mapping)
    out = {}
    for layer, mod in attention_modules(model).items():
        value = mapping[_owner(mapping, names[id(mod)])]
        out[layer] = main if value in OFFLOADED else _torch_device(value)
    return out


def layer_devices(model) -> dict[int, torch.device]:
    """layer -> the device its K/V are computed on: for a dispatched model, the execution device of accelerate's
    hook on the layer's attention (or on a module holding it), else where the layer's weights are."""
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    out = {}
    for layer, mod in attention_modules(model).items():
        name = names[id(mod)]
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts), -1, -1)]
        holders = [*mod.modules(), *(mods[a] for a in ancestors[1:] if a in mods)]
        hooked = next((getattr(m._hf_hook, "execution_device", None) for m in holders
                       if getattr(getattr(m, "_hf_hook", None), "execution_device", None) is not None), None)
        out[layer] = _torch_device(hooked) if hooked is not None else next(mod.parameters()).device
    return out


def input_device(model) -> torch.device:
    """Where token ids go: the execution device of the input embeddings (accelerate moves them there anyway;
    passing them there saves the copy)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return _torch_device(hook.execution_device)
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        return main_device(mapping)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


# -- groups of layers ----------------------------------------------------------------------------------------------
def group_device(group: list[int], devices: dict[int, torch.device]) -> torch.device:
    """The device most of the group's layers run on (ties: the earliest layer's)."""
    counts = Counter(devices[layer] for layer in group)
    top = max(counts.values())
    return next(devices[layer] for layer in group if counts[devices[layer]] == top)


def split_groups(groups: list[list[int]], devices: dict[int, torch.device]) -> list[list[int]]:
    """The groups whose layers run on more than one device."""
    return [list(g) for g in groups if len({devices[layer] for layer in g}) > 1]


def straddle_bytes(geometry, groups: list[list[int]], devices: dict[int, torch.device], batch: int = 1,
                   full_window: int = 0, positions: bool = True) -> int:
    """Bytes moved between devices per decode step (one new token per sequence, the fast decode path) by the
    groups that straddle devices, counted from the geometry: for every layer that runs off its group's device,

    * its new token's K and V, to the group's device (to be encoded): ``2 H d``;
    * its queries there and the attention output back: ``2 Hq d``;
    * its recent, uncompressed K and V (the full window and the new token) to the group's device: ``2 H (W + 1) d``

    elements of the cache's dtype per sequence; plus, for a codec that stores positions, the new token's int64
    position, once per group whose device is not the first compressible layer's. Not counted: the attention mask
    row, when transformers passes one (it does not in a batch without padding)."""
    h, hq, d, e = geometry.num_kv_heads, geometry.num_attention_heads, geometry.head_dim, geometry.bytes_per_element
    first = devices[min(layer for g in groups for layer in g)] if groups else None
    total = 0
    for g in groups:
        home = group_device(g, devices)
        away = sum(devices[layer] != home for layer in g)
        total += away * batch * e * d * (2 * h + 2 * hq + 2 * h * (full_window + 1))
        if positions and home != first:
            total += 8 * batch
    return total


def align(model, mapping: dict, groups: list[list[int]]) -> dict:
    """``mapping`` (a strategy's) with every group that runs on two devices moved whole to its group device: the
    map a strategy gives with ``keep_groups_on_device``. That device then holds up to S/2 layers more than the
    strategy planned for it (logged)."""
    devices = execution_devices(model, mapping)
    names = {id(m): n for n, m in model.named_modules()}
    attn = attention_modules(model)
    out = dict(mapping)
    for g in split_groups(groups, devices):
        home = group_device(g, devices)
        value = next(mapping[_owner(mapping, names[id(attn[layer])])] for layer in g if devices[layer] == home)
        for layer in g:
            if devices[layer] == home:
                continue
            key = _owner(mapping, names[id(attn[layer])])
            layer_name = names[id(attn[layer])].rsplit(".", 1)[0]  # the decoder layer holding the attention
            if not (key == layer_name or key.startswith(layer_name + ".")):
                raise PlacementError(f"the device map places layer {layer} through {key!r} with other layers; it "
                                     "cannot be moved alone to keep its group on one device")
            for k in [k for k in out if k == layer_name or k.startswith(layer_name + ".")]:
                out[k] = value
        log.info("device map: layers %s moved to %s with the rest of their group", 
                 [layer for layer in g if devices[layer] != home], home)
    return out


def check_groups(model, groups: list[list[int]], devices: dict[int, torch.device], keep_on_device: bool) -> None:
    """Refuse (``keep_on_device``) or report a placement that runs a group's layers on two devices."""
    split = split_groups(groups, devices)
    if not split:
        return
    where = ", ".join(str(d) for d in dict.fromkeys(devices[layer] for layer in split[0]))
    if keep_on_device:
        raise PlacementError(
            f"the device map splits the group of layers {split[0]} over {where} ({len(split)} group(s) split) and "
            "--keep-groups-on-device is set: move the map's boundaries to multiples of the group size, or drop the "
            "flag to let split groups move their tensors between devices")
    geo = kv_geometry(model)
    log.info("%d group(s) of layers run on two devices (first: %s on %s); they move %d bytes per decode step and "
             "sequence (echokv.placement.straddle_bytes; pass --keep-groups-on-device to refuse such a map)",
             len(split), split[0], where, straddle_bytes(geo, groups, devices))


# -- dispatching ---------------------------------------------------------------------------------------------------
def offload_folder(mapping: dict, folder: str | None) -> str | None:
    """The folder for ``"disk"`` weights: the user's (which must be empty or new: accelerate would otherwise read
    the weights it already holds, perhaps of another model), or a temporary one removed at exit."""
    if "disk" not in mapping.values():
        return folder
    if folder is None:
        tmp = tempfile.mkdtemp(prefix="echokv-offload-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        return tmp
    path = check_offload_folder(folder)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def check_offload_folder(folder: str) -> Path:
    path = Path(folder).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PlacementError(f"offload folder {path} is not an empty folder: pass a new or empty one (accelerate "
                             "would read the weights already there, which may be another model's)")
    return path


def dispatch(model, mapping: dict, folder: str | None):
    """``model`` (loaded on the CPU) placed by ``mapping`` with accelerate's hooks."""
    from accelerate import dispatch_model

    skip = getattr(model, "_skip_keys_device_placement", None)
    dispatch_model(model, mapping, main_device=main_device(mapping), offload_dir=folder,
                   skip_keys=list(skip) if skip else None)
    return model


def readable(modules: dict) -> dict:
    """Attention modules (layer -> module) whose ``o_proj.weight`` and ``scaling`` training reads on the CPU, where
    its statistics and stage 2 run: a module whose weight is elsewhere (an accelerator, or offloaded by accelerate:
    meta outside a forward) is replaced by a view holding a CPU copy of its ``o_proj`` weight."""
    out = {}
    for layer, mod in modules.items():
        if mod.o_proj.weight.device.type == "cpu":
            out[layer] = mod
            continue
        with onloaded(mod.o_proj):
            weight = mod.o_proj.weight.detach().to("cpu", copy=True)
        out[layer] = SimpleNamespace(scaling=mod.scaling, o_proj=SimpleNamespace(weight=weight), layer_idx=layer)
    return out


def onloaded(module: torch.nn.Module):
    """Within the block, the weights of ``module`` and its submodules that accelerate offloaded (meta outside a
    forward) are in place on their execution device."""
    from accelerate.utils import align_module_device

    stack = contextlib.ExitStack()
    for mod in module.modules():
        if getattr(getattr(mod, "_hf_hook", None), "offload", False):
            stack.enter_context(align_module_device(mod))
    return stack
