"""echokv: KV cache compression for Hugging Face causal LMs by similarity-based reconstruction (EchoKV)."""

__version__ = "0.1.0"

from .models import DEFAULT_MODEL, KVGeometry, kv_geometry, load_model

__all__ = ["DEFAULT_MODEL", "KVGeometry", "__version__", "kv_geometry", "load_model"]
