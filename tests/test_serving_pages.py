"""EchoKV-Q's codes in a serving engine's pages (echokv/serving/pages.py): the bytes round-trip, and a sequence
read from shuffled pages attends exactly as the codec does on its own store (main environment; no vLLM)."""

from __future__ import annotations

import pytest
import torch

from echokv.codecs.headq import TOKEN_BLOCK, fit, load, save, token_bytes
from echokv.serving.pages import PageFormat, Pages, Sequence, attend, decode, page_bytes
from echokv.tiny import tiny_model

LAYER = 1


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", head_dim=32)
    codec = fit(model, torch.randint(3, 250, (4, 64), generator=torch.Generator().manual_seed(0)), 0.75)
    return model, codec


def _kv(h, t, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, h, t, d, generator=g), torch.randn(1, h, t, d, generator=g)


def test_the_page_bytes_are_the_stored_tensors(setup):
    _, codec = setup
    h, d = codec.params[LAYER]["k_mean"].shape
    k, v = _kv(h, 3 * TOKEN_BLOCK, d)
    stored = codec.encode(codec.groups.index([LAYER]), [k], [v], start=TOKEN_BLOCK)
    fmt = PageFormat(codec.widths[LAYER], h)
    packed = fmt.pack(stored)
    assert packed.shape == (3, fmt.block_bytes) and fmt.block_bytes % (2 * TOKEN_BLOCK) == 0
    cache = torch.zeros(5, 2 * TOKEN_BLOCK, page_bytes(codec.widths[LAYER], h, 2 * TOKEN_BLOCK), dtype=torch.uint8)
    pages = Pages(cache, fmt)
    table = torch.tensor([4, 0])  # the sequence's blocks 0-1 in page 4, block 2 in page 0
    pages.write(table, 0, packed)
    back = pages.read(table, 3)
    assert set(back) == set(stored)
    for name, t in stored.items():
        assert torch.equal(back[name], t), name
    assert cache[1:4].count_nonzero() == 0 and cache[0, TOKEN_BLOCK:].count_nonzero() == 0
    # the bytes are what the codec counts, padded to an even number per token
    counted = sum(token_bytes(codec.widths[LAYER][kind], kind) for kind in ("k", "v")) * h
    assert counted <= fmt.block_bytes / TOKEN_BLOCK < counted + 2


def test_page_sizes_are_checked():
    with pytest.raises(ValueError, match="multiple of EchoKV-Q's block"):
        page_bytes({"k": ((8, 8),), "v": ((8, 8),)}, 2, 100)


def _reference(codec, h, keys, values, q, past, scaling):
    """What the codec's own store gives for a call of q at positions past.. (the cache's semantics)."""
    n = q.shape[0]
    coded = past // TOKEN_BLOCK * TOKEN_BLOCK
    recent_k, recent_v = keys[:, :, coded : past + n], values[:, :, coded : past + n]
    qq = q.transpose(0, 1)[None]
    if coded and n == 1:
        stored = codec.encode(codec.groups.index([LAYER]), [keys[:, :, :coded]], [values[:, :, :coded]], start=0)
        return codec._attend(LAYER, stored, qq, recent_k, recent_v, None, scaling)[0]
    past_k, past_v = keys[:, :, :0], values[:, :, :0]
    if coded:
        stored = codec.encode(codec.groups.index([LAYER]), [keys[:, :, :coded]], [values[:, :, :coded]], start=0)
        past_k, past_v = codec.decode(LAYER, stored)
    kk, vv = torch.cat([past_k, recent_k], dim=2), torch.cat([past_v, recent_v], dim=2)
    t = kk.shape[2]
    mask = torch.arange(t) <= t - n + torch.arange(n)[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[0].transpose(0, 1)


def test_a_sequence_in_pages_attends_as_the_codec(setup):
    _, codec = setup
    h, d = codec.params[LAYER]["k_mean"].shape
    hq = 2 * h
    total = 3 * TOKEN_BLOCK + 30
    keys, values = _kv(h, total, d, seed=1)
    qs = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(2))
    fmt = PageFormat(codec.widths[LAYER], h)
    cache = torch.zeros(6, 2 * TOKEN_BLOCK, page_bytes(codec.widths[LAYER], h, 2 * TOKEN_BLOCK), dtype=torch.uint8)
    pages, seq, table = Pages(cache, fmt), Sequence(3), torch.tensor([5, 2, 3])
    scaling = d**-0.5
    calls = [70, 30, *[1] * 38, 5, *[1] * (total - 143)]  # a prefill, a chunk, decode steps, a few queries
    assert sum(calls) == total
    past = 0
    for n in calls:
        q = qs[past : past + n]
        k, v = keys[0, :, past : past + n].transpose(0, 1), values[0, :, past : past + n].transpose(0, 1)
        out = attend(codec, LAYER, pages, seq, table, past, q, k, v, scaling)
        want = _reference(codec, h, keys, values, q, past, scaling)
        if n == 1 or past < TOKEN_BLOCK or n > 16:  # the same kernel or the same rebuild: the same numbers
            torch.testing.assert_close(out, want, rtol=0, atol=1e-6, msg=f"call at {past}")
        else:  # a few queries: the kernel's fixed-point read against the rebuild
            torch.testing.assert_close(out, want, rtol=0, atol=5e-2, msg=f"call at {past}")
        past += n
    torch.testing.assert_close(pages.exact.sink_k[3], keys[0, :, :4])  # the sinks, exact


def test_a_batch_of_decode_steps_is_each_sequences_own(setup):
    _, codec = setup
    h, d = codec.params[LAYER]["k_mean"].shape
    hq, scaling = 2 * h, d**-0.5
    lengths = [TOKEN_BLOCK + 3, 3 * TOKEN_BLOCK - 2, 2 * TOKEN_BLOCK + 40]  # one completes a block after 2 steps
    g = torch.Generator().manual_seed(3)
    chunk = page_bytes(codec.widths[LAYER], h, 2 * TOKEN_BLOCK)
    fmt = PageFormat(codec.widths[LAYER], h)
    # two engines holding the same sequences in different pages: one steps them together, one alone
    together, alone = (Pages(torch.zeros(8, 2 * TOKEN_BLOCK, chunk, dtype=torch.uint8), fmt) for _ in range(2))
    tables = [torch.tensor([0, 5]), torch.tensor([3, 1]), torch.tensor([7, 2])]
    seqs = {"together": [Sequence(i) for i in (2, 0, 9)], "alone": [Sequence(i) for i in range(3)]}
    for i, t in enumerate(lengths):
        q, k, v = torch.randn(t, hq, d, generator=g), torch.randn(t, h, d, generator=g), torch.randn(t, h, d, generator=g)
        for pages, key in ((together, "together"), (alone, "alone")):
            attend(codec, LAYER, pages, seqs[key][i], tables[i], 0, q, k, v, scaling)
    for step in range(4):
        q, k, v = torch.randn(3, hq, d, generator=g), torch.randn(3, h, d, generator=g), torch.randn(3, h, d, generator=g)
        pasts = [t + step for t in lengths]
        out = decode(codec, LAYER, together, seqs["together"], tables, pasts, q, k, v, scaling)
        for i in range(3):
            own = attend(codec, LAYER, alone, seqs["alone"][i], tables[i], pasts[i], q[i : i + 1], k[i : i + 1],
                         v[i : i + 1], scaling)
            torch.testing.assert_close(out[i : i + 1], own, rtol=0, atol=1e-5, msg=f"step {step}, sequence {i}")
    assert torch.equal(together.cache, alone.cache)  # the block completed in the batch was coded the same


def test_a_saved_codec_loads_as_it_was(setup, tmp_path):
    model, codec = setup
    save(codec, tmp_path / "q", model, 0.75)
    back = load(tmp_path / "q")
    assert back.widths == codec.widths and back.dtype == codec.dtype
    for layer, p in codec.params.items():
        for name, t in p.items():
            assert torch.equal(back.params[layer][name], t)
    (tmp_path / "q" / "echokv-q.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="checksum"):
        load(tmp_path / "q")
    with pytest.raises(ValueError, match="holds no EchoKV-Q codec"):
        load(tmp_path)


def test_an_engine_step_mixes_prefills_and_decode_steps_and_reuses_ended_sequences_slots(setup):
    """Engine.forward as vLLM calls it (every request's tokens in one flat batch) against each sequence alone."""
    from echokv.serving.pages import Engine

    _, codec = setup
    h, d = codec.params[LAYER]["k_mean"].shape
    hq, scaling, tokens = 2 * h, d**-0.5, 2 * TOKEN_BLOCK
    chunk = page_bytes(codec.widths[LAYER], h, tokens)
    engine = Engine(codec, h)
    engine.first = LAYER  # this test runs one layer
    cache = torch.zeros(12, tokens, chunk, dtype=torch.uint8)
    alone = Pages(torch.zeros(12, tokens, chunk, dtype=torch.uint8), PageFormat(codec.widths[LAYER], h))
    table = torch.tensor([[0, 4, 8], [1, 5, 9], [2, 6, 10]])
    g = torch.Generator().manual_seed(4)
    lengths, own = [0, 0, 0], [Sequence(i) for i in range(3)]

    def step(new: list[int]):
        n = sum(new)
        q, k, v = torch.randn(n, hq, d, generator=g), torch.randn(n, h, d, generator=g), torch.randn(n, h, d, generator=g)
        qsl = [0]
        for c in new:
            qsl.append(qsl[-1] + c)
        seq_lens = [t + c for t, c in zip(lengths, new)]
        out = engine.forward(LAYER, q, k, v, cache, qsl, seq_lens, table, 3, torch.zeros(n, hq, d), scaling)
        for i, c in enumerate(new):
            want = attend(codec, LAYER, alone, own[i], table[i], lengths[i], q[qsl[i] : qsl[i + 1]],
                          k[qsl[i] : qsl[i + 1]], v[qsl[i] : qsl[i + 1]], scaling)
            torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], want, rtol=0, atol=1e-5)
            lengths[i] += c

    step([100, 70, 3])  # three prefills
    for _ in range(3):
        step([1, 1, 1])  # two decode through the batch, one short one alone
    step([1, 1, 90])  # a prefill chunk beside two decode steps
    assert sorted(s.slot for s in engine.sequences.values()) == [0, 1, 2]
    assert torch.equal(cache, alone.cache.view_as(cache))
    # request 2 ends; a new request gets its first page: the same slot, its exact tokens started afresh
    old = engine.sequences[2].slot
    lengths[2], own[2] = 0, Sequence(2)
    step([1, 1, 5])
    assert engine.sequences[2].slot == old and len(engine.sequences) == 3
    # request 1 ends (it leaves the batch) and its first page turns up inside another request's table: its slot is
    # freed, and the next new sequence takes it
    engine.new_step([2 * tokens + 1, lengths[2] + 1], torch.tensor([[0, 1, 8], [2, 6, 10]]), tokens)
    assert 1 not in engine.sequences and engine.free == [1]
    engine.start(11)
    assert engine.sequences[11].slot == 1 and not engine.free


# -- offloading a full engine's K/V as codes (echokv/serving/offload.py) ----------------------------------------------
def _vec_write(k, v, key_cache, value_cache, slots):
    """vLLM 0.16's CPU ``vec`` layout: per block and head, keys [head_dim, block_size], values [block_size, head_dim]."""
    size = key_cache.shape[2]
    for t, s in enumerate(slots.tolist()):
        b, o = divmod(s, size)
        key_cache[b].view(key_cache.shape[1], -1, size)[:, :, o] = k[t]
        value_cache[b, :, o] = v[t]


def test_the_offload_layout_is_learned_from_the_engines_write():
    from echokv.serving import offload

    heads, size, dim = 2, 32, 16
    for dtype in (torch.float32, torch.bfloat16):
        where_k, where_v = offload.probe(_vec_write, size, heads, dim, dtype)
        caches = [torch.zeros(4, heads, size, dim, dtype=dtype) for _ in range(2)]
        slots = torch.tensor([70, 71, 5, 100, 127, 64])  # ragged, across blocks
        k, v = torch.randn(6, heads, dim).to(dtype), torch.randn(6, heads, dim).to(dtype)
        _vec_write(k, v, *caches, slots)
        assert torch.equal(offload.read_slots(caches[0], where_k, slots), k)
        assert torch.equal(offload.read_slots(caches[1], where_v, slots), v)
        again = [torch.zeros_like(c) for c in caches]
        offload.write_slots(again[0], where_k, slots, k)
        offload.write_slots(again[1], where_v, slots, v)
        assert all(torch.equal(a, c) for a, c in zip(again, caches))
    with pytest.raises(RuntimeError, match="unknown cache layout"):  # a write that loses elements is no layout
        offload.probe(lambda k, v, kc, vc, s: kc.zero_(), size, heads, dim, torch.float32)


def test_offloaded_kv_restores_what_the_codec_reads_and_is_refused_when_changed(setup, tmp_path):
    from echokv.serving import offload

    _, codec = setup
    h, d = codec.params[LAYER]["k_mean"].shape
    k, v = _kv(h, 2 * TOKEN_BLOCK, d, seed=3)
    tensors = offload.encode(codec, LAYER, k[0].transpose(0, 1), v[0].transpose(0, 1))
    back_k, back_v = offload.decode(codec, LAYER, tensors)
    want_k, want_v = codec.decode(LAYER, codec.encode(codec.groups.index([LAYER]), [k], [v]))
    assert torch.equal(back_k, want_k[0].transpose(0, 1)) and torch.equal(back_v, want_v[0].transpose(0, 1))
    assert torch.equal(back_k[: codec.sink_tokens], k[0, :, : codec.sink_tokens].transpose(0, 1))  # sinks exact
    assert tensors[f"{LAYER}.pages"].numel() == 2 * PageFormat(codec.widths[LAYER], h).block_bytes

    folder = tmp_path / "prompt"
    offload.save(folder, tensors, "codec-a", 2 * TOKEN_BLOCK)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt"]  # complete, nothing beside it
    loaded = offload.load(folder, "codec-a")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert "another EchoKV-Q codec" in offload.check(folder, "codec-b")
    data = bytearray((folder / "kv.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "kv.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        offload.load(folder, "codec-a")
    assert "incomplete" in offload.check(tmp_path / "absent", "codec-a")
