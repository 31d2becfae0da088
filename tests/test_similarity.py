"""Head-similarity analysis (echokv_lab.similarity) on tiny random models: fast, no download.

The key checks plant an exact relation between two heads (by editing k_proj / v_proj) and expect the
analysis to find it (R2 ~ 1), which is what makes the heatmaps trustworthy on a real model.
"""

from __future__ import annotations

import json

import pytest
import torch

from echokv import cli
from echokv.models import kv_geometry
from echokv.stats.moments import KeyMoments, ValueMoments
from echokv.tiny import tiny_model
from echokv_lab import similarity

# With the relative ridge of echokv.stats.moments (1e-3 of the source's mean diagonal), a head predicted from
# itself loses at most 1e-3 / 4 of its energy: per eigen-direction sigma * lam^2 / (sigma + lam)^2 <= lam / 4.
DIAG_TOL = 2.6e-4


def _blocks(n=4, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n, t), generator=g)


def _planted_llama(seed=0):
    """Tiny llama (2 KV heads, d=16) whose layer-1 head 1 is an exact function of its head 0, K and V.

    V: rows of head 1 = M @ rows of head 0, so v1 = M v0. K: per frequency f, (k1_f + i k1_{f+d/2}) =
    (a_f + i b_f)(k0_f + i k0_{f+d/2}) before RoPE; RoPE multiplies both by the same phase, so the
    relation holds post-RoPE too and the per-frequency complex map recovers it exactly.
    """
    model = tiny_model("llama", seed=seed)
    attn = model.model.layers[1].self_attn
    d = model.config.head_dim
    f = d // 2
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        wv = attn.v_proj.weight
        m = torch.randn(d, d, generator=g) / d**0.5
        wv[d : 2 * d] = m @ wv[:d]
        wk = attn.k_proj.weight
        a, b = torch.randn(f, 1, generator=g), torch.randn(f, 1, generator=g)
        k_re, k_im = wk[:f].clone(), wk[f:d].clone()
        wk[d : d + f] = a * k_re - b * k_im
        wk[d + f : 2 * d] = b * k_re + a * k_im
    return model


@pytest.fixture(scope="module")
def planted():
    model = _planted_llama()
    return model, similarity.head_similarity(model, _blocks(), progress=False)


def test_planted_relation_found(planted):
    _, res = planted
    i, j = res["heads"].index("L1H0"), res["heads"].index("L1H1")
    rk, rv = torch.tensor(res["r2_k"]), torch.tensor(res["r2_v"])
    assert rk[i, j] > 0.999 and rv[i, j] > 0.999
    # an unrelated pair in another layer stays well below that
    other = res["heads"].index("L3H1")
    assert rk[i, other] < 0.9 and rv[i, other] < 0.9
    best = {b["head"]: b for b in res["summary"]["v"]["best_source"]}
    assert best["L1H1"]["source"] == "L1H0" and best["L1H1"]["layer_offset"] == 0


def test_key_relation_must_commute_with_rope():
    """A real-linear map that mixes frequencies is not a RoPE-commuting one: K R2 stays low, V-style
    (unconstrained) regression on the same pre-RoPE relation would be exact, so this checks K is RoPE-aware."""
    model = tiny_model("llama", seed=3)
    attn = model.model.layers[0].self_attn
    d = model.config.head_dim
    with torch.no_grad():
        w = attn.k_proj.weight
        w[d : 2 * d] = w[:d].flip(0)  # dimension i <- dimension d-1-i: frequencies swapped
    res = similarity.head_similarity(model, _blocks(t=128), layers=[0], progress=False)
    assert res["r2_k"][0][1] < 0.9


def test_shapes_diagonal_and_bounds(planted):
    model, res = planted
    geo = kv_geometry(model)
    n = len(geo.full_attention_layers) * geo.num_kv_heads
    assert res["layers"] == geo.full_attention_layers and res["num_kv_heads"] == geo.num_kv_heads
    assert res["heads"][:3] == ["L0H0", "L0H1", "L1H0"]  # layer-major
    for kind in ("k", "v"):
        r2 = torch.tensor(res[f"r2_{kind}"])
        assert r2.shape == (n, n)
        assert torch.all(r2.diagonal() >= 1 - DIAG_TOL)
        assert torch.all(r2 <= 1.0)
        assert torch.all(r2 >= -1e-9)  # ridge residual never exceeds the target's energy
        s = res["summary"][kind]
        assert 0 <= s["mean_within_layer"] <= 1 and 0 <= s["mean_adjacent_layer"] <= 1
        assert len(s["per_layer"]) == len(res["layers"]) and len(s["best_source"]) == n
        assert s["per_layer"][0]["from_prev"] is None and s["per_layer"][-1]["from_next"] is None


def test_vectorised_matches_moments_methods():
    """key_r2 / value_r2 are a fast rewrite of 1 - residual([i], [j]) / energy([j]): same numbers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, 8, generator=g)
    x[:, 3] = x[:, 0] @ torch.randn(8, 8, generator=g) + 0.1 * x[:, 3]
    km, vm = KeyMoments(5, 8), ValueMoments(5, 8)
    km.add(x)
    vm.add(x)
    rk, rv = similarity.key_r2(km), similarity.value_r2(vm)
    for i in range(5):
        for j in range(5):
            assert rk[i, j] == pytest.approx(1 - km.residual([i], [j]) / km.energy([j]), abs=1e-10)
            assert rv[i, j] == pytest.approx(1 - vm.residual([i], [j]) / vm.energy([j]), abs=1e-10)


def test_sliding_layers_excluded_and_json_roundtrip(tmp_path):
    model = tiny_model("gemma3")
    res = similarity.head_similarity(model, _blocks(n=2, t=48), progress=False)
    assert res["layers"] == [2, 5]  # the tiny gemma3's full-attention layers
    path = tmp_path / "s.json"
    path.write_text(json.dumps(res, allow_nan=False))
    assert json.loads(path.read_text()) == res
    pngs = similarity.plot_heatmaps(res, tmp_path / "plots")
    assert [p.name for p in pngs] == ["similarity_k.png", "similarity_v.png"]
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("0-3", [0, 1, 2, 3]), ("5", [5]), (" 0-1, 4 ,3-3", [0, 1, 3, 4])],
)
def test_parse_layers(spec, expected):
    assert similarity.parse_layers(spec) == expected


@pytest.mark.parametrize(("spec", "message"), [("abc", "not a layer range"), ("3-1", "backwards"), ("-2", "not"),
                                               ("", "empty")])
def test_parse_layers_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        similarity.parse_layers(spec)


def test_resolve_layers_errors():
    geo = kv_geometry(tiny_model("gemma3"))
    assert similarity.resolve_layers(geo, "0-3") == [2]
    with pytest.raises(ValueError, match="outside this model"):
        similarity.resolve_layers(geo, "4-9")
    with pytest.raises(ValueError, match="no full-attention layer"):
        similarity.resolve_layers(geo, "0-1")


def test_size_limit(monkeypatch):
    geo = kv_geometry(tiny_model("llama"))
    monkeypatch.setattr(similarity, "MAX_COVARIANCE_BYTES", 8 * (2 * geo.num_kv_heads * geo.head_dim) ** 2)
    similarity.check_size(geo, [0, 1])
    with pytest.raises(ValueError, match="at most 2 full-attention layers"):
        similarity.check_size(geo, [0, 1, 2])


# -- the CLI command, with a tiny model and a character-level tokenizer stub ---------------------------
class _CharTokenizer:
    name_or_path = ""  # no identity: the data module does not cache its token ids

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [3 + ord(c) % 250 for c in text]}


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text(("The quick brown fox jumps over the lazy dog.\n" * 40), encoding="utf-8")
    model = tiny_model("gemma3")
    monkeypatch.setattr("echokv.models.load_configured", lambda config: (model, _CharTokenizer()))
    base = ["analyze", "--text", str(text), "--calib-tokens", "96", "--seq-len", "48"]
    return tmp_path, base


def test_cli_analyze_writes_outputs(cli_env, capsys):
    tmp_path, base = cli_env
    out = tmp_path / "out"
    assert cli.main([*base, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["similarity.json", "similarity_k.png", "similarity_v.png"]
    res = json.loads((out / "similarity.json").read_text())
    assert res["layers"] == [2, 5] and res["tokens"] == 96 and res["sliding_layers_skipped"] == [0, 1, 3, 4]
    printed = capsys.readouterr().out
    assert "within a layer" in printed and "adjacent layers" in printed and str(out / "similarity_k.png") in printed
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    ref = tmp_path / "ref"
    ref.mkdir()
    assert out.stat().st_mode == ref.stat().st_mode  # usual permissions, not a temp folder's 0700

    # existing folder: refused without --overwrite, replaced with it
    assert cli.main([*base, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(out), "--overwrite", "--layers", "5"]) == 0
    assert json.loads((out / "similarity.json").read_text())["layers"] == [5]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "x-1"], "not a layer range"),
        (["--layers", "3-12"], "outside this model"),
        (["--layers", "0-1"], "no full-attention layer"),
        (["--calib-tokens", "100000"], "tokens were asked"),
    ],
)
def test_cli_analyze_rejects_before_capture(cli_env, capsys, monkeypatch, extra, message):
    tmp_path, base = cli_env

    def no_capture(*a, **k):
        raise AssertionError("the capture ran before the input was checked")

    monkeypatch.setattr(similarity, "head_similarity", no_capture)
    assert cli.main([*base, "--out", str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_interrupted_run_leaves_nothing(cli_env, monkeypatch, capsys):
    tmp_path, base = cli_env

    def boom(result, out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(similarity, "plot_heatmaps", boom)
    assert cli.main([*base, "--out", str(tmp_path / "out")]) == 130  # Ctrl-C: one line (issue #29)
    assert capsys.readouterr().err.strip().endswith("echokv: interrupted; nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt"]
