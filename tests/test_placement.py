"""Models split across devices with accelerate (issue #19): a tiny model with half its layers offloaded to disk
gives what the model in memory gives (capture, training, cache, generation); a group split over two devices moves
the bytes placement.straddle_bytes counts; bad maps are one line."""

from __future__ import annotations

import json

import pytest
import torch

from echokv import placement
from echokv.artifact import fingerprint
from echokv.codecs.mix import EchoKVCache
from echokv.generation import generate
from echokv.models import ModelLoadError, load_model
from echokv.stats.collect import collect
from helpers import train_tiny

# tiny-llama: 4 layers; the first two in memory, the last two on disk (read back at every forward)
HALF_ON_DISK = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                "model.layers.0": "cpu", "model.layers.1": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the tiny model in memory, the same model with layers 2-3 offloaded to disk by accelerate)."""
    ref, _ = load_model("tiny-llama")
    off, _ = load_model("tiny-llama", device_map=HALF_ON_DISK, offload_folder=tmp_path_factory.mktemp("off") / "w")
    assert off.model.layers[3].self_attn.k_proj.weight.device.type == "meta"  # really offloaded
    return ref, off


def _decode(model, cache, ids, steps: int) -> torch.Tensor:
    """Logits of a prefill of ``ids`` then ``steps`` greedy decode steps, through ``cache`` (compressed)."""
    from echokv.generation import prefill

    with torch.no_grad():
        out = [prefill(model, cache, ids)]
        for _ in range(steps):
            out.append(prefill(model, cache, out[-1].argmax(-1, keepdim=True), chunk_size=1))
    return torch.stack(out, 1)


def test_offloaded_model_gives_the_same_capture_training_cache_and_generation(pair, tmp_path):
    ref, off = pair
    ids = torch.randint(3, 250, (1, 24), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(off(ids).logits, ref(ids).logits, atol=1e-5)
    assert fingerprint(off) == fingerprint(ref)  # K/V weights read through accelerate's hooks

    blocks = torch.randint(3, 250, (3, 32), generator=torch.Generator().manual_seed(2))
    got = [collect(m, blocks, [[0, 1], [2, 3]], features=("k_pre", "v"), keep_samples=1, progress=False)
           for m in (ref, off)]
    for kind in ("k_pre", "v"):
        for a, b in zip(got[0].moments[kind], got[1].moments[kind]):
            assert torch.allclose(a.outer, b.outer, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for layer in range(4) for a, b in zip(got[0].samples[layer], got[1].samples[layer]))

    nets = [train_tiny(m, steps=3, variant="mix", compression_ratio=0.5, group_size=2)[0] for m in (ref, off)]
    diff = max((a - b).abs().max().item() for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    assert diff < 1e-5

    caches = [EchoKVCache(m, net, mode="compressed") for m, net in zip((ref, off), nets)]
    logits = [_decode(m, c, ids, 6) for m, c in zip((ref, off), caches)]
    assert caches[1].seen_tokens() == 30 and caches[1].stores[0].n_tokens == 30
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert caches[1].moved_bytes() == 0  # one execution device: nothing moves

    answers = [generate(m, ids, EchoKVCache(m, net, mode="compressed"), max_new_tokens=8)
               for m, net in zip((ref, off), nets)]
    assert torch.equal(answers[0], answers[1])


def test_a_group_split_over_two_devices_moves_the_counted_bytes(monkeypatch):
    """Layers 2-3 said to run on cpu:1, away from their group [0..3] whose home is cpu:0: two device names of one
    CPU, distinct to torch (accelerate cannot dispatch to them, and this machine has no second device), so the
    split path runs, on real tensors, and its bytes are counted."""
    ref, _ = load_model("tiny-llama")
    devices = {0: torch.device("cpu:0"), 1: torch.device("cpu:0"), 2: torch.device("cpu:1"), 3: torch.device("cpu:1")}
    monkeypatch.setattr(placement, "layer_devices", lambda model: devices)
    model = ref
    assert placement.split_groups([[0, 1, 2, 3]], devices) == [[0, 1, 2, 3]]
    net, _ = train_tiny(ref, steps=0, variant="mix", compression_ratio=0.5, group_size=4)
    ids = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(3))
    want = _decode(ref, EchoKVCache(ref, net, mode="compressed"), ids, 4)
    cache = EchoKVCache(model, net, mode="compressed")
    with torch.no_grad():
        from echokv.attention import echokv_attention
        from echokv.generation import prefill

        with echokv_attention(model):  # the fast decode path, as echokv.generate runs it
            out = [prefill(model, cache, ids)]
            before = cache.moved_bytes()
            for _ in range(4):
                out.append(prefill(model, cache, out[-1].argmax(-1, keepdim=True), chunk_size=1))
    assert torch.allclose(torch.stack(out, 1), want, atol=1e-4)
    geo = cache.geometry
    per_step = placement.straddle_bytes(geo, [[0, 1, 2, 3]], devices)
    assert per_step == 2 * 4 * 16 * (2 * 2 + 2 * 4 + 2 * 2)  # 2 layers away, float32, H=2, Hq=4, d=16
    assert cache.moved_bytes() - before == 4 * per_step


def test_keep_groups_on_device_refuses_a_map_that_splits_a_group():
    split = {**{k: "cpu:0" for k in HALF_ON_DISK}, "model.layers.3": "cpu:1"}
    with pytest.raises(ModelLoadError, match=r"splits the group of layers \[2, 3\] over cpu:0, cpu:1") as err:
        load_model("tiny-llama", device_map=split, groups=2, keep_groups_on_device=True)
    assert "\n" not in str(err.value)
    model, _ = load_model("tiny-llama")
    placement.check_groups(model, [[0, 1, 2], [3]], placement.execution_devices(model, split), True)  # fits
    # a strategy's map is moved instead: layer 3 joins layer 2 (ties go to the earliest layer's device)
    aligned = placement.align(model, split, [[0, 1], [2, 3]])
    assert aligned["model.layers.3"] == "cpu:0" and not placement.split_groups(
        [[0, 1], [2, 3]], placement.execution_devices(model, aligned))


@pytest.mark.parametrize("device_map, message", [
    ({"": "gpu7"}, r"module '\(whole model\)' -> 'gpu7'.*unknown device"),
    ({"": "meta"}, "'meta' holds no weights"),
    ({"": True}, "is not a device"),
    ({"model.layers.9": "cpu", "": "cpu"}, "names module 'model.layers.9', which this model does not have"),
    ({"model.layers.0": "cpu"}, "places no device for 'model.embed_tokens.weight'"),
    ("{not json", "not valid JSON"),
    ("nowhere", "unknown device 'nowhere'"),
])
def test_an_invalid_device_map_is_one_line(device_map, message):
    with pytest.raises(ModelLoadError, match=message) as err:
        load_model("tiny-llama", device_map=device_map)
    assert "\n" not in str(err.value)


def test_cli_refuses_bad_placement_before_loading(tmp_path, capsys):
    from echokv.cli import main

    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"": "disk"}))
    cases = [
        (["--device-map", str(mapping), "--offload-folder", str(folder)], "is not an empty folder"),
        (["--device-map", '{"": "cuda:3"}'], "cannot be used"),
        (["--max-memory", "cpu=1GiB"], "apply to a model split by --device-map"),
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "'lots' is not a size"),
        # issue #29: a GPU this machine has not was accelerate's traceback
        (["--device-map", "auto", "--max-memory", f"{torch.cuda.device_count()}=70GiB"], "names GPU"),
    ]
    for extra, message in cases:
        rc = main(["generate", "--model", "tiny-llama", "--prompt", "hi", *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert (folder / "mine.txt").read_text() == "keep me"


def test_a_model_folder_is_loaded_in_place_by_its_map(tmp_path):
    """A Hub id or folder goes through from_pretrained(device_map=...): the map is resolved and checked on an empty
    model first, then the weights load straight to their devices."""
    ref, tok = load_model("tiny-llama")
    ref.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    off, _ = load_model(str(tmp_path / "m"), device_map=HALF_ON_DISK, offload_folder=tmp_path / "w")
    # (read back from the model's own safetensors file: transformers writes nothing to the folder for them)
    assert off.model.layers[2].self_attn.k_proj.weight.device.type == "meta"
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(4))
    assert torch.allclose(off(ids).logits, ref(ids).logits, atol=1e-5)
    with pytest.raises(ModelLoadError, match="splits the group of layers"):
        load_model(str(tmp_path / "m"), device_map={**{k: "cpu:0" for k in HALF_ON_DISK}, "model.layers.3": "cpu:1"},
                   groups=2, keep_groups_on_device=True)


@pytest.mark.real_model
def test_the_embedded_gguf_model_with_half_its_layers_on_disk_answers_as_in_memory(smollm2, smollm2_artifact, tmp_path):
    """SmolLM2 (a GGUF: dequantized, then dispatched) with layers 15-29 on disk: the same logits, and the same greedy
    answer through the compressed cache."""
    ref, tok = smollm2
    half = {k: "cpu" for k in ("model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head")}
    half.update({f"model.layers.{i}": "cpu" if i < 15 else "disk" for i in range(30)})
    off, _ = load_model("smollm2-135m", dtype="bfloat16", device_map=json.dumps(half), offload_folder=tmp_path / "w",
                        groups=4, keep_groups_on_device=True)
    assert off.model.layers[29].self_attn.k_proj.weight.device.type == "meta"
    from echokv.generation import encode_prompt

    ids = encode_prompt(tok, "What is the capital of France?")
    assert torch.equal(off(ids).logits, ref(ids).logits)
    answers = [generate(m, ids, EchoKVCache(m, str(smollm2_artifact), mode="compressed"), max_new_tokens=12)
               for m in (ref, off)]
    assert torch.equal(answers[0], answers[1])


def test_a_device_map_that_is_a_folder_says_so(tmp_path):
    # issue #29: a folder was "device map file not found"
    from echokv.placement import PlacementError, parse_device_map

    with pytest.raises(PlacementError, match=f"device map {tmp_path} is a folder: pass a .json file"):
        parse_device_map(str(tmp_path))
    (tmp_path / "map.json").mkdir()
    with pytest.raises(PlacementError, match="is a folder"):
        parse_device_map(str(tmp_path / "map.json"))
