"""echokv in a serving engine (docs/serving.md): the stored rows and the serde of offloaded K/V (main environment),
and vLLM itself (marker ``serve``: needs .venv-serve, skipped without it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from echokv.cache import CompressedCache
from echokv.codecs.mix import MixCodec
from echokv.serving.rope import RopeHost
from echokv.serving.rows import KVSerde
from echokv.tiny import tiny_model
from helpers import train_tiny


@pytest.fixture(scope="module")
def tiny_mix():
    torch.manual_seed(0)
    model = tiny_model("llama")
    mixes, _ = train_tiny(model, steps=0, variant="mix", compression_ratio=0.5)
    return model, mixes


def _full_kv(model, ids):
    """Full K/V [L, T, H, d] of every layer (keys after RoPE, as a cache holds them)."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    keys = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])
    return keys, torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers])


def test_serde_rebuilds_what_the_cache_rebuilds_from_the_artifacts_bytes(tiny_mix):
    model, mixes = tiny_mix
    ids = torch.randint(3, 250, (1, 37), generator=torch.Generator().manual_seed(1))
    keys, values = _full_kv(model, ids)
    serde = KVSerde(mixes, model)
    data = serde.encode(keys, values, torch.arange(ids.shape[1]))
    back_k, back_v = serde.decode(data)

    cache = CompressedCache(model, MixCodec(mixes, model), mode="compressed")
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    empty = keys.new_zeros(1, keys.shape[2], 0, keys.shape[3])
    for layer in range(keys.shape[0]):
        ref_k, ref_v = cache.layers[layer].update(empty, empty)
        assert torch.equal(back_k[layer], ref_k[0].transpose(0, 1)), layer
        assert torch.equal(back_v[layer], ref_v[0].transpose(0, 1)), layer
    assert not torch.equal(back_v, values)  # something was dropped: the test compares rebuilt K/V, not copies

    # the bytes are the artifact's stored bits, its kept fraction of the full K/V
    layout = mixes.layout
    assert len(data) * 8 == ids.shape[1] * layout.bits()
    full = ids.shape[1] * serde.full_token_bytes(layout.element_bits // 8)
    assert len(data) / full == pytest.approx(layout.kept_fraction(), abs=1e-12)
    assert len(data) < full


def test_serde_keeps_positions_a_block_starting_mid_sequence_and_a_config_only_host(tiny_mix):
    """A block offloaded from the middle of a sequence comes back rotated at its own positions; a RopeHost built
    from the config alone (what an engine has) gives the same bytes and K/V as the model."""
    model, mixes = tiny_mix
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    keys, values = _full_kv(model, ids)
    block = slice(24, 40)
    serde = KVSerde(mixes, model)
    whole_k, _ = serde.decode(serde.encode(keys, values, torch.arange(40)))
    data = serde.encode(keys[:, block], values[:, block], torch.arange(24, 40))
    part_k, _ = serde.decode(data)
    assert torch.allclose(part_k, whole_k[:, block], atol=1e-5)
    host = KVSerde(mixes, RopeHost(model.config))
    assert host.encode(keys[:, block], values[:, block], torch.arange(24, 40)) == data
    assert torch.equal(host.decode(data)[0], part_k)


def test_rows_of_one_token_unpack_at_any_byte_offset(tiny_mix):
    """A single token's row read from a larger buffer at an odd byte offset (an engine's cache, a second group in a
    byte string): its fields' slices are contiguous but misaligned for float16 / int32 (a served request with one
    past token once crashed the engine here)."""
    model, mixes = tiny_mix
    ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(3))
    keys, values = _full_kv(model, ids)
    serde = KVSerde(mixes, model)
    layers = serde.codec.groups[0]
    rows = serde.encode_rows(0, [keys[x, 5:].transpose(0, 1)[None] for x in layers],
                             [values[x, 5:].transpose(0, 1)[None] for x in layers], torch.tensor([[5]]))
    buffer = torch.zeros(rows.numel() + 1, dtype=torch.uint8)
    buffer[1:] = rows.flatten()
    odd = buffer[1:].view(1, 1, -1)
    for name, t in serde.formats[0].unpack(odd).items():
        assert torch.equal(t, serde.formats[0].unpack(rows)[name]), name


def test_serde_refuses_bad_input_in_one_line(tiny_mix):
    model, mixes = tiny_mix
    serde = KVSerde(mixes, model)
    keys = torch.zeros(3, 5, 2, 16)
    with pytest.raises(ValueError, match="layers=4"):
        serde.encode(keys, keys, torch.arange(5))
    with pytest.raises(ValueError, match="whole number of tokens"):
        serde.decode(b"\0" * (serde.token_bytes + 1))


# -- start-up checks of an engine (echokv.serving.check; the vLLM plugin runs them) ------------------------------------
@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    """tiny-llama exported as an engine would load it, and a mix artifact trained on it."""
    from echokv.artifact import save
    from echokv.models import load_model
    from echokv.serving.export import export

    root = tmp_path_factory.mktemp("served")
    model, _ = load_model("tiny-llama")
    mixes, _ = train_tiny(model, steps=0, variant="mix", compression_ratio=0.5)
    save(mixes, model, root / "artifact")
    return export(root / "model", "tiny-llama"), root / "artifact", model


def _hf_config(folder):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def test_export_writes_a_folder_transformers_loads_with_the_same_logits(tiny_served):
    from transformers import AutoModelForCausalLM

    folder, _, model = tiny_served
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 250, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    import json

    written = json.loads((folder / "config.json").read_text())  # what transformers 4 reads
    assert written["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    from echokv.serving.export import export
    from echokv.util import OutputFolderError

    with pytest.raises(OutputFolderError):  # never replaces a folder
        export(folder, "tiny-llama")


def test_engine_check_accepts_the_artifact_of_the_served_model(tiny_served):
    from echokv.serving.check import load_for_engine

    folder, artifact, _ = tiny_served
    mixes = load_for_engine(artifact, _hf_config(folder), folder)
    assert mixes.layout.layers == list(range(_hf_config(folder).num_hidden_layers))
    torch.set_default_dtype(torch.bfloat16)  # what a bfloat16 engine sets while it builds the model
    try:
        again = load_for_engine(artifact, _hf_config(folder), folder)
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), mixes.state_dict().values()))


def test_engine_check_refuses_artifacts_it_cannot_serve_in_one_line(tiny_served, tmp_path):
    from echokv.artifact import save
    from echokv.serving.check import ServeError, load_for_engine

    folder, artifact, model = tiny_served
    config = _hf_config(folder)
    cases = {}
    other = tiny_model("llama", seed=7, vocab_size=model.config.vocab_size)  # same geometry, other weights
    save(train_tiny(other, steps=0, variant="mix", compression_ratio=0.5)[0], other, tmp_path / "other-weights")
    cases["other-weights"] = "trained on a different model"
    deeper = tiny_model("llama", num_hidden_layers=2, vocab_size=model.config.vocab_size)
    save(train_tiny(deeper, steps=0, variant="mix", compression_ratio=0.5)[0], deeper, tmp_path / "other-geometry")
    cases["other-geometry"] = "num_layers=2, but the served model has 4"
    shutil.copytree(Path(__file__).parent / "data" / "artifact-0.1.0-echo", tmp_path / "retired")  # echokv 0.1
    cases["retired"] = "trained by a retired variant"
    for name, message in cases.items():
        with pytest.raises(ServeError, match=message) as err:
            load_for_engine(tmp_path / name, config, folder)
        assert "\n" not in str(err.value), name
    with pytest.raises(ServeError, match="not a local folder"):
        load_for_engine(artifact, config, "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(ServeError, match="artifact folder not found"):
        load_for_engine(tmp_path / "missing", config, folder)


# -- vLLM itself (marker serve: .venv-serve, minutes) ----------------------------------------------------------------
def _needs_serve():
    from echokv.serving.server import SERVE_VENV

    return pytest.mark.skipif(not (SERVE_VENV / "bin" / "vllm").exists(),
                              reason="no .venv-serve (bash scripts/setup.sh serve)")


def serve(test):
    """Marks a test that starts vLLM servers."""
    for mark in (pytest.mark.serve, pytest.mark.real_model, _needs_serve()):
        test = mark(test)
    return test


PROMPTS = ["What is the capital of France?", "List three primary colors.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def smollm2_fp32():
    from echokv.models import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    from echokv.serving.export import export

    return export(tmp_path_factory.mktemp("served") / "smollm2", dtype="float32")


def _served(srv, ids, n, eos):
    """The server's greedy tokens without the end-of-sequence token it includes when it stops there."""
    out = srv.complete(ids, n)["token_ids"]
    return out[:-1] if out and out[-1] in eos else out


def _prompt_ids(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for p in PROMPTS]


@torch.no_grad()
def _greedy(model, ids, n, eos, artifact=None):
    """transformers' greedy tokens; with ``artifact``, through echokv's own cache compressed from the first token
    (exact within a forward call, compressed afterwards, as the vLLM backend does)."""
    from transformers import DynamicCache

    from echokv.codecs.mix import EchoKVCache

    cache = DynamicCache() if artifact is None else EchoKVCache(model, artifact, mode="compressed")
    return _greedy_in(model, cache, ids, n, eos)


@torch.no_grad()
def _greedy_in(model, cache, ids, n, eos, start=0):
    from echokv.attention import echokv_attention
    from echokv.generation import prefill

    out = []
    with echokv_attention(model):
        logits = prefill(model, cache, torch.tensor([ids[start:]]))
        while len(out) < n and int(logits[0].argmax()) not in eos:
            out.append(int(logits[0].argmax()))
            logits = prefill(model, cache, torch.tensor([out[-1:]]), chunk_size=1)
    return out


@serve
def test_vllm_serves_the_exported_model_with_transformers_greedy_answers(smollm2_folder, smollm2_fp32, tmp_path):
    import urllib.error

    from echokv.serving.server import Server

    model, tokenizer = smollm2_fp32
    eos = {tokenizer.eos_token_id}
    with Server(smollm2_folder, tmp_path / "full.log") as srv:
        for ids in _prompt_ids(tokenizer):
            assert _served(srv, ids, 24, eos) == _greedy(model, ids, 24, eos)
        with pytest.raises(urllib.error.HTTPError) as err:  # longer than the context: vLLM's own error
            srv.complete([100] * 4200, 4)
        assert err.value.code == 400
        assert srv.complete("Hello", 4)["token_ids"]  # and the server keeps serving


@serve
def test_vllm_keeps_the_artifacts_rows_and_answers_like_echokvs_own_cache(smollm2_folder, smollm2_fp32,
                                                                          smollm2_artifact, tmp_path):
    from echokv.artifact import load
    from echokv.serving.rows import KVSerde
    from echokv.serving.server import BLOCK_SIZE, Server
    from echokv.serving.vllm import serve_args

    model, tokenizer = smollm2_fp32
    serde = KVSerde(load(smollm2_artifact), model)
    per_token = 0  # bytes the engine keeps per token: each layer its even share of its group's row
    for g, fmt in enumerate(serde.formats):
        size = len(serde.codec.groups[g])
        chunk = -(-fmt.nbytes // size)
        per_token += size * (chunk + chunk % 2)
    eos = {tokenizer.eos_token_id}
    with Server(smollm2_folder, tmp_path / "echokv.log", serve_args(smollm2_artifact)) as srv:
        tokens = srv.kv_cache_tokens()
        # 1 GiB of cache filled with rows, not K/V (full float32 K/V: 46,080 bytes per token, 23,296 tokens)
        assert 0 <= 2**30 - tokens * per_token < BLOCK_SIZE * per_token
        assert tokens / (2**30 // 46080) > 3.6  # float32 K/V against rows of a 16-bit budget at 0.5
        same = [_served(srv, ids, 24, eos) == _greedy(model, ids, 24, eos, smollm2_artifact)
                for ids in _prompt_ids(tokenizer)]
        assert all(same), same


@pytest.fixture(scope="module")
def smollm2_q(smollm2_fp32, tmp_path_factory):
    from echokv.codecs.headq import fit_calibrated, save

    model, tokenizer = smollm2_fp32
    codec = fit_calibrated(model, tokenizer, 0.5, element_bytes=2)  # the ratio of a 16-bit cache
    return save(codec, tmp_path_factory.mktemp("q") / "q0.5", model, 0.5)


@torch.no_grad()
def _greedy_q(model, ids, n, eos, folder):
    """Greedy tokens through echokv's own cache with the EchoKV-Q codec, compressed from the first token."""
    from echokv.cache import CompressedCache
    from echokv.codecs.headq import load

    return _greedy_in(model, CompressedCache(model, load(folder), mode="compressed", fast=True), ids, n, eos)


@serve
def test_vllm_serves_echokv_q_in_pages_and_answers_like_echokvs_own_cache(smollm2_folder, smollm2_fp32, smollm2_q,
                                                                          tmp_path):
    from echokv.codecs.headq import load
    from echokv.serving.pages import page_bytes
    from echokv.serving.server import BLOCK_SIZE, Server
    from echokv.serving.vllm import serve_args

    model, tokenizer = smollm2_fp32
    codec = load(smollm2_q)
    per_token = sum(page_bytes(w, 3, BLOCK_SIZE) for w in codec.widths.values())
    eos = {tokenizer.eos_token_id}
    story = tokenizer("Once upon a time there was a lighthouse keeper who counted ships. " * 40)["input_ids"]
    prompts = [*_prompt_ids(tokenizer), story[:300], story[:600]]  # the last in two prefill chunks of 512
    with Server(smollm2_folder, tmp_path / "q.log", (*serve_args(smollm2_q), "--max-num-batched-tokens", "512")) as srv:
        tokens = srv.kv_cache_tokens()
        assert 0 <= 2**30 - tokens * per_token < BLOCK_SIZE * per_token  # pages of codes, counted by vLLM
        assert tokens / (2**30 // 46080) > 3.8  # float32 K/V against codes of half a 16-bit cache
        same = [_served(srv, ids, 80, eos) == _greedy_q(model, ids, 80, eos, smollm2_q) for ids in prompts]
        assert all(same), same


@torch.no_grad()
def _greedy_restored(model, codec, ids, stored, n, eos):
    """transformers' greedy tokens when the prompt's first ``stored`` tokens' K/V went through the offload codes."""
    from transformers import DynamicCache

    from echokv.serving import offload

    past = model(torch.tensor([ids[:stored]]), use_cache=True).past_key_values
    cache = DynamicCache()
    for layer, kv in enumerate(past.layers):
        tensors = offload.encode(codec, layer, kv.keys[0].transpose(0, 1), kv.values[0].transpose(0, 1))
        k, v = offload.decode(codec, layer, tensors)
        cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], layer)
    return _greedy_in(model, cache, ids, n, eos, start=stored)


@serve
def test_vllm_offloads_a_full_engines_kv_as_codes_and_answers_from_them_as_transformers_does(
        smollm2_folder, smollm2_fp32, smollm2_q, tmp_path):
    import json

    from echokv.codecs.headq import load
    from echokv.serving.server import BLOCK_SIZE, Server

    model, tokenizer = smollm2_fp32
    codec = load(smollm2_q)
    eos = {tokenizer.eos_token_id}
    text = tokenizer.decode(tokenizer("The lighthouse keeper counted ships. " * 60)["input_ids"][:260])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q + "\n\n" + text}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for q in PROMPTS]
    prompts.append(tokenizer(text)["input_ids"][:2 * BLOCK_SIZE + 1])  # whole blocks and one token: stored too
    store = tmp_path / "store"
    config = {"kv_connector": "EchoKVOffloadConnector", "kv_connector_module_path": "echokv.serving.vllm.offload",
              "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": str(store),
                                                                  "echokv_codec": str(smollm2_q)}}
    args = ["--no-enable-prefix-caching", "--kv-transfer-config", json.dumps(config)]
    with Server(smollm2_folder, tmp_path / "offload.log", args) as srv:
        first = [_served(srv, ids, 32, eos) for ids in prompts]  # computed; each prompt's K/V stored as codes
        again = [_served(srv, ids, 32, eos) for ids in prompts]  # the stored prefix restored, the rest computed
    assert first == [_greedy(model, ids, 32, eos) for ids in prompts]
    log = (tmp_path / "offload.log").read_text()
    assert log.count("K/V restored from") == len(prompts) and "refused" not in log
    stored = [(len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE for ids in prompts]
    same = [a == _greedy_restored(model, codec, ids, n, 32, eos) for a, ids, n in zip(again, prompts, stored)]
    assert all(same), (same, again)
    folders = list(store.iterdir())
    assert len(folders) == len(prompts)
    for folder in folders:
        full = json.loads((folder / "kv.json").read_text())["tokens"] * 30 * 2 * 3 * 64 * 2  # the K/V at 16 bits
        assert 0.45 < (folder / "kv.safetensors").stat().st_size / full < 0.55


@serve
def test_the_offload_connector_refuses_a_folder_without_a_codec_in_one_line(smollm2_folder, tmp_path):
    import json

    from echokv.serving.server import Server

    config = {"kv_connector": "EchoKVOffloadConnector", "kv_connector_module_path": "echokv.serving.vllm.offload",
              "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "store"),
                                                                  "echokv_codec": str(tmp_path)}}
    srv = Server(smollm2_folder, tmp_path / "refused.log", ["--kv-transfer-config", json.dumps(config)], timeout=300)
    with pytest.raises(RuntimeError, match="exited with status 1"):
        srv.start()
    assert "echokv: EchoKVOffloadConnector needs kv_connector_extra_config.echokv_codec, an EchoKV-Q codec folder" \
        in (tmp_path / "refused.log").read_text()


@serve
def test_vllm_refuses_echokv_q_pages_that_split_its_blocks_in_one_line(smollm2_folder, smollm2_q, tmp_path):
    from echokv.serving.server import Server
    from echokv.serving.vllm import serve_args

    srv = Server(smollm2_folder, tmp_path / "refused.log", serve_args(smollm2_q), timeout=300)
    srv.cmd[srv.cmd.index("--block-size") + 1] = "32"
    with pytest.raises(RuntimeError, match="status 1: .*echokv: EchoKV-Q codes blocks of 64 tokens: pass --block-size"):
        srv.start()


@serve
def test_vllm_refuses_an_artifact_for_another_model_in_one_line(smollm2_folder, tmp_path):
    from echokv.artifact import save
    from echokv.models import load_model
    from echokv.serving.server import Server
    from echokv.serving.vllm import serve_args

    model, _ = load_model("tiny-llama")
    save(train_tiny(model, steps=0, variant="mix", compression_ratio=0.5)[0], model, tmp_path / "tiny")
    with pytest.raises(RuntimeError, match="status 1: .*echokv: .* was trained for a model with num_layers=4"):
        Server(smollm2_folder, tmp_path / "refused.log", serve_args(tmp_path / "tiny"), timeout=300).start()
