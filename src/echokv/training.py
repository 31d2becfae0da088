"""Two-stage training of the reconstructor (EchoKV section 3.3).

Stage 1 minimises the KV-reconstruction MSE of the discarded heads. Its optimum is a ridge
regression, solved in closed form from streamed second moments (:mod:`echokv.moments`).
Stage 2 fine-tunes on the output MSE: for every compressed layer, the attention output (after the
output projection) computed from the original queries and the reconstructed K/V, against the output
with the original K/V; the LLM is frozen. AdamW with a cosine schedule.

Only query heads that read a discarded KV head change, so stage 2 computes attention for those alone
and projects the difference through their columns of ``o_proj``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .capture import attention_modules, capture
from .models import kv_geometry
from .moments import KeyMoments, ValueMoments, new_moments
from .reconstructor import Reconstructor
from .selection import HeadLayout, check_ratio, data_layout, make_groups, nearest_paper_layout

VARIANTS = ("echo", "hybrid")
# Hybrid default: keys get this share of the kept K+V budget. SmolLM2-135M, ratio 0.5, NIAH at 512
# tokens (10 samples each): keys/values kept 0.4/0.6 found 3/10 needles, 0.5/0.5 7-9/10, 0.6/0.4 10/10,
# although the held-out output MSE ranks them the other way (0.117 < 0.133 < 0.187).
HYBRID_KEY_SHARE = 0.6


@dataclass
class TrainConfig:
    compression_ratio: float = 0.5
    k_ratio: float | None = None  # defaults to compression_ratio
    v_ratio: float | None = None
    layout: str = "data"  # "data" (measured best) | "paper" (EchoKV's own layout)
    variant: str = "hybrid"  # "hybrid" (measured best): keys as a RoPE-commuting latent | "echo": heads only
    group_size: int | None = None  # paper: searched when None; data: 4
    m: int | None = None  # paper only: local heads kept per non-first layer; searched when None
    inputs: str | None = None  # paper: "global+local"; data: "all"
    calib_tokens: int = 8192
    seq_len: int = 512
    heldout_tokens: int = 2048
    stage2_sequences: int = 8  # calibration sequences kept for stage 2
    stage2_steps: int = 60
    stage2_lr: float = 1e-3
    stage2_batch: int = 2
    stage2_queries: int | None = 128  # query positions scored per sequence in stage 2 (None: all)
    ridge: float = 1e-3
    bias: bool = True
    seed: int = 0
    text_paths: list[str] | None = None
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def ratios(self) -> tuple[float, float]:
        """Compression ratios of keys and values. The hybrid, unless told otherwise, gives keys
        :data:`HYBRID_KEY_SHARE` of the kept budget: retrieval follows key fidelity (measured)."""
        r = check_ratio(self.compression_ratio)
        if self.variant == "hybrid" and self.k_ratio is None and self.v_ratio is None:
            kept = 1.0 - r
            kept_k = min(1.0, 2 * HYBRID_KEY_SHARE * kept)
            return round(1.0 - kept_k, 9), round(1.0 - (2 * kept - kept_k), 9)
        k = check_ratio(self.k_ratio, "K ratio") if self.k_ratio is not None else r
        v = check_ratio(self.v_ratio, "V ratio") if self.v_ratio is not None else r
        return k, v

    def validate(self, model) -> None:
        """Raise before any work for settings that cannot fit the model."""
        self.ratios()
        if self.layout not in ("paper", "data"):
            raise ValueError(f"unknown layout {self.layout!r}; choose 'paper' or 'data'")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        geo = kv_geometry(model)
        layers = geo.full_attention_layers
        if self.group_size is not None:
            make_groups(layers, self.group_size)
        if self.m is not None and not (isinstance(self.m, int) and 0 <= self.m <= geo.num_kv_heads):
            raise ValueError(
                f"local input size m={self.m!r} does not fit this model: it must be in [0, {geo.num_kv_heads}]"
            )
        for name in ("calib_tokens", "seq_len", "stage2_batch", "heldout_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stage2_steps < 0:
            raise ValueError(f"stage2_steps must be >= 0, got {self.stage2_steps}")
        if geo.max_context and self.seq_len > geo.max_context:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context of {geo.max_context} tokens")


def build_layout(cfg: TrainConfig, model, moments=None) -> HeadLayout:
    geo = kv_geometry(model)
    rk, rv = cfg.ratios()
    if cfg.variant == "hybrid":  # values choose their heads; keys become the latent
        heads = build_layout(TrainConfig(**{**asdict(cfg), "variant": "echo", "k_ratio": 0.0, "v_ratio": rv}), model,
                             moments)
        return heads.with_key_latent(rk, geo.head_dim)
    layers, h = geo.full_attention_layers, geo.num_kv_heads
    if cfg.layout == "data":
        if moments is None:
            raise ValueError("the data-driven layout needs calibration moments")
        return data_layout(layers, h, cfg.group_size or min(4, len(layers)), rk, rv, moments)
    inputs = cfg.inputs or "global+local"
    lk = nearest_paper_layout(layers, h, rk, cfg.group_size, cfg.m, inputs)
    s = len(lk.groups[0])
    lv = nearest_paper_layout(layers, h, rv, s, cfg.m if cfg.v_ratio is None else None, inputs)
    return HeadLayout(layers, h, lk.groups, lk.retained_k, lv.retained_v, inputs=inputs, strategy="paper")


def group_size_for(cfg: TrainConfig, model) -> int:
    geo = kv_geometry(model)
    if cfg.group_size is not None:
        return cfg.group_size
    if cfg.layout == "data":
        return min(4, len(geo.full_attention_layers))
    return len(build_layout(cfg, model).groups[0])


# -- capture of statistics and stage-2 samples ----------------------------------------------------
@dataclass
class Calibration:
    moments: dict  # kind -> list per group
    samples: dict  # layer -> (q, k, v) stacked over kept sequences
    means: dict  # kind -> layer -> [H, d] per-head mean (for the mean-fill baseline)
    tokens: int


def collect(model, blocks, groups, keep_sequences: int, desc: str, progress: bool = True) -> Calibration:
    """One pass: per-group moments over all blocks; Q/K/V of the first ``keep_sequences`` blocks."""
    geo = kv_geometry(model)
    h, d = geo.num_kv_heads, geo.head_dim
    moments = {kind: [new_moments(kind, len(g) * h, d) for g in groups] for kind in ("k", "v")}
    group_of = {layer: gi for gi, g in enumerate(groups) for layer in g}
    sums = {kind: {layer: torch.zeros(h, d, dtype=torch.float64) for layer in group_of} for kind in ("k", "v")}
    pending: dict[int, dict[int, tuple]] = {}
    kept: dict[int, list] = {layer: [] for layer in group_of}
    seen = {"blocks": 0, "tokens": 0}

    def on_layer(layer, module, q, k, v):
        gi = group_of[layer]
        for kind, x in (("k", k), ("v", v)):
            sums[kind][layer] += x.double().sum(dim=(0, 2))
        buf = pending.setdefault(gi, {})
        buf[layer] = (k, v)
        if len(buf) == len(groups[gi]):  # every layer of the group seen for this block
            ks = torch.cat([buf[lay][0] for lay in groups[gi]], dim=1)  # [B, S*H, T, d]
            vs = torch.cat([buf[lay][1] for lay in groups[gi]], dim=1)
            moments["k"][gi].add(ks.permute(0, 2, 1, 3).reshape(-1, ks.shape[1], d))
            moments["v"][gi].add(vs.permute(0, 2, 1, 3).reshape(-1, vs.shape[1], d))
            pending.pop(gi)
        if seen["blocks"] < keep_sequences:
            kept[layer].append((q.clone(), k.clone(), v.clone()))
        if layer == max(group_of):
            seen["blocks"] += q.shape[0]
            seen["tokens"] += q.shape[0] * q.shape[2]

    capture(model, blocks, on_layer, layers=list(group_of), desc=desc, progress=progress)
    samples = {
        layer: tuple(torch.cat([x[i] for x in xs], dim=0) for i in range(3)) for layer, xs in kept.items() if xs
    }
    n = max(seen["tokens"], 1)
    means = {kind: {layer: (s / n).float() for layer, s in sums[kind].items()} for kind in ("k", "v")}
    return Calibration(moments, samples, means, seen["tokens"])


# -- errors ---------------------------------------------------------------------------------------
def retained_of(layout: HeadLayout, samples: dict, kind: str) -> dict[int, torch.Tensor]:
    i = 1 if kind == "k" else 2
    return {layer: samples[layer][i][:, layout.retained_in_layer(kind, layer)] for layer in samples}


@torch.no_grad()
def relative_kv_error(recon: Reconstructor, samples: dict, fill: str = "recon", means=None) -> dict:
    """Held-out relative squared error of the discarded heads: sum ||x_hat - x||^2 / sum ||x||^2.

    ``fill``: "recon" (the network), "zero" (discard), "mean" (per-head calibration mean).
    """
    lay = recon.layout
    out = {}
    for kind, i in (("k", 1), ("v", 2)):
        ret = retained_of(lay, samples, kind)
        num = den = 0.0
        latent = kind == "k" and lay.hybrid  # every key head is coded, none is kept as is
        for layer in samples:
            disc = [h for h in range(lay.num_kv_heads) if latent or h not in lay.retained_in_layer(kind, layer)]
            if not disc:
                continue
            true = samples[layer][i][:, disc]
            if fill == "recon" and latent:
                est = projected_keys(recon, layer, samples)
            elif fill == "recon":
                est = recon.rebuild(kind, layer, ret)[:, disc]
            elif fill == "zero":
                est = torch.zeros_like(true)
            else:
                est = means[kind][layer][disc][None, :, None, :].expand_as(true)
            num += float((est - true).pow(2).sum())
            den += float(true.pow(2).sum())
        out[kind] = num / max(den, 1e-30)
    return out


def projected_keys(recon: Reconstructor, layer: int, samples: dict) -> torch.Tensor:
    """Hybrid: the keys of ``layer`` after encoding its group into the latent and decoding."""
    gi = recon.layout.group_of(layer)
    latent = recon.encode_keys(gi, [samples[lay][1] for lay in recon.layout.groups[gi]])
    return recon.decode_keys(layer, latent)


class OutputMSE:
    """Relative output MSE of the attention of compressed layers, on fixed Q/K/V samples.

    ``queries``: score only this many query positions per sequence (a fixed random subset of the
    later positions, which attend to the most context); None scores every position. Keys and values
    are always those of every position, so the reconstruction is trained where attention reads it.
    Everything that does not depend on the network (sources, queries, reference outputs) is prepared
    once, so a step is the reconstruction, one attention per layer, and the projection.
    """

    def __init__(self, layout: HeadLayout, samples: dict, modules: dict, queries: int | None = None, seed: int = 0,
                 recon: Reconstructor | None = None):
        self.layout, self.modules = layout, modules
        if layout.hybrid and recon is None:
            raise ValueError("a hybrid layout needs its fitted reconstructor (the key latent is fixed in stage 2)")
        q0 = next(iter(samples.values()))[0]
        self.n, t = q0.shape[0], q0.shape[2]
        if queries is None or queries >= t:
            self.pos, self.mask = None, None
        else:
            gen = torch.Generator().manual_seed(seed)
            lo = t // 8
            self.pos = (lo + torch.randperm(t - lo, generator=gen)[:queries]).sort().values
            self.mask = torch.arange(t)[None, :] <= self.pos[:, None]  # [queries, T] causal
        self.sources = {}  # (group, kind) -> retained heads of the group [N, n_src, T, d]
        for gi, group in enumerate(layout.groups):
            for kind in ("k", "v"):
                ret = retained_of(layout, {lay: samples[lay] for lay in group}, kind)
                self.sources[gi, kind] = torch.cat([ret[lay] for lay in group], dim=1)
        self.layers = {}  # layer -> prepared tensors
        self.den = 0.0
        with torch.no_grad():
            for layer, (q, k, v) in samples.items():
                mod = modules[layer]
                n_rep = q.shape[1] // k.shape[1]
                full = self.attend(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1), mod.scaling)
                self.den += float(self.project(mod, full, list(range(q.shape[1]))).pow(2).sum())
                heads = self.affected(layer)
                if not heads:
                    continue
                qi = self.query_heads(heads, n_rep)
                entry = {"heads": heads, "qi": qi, "n_rep": n_rep, "ref": full[:, qi],
                         "q": q[:, qi] if self.pos is None else q[:, qi][:, :, self.pos]}
                gi = layout.group_of(layer)
                for kind, x in (("k", k), ("v", v)):
                    tgt = layout.targets(kind, layout.groups[gi])
                    rows = [r for r, (tl, th) in enumerate(tgt) if tl == layer and th in heads]
                    entry[kind + "_rows"] = torch.tensor(rows, dtype=torch.long)
                    entry[kind + "_at"] = torch.tensor([heads.index(tgt[r][1]) for r in rows], dtype=torch.long)
                    entry[kind + "_orig"] = x[:, heads]  # the exact ones stay, discarded ones are replaced
                if layout.hybrid:  # keys as the cache will give them back
                    entry["k_orig"] = projected_keys(recon, layer, samples)[:, heads]
                self.layers[layer] = entry

    def affected(self, layer: int) -> list[int]:
        lay = self.layout
        if lay.hybrid:
            return list(range(lay.num_kv_heads))
        return [
            h for h in range(lay.num_kv_heads)
            if h not in lay.retained_in_layer("k", layer) or h not in lay.retained_in_layer("v", layer)
        ]

    def attend(self, q, k, v, scale):
        """Causal attention; with a query subset, ``q`` holds only those positions."""
        if self.pos is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        if q.shape[2] != len(self.pos):
            q = q[:, :, self.pos]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, scale=scale)

    @staticmethod
    def query_heads(kv_heads: list[int], n_rep: int) -> list[int]:
        return [h * n_rep + r for h in kv_heads for r in range(n_rep)]

    @staticmethod
    def project(mod, o: torch.Tensor, q_heads: list[int]) -> torch.Tensor:
        """Attention output [B, nq, T, d] of some query heads through their columns of o_proj."""
        b, nq, t, d = o.shape
        cols = torch.cat([torch.arange(qh * d, (qh + 1) * d) for qh in q_heads])
        w = mod.o_proj.weight[:, cols]
        return o.transpose(1, 2).reshape(b, t, nq * d) @ w.T

    def __call__(self, recon, batch: torch.Tensor | None = None) -> torch.Tensor:
        pick = (lambda x: x) if batch is None else (lambda x: x[batch])
        total = 0.0
        for layer, e in self.layers.items():
            gi = self.layout.group_of(layer)
            mod, group_mod = self.modules[layer], recon.groups[gi]
            kv = []
            for kind in ("k", "v"):
                x = pick(e[kind + "_orig"])
                if len(e[kind + "_rows"]):
                    src = pick(self.sources[gi, kind])
                    fn = group_mod.keys if kind == "k" else group_mod.values
                    x = x.index_copy(1, e[kind + "_at"], fn(src, e[kind + "_rows"]))
                kv.append(x.repeat_interleave(e["n_rep"], 1))
            out = self.attend(pick(e["q"]), kv[0], kv[1], mod.scaling)
            total = total + self.project(mod, out - pick(e["ref"]), e["qi"]).pow(2).sum()
        scale = 1.0 if batch is None else self.n / len(batch)
        return total * scale / max(self.den, 1e-30)


# -- the whole procedure --------------------------------------------------------------------------
def train(model, tokenizer, cfg: TrainConfig, calib=None, held=None, layout=None) -> tuple[Reconstructor, dict]:
    """Calibrate, select, fit (stage 1) and fine-tune (stage 2). Returns the network and a report.

    ``calib``/``held`` are token blocks [N, T]; by default they come from :mod:`echokv.data`.
    ``layout`` overrides the retained-head selection.
    """
    cfg.validate(model)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    geo = kv_geometry(model)
    if calib is None or held is None:
        from .data import token_blocks

        calib = token_blocks(tokenizer, "calibration", cfg.calib_tokens, cfg.seq_len, cfg.text_paths)
        held = token_blocks(tokenizer, "evaluation", cfg.heldout_tokens, cfg.seq_len, cfg.text_paths)
    groups = layout.groups if layout else make_groups(geo.full_attention_layers, group_size_for(cfg, model))
    for p in model.parameters():
        p.requires_grad_(False)

    # Stage 1: moments, selection, closed form
    t1 = time.perf_counter()
    cal = collect(model, calib, groups, cfg.stage2_sequences, "stage 1: calibration", cfg.progress)
    layout = layout or build_layout(cfg, model, cal.moments)
    if [list(g) for g in layout.groups] != groups:  # paper search may pick another S than assumed
        groups = layout.groups
        cal = collect(model, calib, groups, cfg.stage2_sequences, "stage 1: calibration", cfg.progress)
    recon = Reconstructor(layout, geo.head_dim, bias=cfg.bias)
    recon.fit_closed_form(cal.moments, cfg.ridge)
    stage1_seconds = time.perf_counter() - t1
    calib_err = _moment_error(layout, cal.moments, geo.head_dim)

    ho = collect(model, held, groups, len(held), "held-out capture", cfg.progress)
    modules = attention_modules(model)
    held_omse = OutputMSE(layout, ho.samples, modules, recon=recon)
    held_err = {fill: relative_kv_error(recon, ho.samples, fill, cal.means) for fill in ("recon", "zero", "mean")}

    # Stage 2: output MSE
    t2 = time.perf_counter()
    with torch.no_grad():
        omse_before = float(held_omse(recon))
    train_omse = OutputMSE(layout, cal.samples, modules, queries=cfg.stage2_queries, seed=cfg.seed, recon=recon)
    stage1_state = {k: v.clone() for k, v in recon.state_dict().items()}
    with torch.no_grad():
        train_before = float(train_omse(recon))
    losses = stage2(recon, train_omse, cfg) if cfg.stage2_steps else []
    recon.requires_grad_(False)
    with torch.no_grad():
        train_after = float(train_omse(recon))
    reverted = train_after > train_before  # never hand back something worse on its own training data
    if reverted:
        recon.load_state_dict(stage1_state)
    with torch.no_grad():
        omse_after = float(held_omse(recon))
        held_err["recon_stage2"] = relative_kv_error(recon, ho.samples, "recon")
        omse_fill = {}
        for fill in ("zero", "mean"):
            omse_fill[fill] = float(held_omse(_FillReconstructor(recon, fill, cal.means)))
    stage2_seconds = time.perf_counter() - t2

    report = {
        "model": getattr(model, "echokv_name", None),
        "compression_ratio": cfg.compression_ratio,
        "kept_fraction": layout.kept_fraction(),
        "kept_fraction_k": layout.kept_fraction("k"),
        "kept_fraction_v": layout.kept_fraction("v"),
        "layout": {"strategy": layout.strategy, "variant": cfg.variant, "group_size": len(layout.groups[0]),
                   "inputs": layout.inputs},
        "reconstructor_parameters": recon.num_parameters(),
        "reconstructor_bytes": recon.num_bytes(),
        "calibration_tokens": cal.tokens,
        "heldout_tokens": ho.tokens,
        "stage1": {"seconds": stage1_seconds, "final_loss": calib_err["kv"], "calibration_rel_error": calib_err},
        "stage2": {
            "seconds": stage2_seconds,
            "steps": cfg.stage2_steps,
            "omse_before": omse_before,
            "omse_after": omse_after,
            "train_omse_before": train_before,
            "train_omse_after": train_after,
            "reverted_to_stage1": reverted,
            "losses": losses,
        },
        "heldout": {
            "rel_error_stage1": held_err["recon"],
            "rel_error_stage2": held_err["recon_stage2"],
            "rel_error_zero_fill": held_err["zero"],
            "rel_error_mean_fill": held_err["mean"],
            "omse_zero_fill": omse_fill["zero"],
            "omse_mean_fill": omse_fill["mean"],
        },
        "total_seconds": time.perf_counter() - t0,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress", "extra")},
    }
    recon.stage1_state = stage1_state  # saved beside the final weights, for stage-1-only ablations
    return recon, report


def _moment_error(layout: HeadLayout, moments, head_dim: int) -> dict:
    """Calibration relative error of the discarded heads under the closed-form fit (hybrid keys: of
    every key under the latent)."""
    from .key_latent import fit_basis

    out = {}
    for kind in ("k", "v"):
        num = den = 0.0
        for gi, group in enumerate(layout.groups):
            if kind == "k" and layout.hybrid:
                energy = moments["k"][gi].energy(list(range(len(group) * layout.num_kv_heads)))
                num += fit_basis(moments["k"][gi], layout.key_latent[gi])[1] * energy
                den += energy
                continue
            index = {x: i for i, x in enumerate(layout.group_heads(group))}
            mom = moments[kind][gi]
            mask = layout.input_mask(kind, group)
            src = [index[x] for x in layout.sources(kind, group)]
            for t, head in enumerate(layout.targets(kind, group)):
                cols = [src[j] for j in range(len(src)) if mask[t, j]]
                num += mom.residual(cols, [index[head]])
                den += mom.energy([index[head]])
        out[kind] = num / max(den, 1e-30)
    out["kv"] = (out["k"] + out["v"]) / 2
    return out


def stage2(recon: Reconstructor, objective: OutputMSE, cfg: TrainConfig) -> list[float]:
    n = objective.n
    params = [p for p in recon.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.stage2_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.stage2_steps) / max(cfg.stage2_steps, 1)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    bar = tqdm(range(cfg.stage2_steps), desc="stage 2: output MSE", disable=not cfg.progress, leave=False)
    for _ in bar:
        batch = torch.randperm(n, generator=gen)[: min(cfg.stage2_batch, n)]
        loss = objective(recon, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(omse=f"{losses[-1]:.4g}")
    return losses


class _FillReconstructor:
    """Stand-in for a Reconstructor that fills discarded heads with zeros or per-head means."""

    def __init__(self, recon: Reconstructor, fill: str, means: dict):
        self.groups = [_FillGroup(recon.layout, group, fill, means) for group in recon.layout.groups]


class _FillGroup:
    def __init__(self, layout: HeadLayout, group: list[int], fill: str, means: dict):
        self.targets = {kind: layout.targets(kind, group) for kind in ("k", "v")}
        self.fill, self.means = fill, means

    def _fill(self, kind, src, rows):
        b, _, t, d = src.shape
        heads = [self.targets[kind][r] for r in rows.tolist()]
        if self.fill == "zero":
            return src.new_zeros(b, len(heads), t, d)
        mean = torch.stack([self.means[kind][layer][h] for layer, h in heads]).to(src.dtype)
        return mean[None, :, None, :].expand(b, -1, t, -1)

    def keys(self, src, rows):
        return self._fill("k", src, rows)

    def values(self, src, rows):
        return self._fill("v", src, rows)


__all__ = ["KeyMoments", "OutputMSE", "TrainConfig", "ValueMoments", "build_layout", "relative_kv_error", "train"]
