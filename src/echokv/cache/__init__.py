"""The KV cache: transformers' per-layer protocol, with groups of layers that share one store of compressed
tokens, a small codec protocol, and byte accounting for any cache.

* :mod:`~echokv.cache.compressed`: ``CompressedCache`` (full mode, then compressed by a codec), ``FullCache``;
  an artifact's cache and codec (``EchoKVCache``, ``mix_codec``) live with its codec, :mod:`echokv.codecs.mix`;
* :mod:`~echokv.cache.switch`: ``Switch``, when a cache leaves full mode (its mode, a token count, a byte budget);
* :mod:`~echokv.cache.tiers`: ``TieredCache`` (full, then each codec of a ladder in turn on memory pressure);
* :mod:`~echokv.cache.layers`: ``GrowingLayer`` (appends in place), ``CompressedLayer`` (recent tokens + its
  group's store);
* :mod:`~echokv.cache.store`: ``GroupStore``, ``Appender``;
* :mod:`~echokv.cache.codec`: the ``KVCodec`` protocol (codecs themselves live in :mod:`echokv.codecs`);
* :mod:`~echokv.cache.accounting`: bytes of any transformers cache;
* ``echokv_attention(model)``, the scope of the echokv attention (:mod:`echokv.attention`), which the fast
  path needs.
"""

from ..attention import echokv_attention
from .codec import KVCodec
from .compressed import CompressedCache, FullCache
from .layers import CompressedLayer, GrowingLayer
from .store import Appender, GroupStore
from .tiers import TieredCache

__all__ = ["Appender", "CompressedCache", "CompressedLayer", "FullCache", "GroupStore", "GrowingLayer", "KVCodec",
           "TieredCache", "echokv_attention"]
