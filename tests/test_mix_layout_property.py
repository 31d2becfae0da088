"""Property test of the mix codec's stored layout (issue #28): whatever the lengths, RoPE positions, padding and
the blocks the cache hands it (switch points, chunks), storing tokens then decoding them equals the reference
rebuild: the network's encoder, the stored precision of each component (quantize / dequantize of the whole
sequence at once), its decoder, and RoPE at each token's own position."""

from __future__ import annotations

import itertools

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings
from hypothesis import strategies as st

from echokv.cache.store import GroupStore
from echokv.codecs.mix import MixCodec
from echokv.tiny import tiny_model
from helpers import train_tiny

_MADE: dict = {}


def _codec(ratio: float) -> tuple:
    if ratio not in _MADE:
        model = tiny_model("llama")
        _MADE[ratio] = (model, MixCodec(train_tiny(model, steps=0, compression_ratio=ratio)[0], model))
    return _MADE[ratio]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    ratio=st.sampled_from([0.5, 0.75, 0.875]),
    length=st.integers(1, 90),
    batch=st.integers(1, 3),
    cuts=st.lists(st.integers(1, 89), max_size=4),
    offsets=st.lists(st.integers(0, 500), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_stored_then_decoded_equals_the_reference_rebuild(ratio, length, batch, cuts, offsets, seed):
    _, codec = _codec(ratio)
    g = torch.Generator().manual_seed(seed)
    h, d = codec.h, codec.d
    group = 0
    layers = codec.groups[group]
    keys = [torch.randn(batch, h, length, d, generator=g) for _ in layers]
    values = [torch.randn(batch, h, length, d, generator=g) for _ in layers]
    # each row its own positions (a left-padded row starts later; a continued prompt far from 0)
    positions = torch.stack([torch.arange(length) + offsets[b] for b in range(batch)])

    whole = codec.encode(group, keys, values, positions=positions)
    store = GroupStore(layers)
    bounds = sorted({c for c in cuts if c < length} | {0, length})
    for s, e in itertools.pairwise(bounds):  # the blocks a cache would hand over at its switch points
        store.append(codec.encode(group, [k[:, :, s:e] for k in keys], [v[:, :, s:e] for v in values],
                                  positions=positions[:, s:e]), e - s)
    assert store.n_tokens == length
    for name, t in whole.items():  # per-token storage: blocks change nothing that is stored (a code may move by
        # one step where the encoder's matmul rounds differently for another number of rows)
        assert store.tensors[name].shape == t.shape, name
        assert (store.tensors[name].float() - t.float()).abs().max() <= (1 if name.endswith(".q") else 1e-2), name
    for layer in layers:
        k_ref, v_ref = codec.decode(layer, whole)
        k_out, v_out = codec.decode(layer, store.tensors)
        torch.testing.assert_close(k_out, k_ref, rtol=0.05, atol=0.05)
        torch.testing.assert_close(v_out, v_ref, rtol=0.05, atol=0.05)
        # and rebuilding one row alone gives that row: no mixing across the batch
        k_row, _ = codec.decode(layer, {n: t[-1:] for n, t in store.tensors.items()})
        torch.testing.assert_close(k_row, k_ref[-1:], rtol=1e-5, atol=1e-5)
