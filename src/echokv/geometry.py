"""What echokv reads of a model's structure, with no other echokv module: the model types it supports, the KV
geometry (:class:`KVGeometry`), the attention modules, dtypes and devices. A leaf: :mod:`echokv.models` (loading)
and :mod:`echokv.placement` (devices) both build on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

# Model families whose attention echokv's cache understands (GQA/MHA with a standard KV cache).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3", "gemma2")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """A model could not be resolved or loaded; the message says what to install or pass."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device) -> torch.device:
    """``device`` as a torch device this torch can use; a :class:`ModelLoadError` saying why not otherwise
    (before a model is loaded, instead of an assertion deep inside torch)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; pass cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)")
            raise ModelLoadError(f"device {device!r} cannot be used: {why} (torch {torch.__version__}); pass "
                                 "--device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                                 "are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {device!r} cannot be used: MPS is not available here; pass --device cpu")
    return dev


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


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """layer index -> the attention module of that decoder layer."""
    out = {}
    for mod in model.modules():
        if hasattr(mod, "o_proj") and hasattr(mod, "layer_idx") and (hasattr(mod, "k_proj") or hasattr(mod, "qkv_proj")):
            out[mod.layer_idx] = mod
    return out
