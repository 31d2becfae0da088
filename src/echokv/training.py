"""Two-stage training of the reconstructor (EchoKV section 3.3).

Stage 1 minimises the KV-reconstruction MSE of the discarded heads. Its optimum is a ridge
regression, solved in closed form from streamed second moments (:mod:`echokv.stats.moments`).
Stage 2 fine-tunes on the output MSE: for every compressed layer, the attention output (after the
output projection) computed from the original queries and the reconstructed K/V, against the output
with the original K/V; the LLM is frozen. AdamW with a cosine schedule.

Only query heads that read a discarded KV head change, so stage 2 computes attention for those alone
and projects the difference through their columns of ``o_proj``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import TrainConfig
from .models import kv_geometry
from .placement import readable
from .reconstructor import Reconstructor
from .selection import HeadLayout, data_layout, make_groups, nearest_paper_layout
from .stats.capture import attention_modules
from .stats.collect import collect

#: layers per group of the data-driven layout unless ``group_size`` says otherwise
DATA_GROUP_SIZE = 4


def build_layout(cfg: TrainConfig, model, moments=None) -> HeadLayout:
    geo = kv_geometry(model)
    rk, rv = cfg.ratios()
    if cfg.variant == "hybrid":  # values choose their heads; keys become the latent
        # (the paper layout's S follows the keys' ratio: the values' then, not 0, which would keep every head)
        rk_heads = rv if cfg.layout == "paper" else 0.0
        heads = build_layout(TrainConfig(**{**asdict(cfg), "variant": "heads", "k_ratio": rk_heads, "v_ratio": rv}),
                             model, moments)
        return heads.with_key_latent(hybrid_key_ratio(cfg, heads.kept_fraction("v")), geo.head_dim)
    layers, h = geo.full_attention_layers, geo.num_kv_heads
    if cfg.layout == "data":
        if moments is None:
            raise ValueError("the data-driven layout needs calibration moments")
        return data_layout(layers, h, cfg.group_size or min(DATA_GROUP_SIZE, len(layers)), rk, rv, moments)
    inputs = cfg.inputs or "global+local"
    lk = nearest_paper_layout(layers, h, rk, cfg.group_size, cfg.m, inputs)
    s = len(lk.groups[0])
    lv = nearest_paper_layout(layers, h, rv, s, cfg.m if cfg.v_ratio is None else None, inputs)
    return HeadLayout(layers, h, lk.groups, lk.retained_k, lv.retained_v, inputs=inputs, strategy="paper")


def hybrid_key_ratio(cfg: TrainConfig, kept_v: float) -> float:
    """The hybrid's key ratio: as asked, or, when the split is ours (no --k-ratio/--v-ratio), what the keys need
    for the whole cache to keep ``1 - compression_ratio`` once the values' whole heads are rounded (``kept_v``)."""
    rk = cfg.ratios()[0]
    if cfg.k_ratio is not None or cfg.v_ratio is not None:
        return rk
    return round(min(max(1.0 - (2 * (1.0 - cfg.compression_ratio) - kept_v), 0.0), 0.999), 9)


def planned_kept(cfg: TrainConfig, model) -> tuple[float, float]:
    """The kept fractions (K, V) training will store, from the geometry alone (before calibration), for every
    variant and layout the configuration accepts, computed as training builds them: the one plan every
    reachability check (:func:`check_reachable`) asks."""
    from .key_latent import latent_dims
    from .selection import _budgets

    if cfg.retains_components:  # mix and pre-RoPE heads: their own trainer (mix_training.stage1)
        from .mix_training import planned_kept as components_kept

        return components_kept(model, cfg)
    geo = kv_geometry(model)
    layers, h = geo.full_attention_layers, geo.num_kv_heads
    rk, rv = cfg.ratios()
    if cfg.layout == "paper":
        lay = build_layout(cfg, model)
        return lay.kept_fraction("k"), lay.kept_fraction("v")
    groups = make_groups(layers, cfg.group_size or min(DATA_GROUP_SIZE, len(layers)))
    total = len(layers) * h
    kept_v = sum(_budgets(groups, h, rv)) / total
    if cfg.variant == "hybrid":
        rk = hybrid_key_ratio(cfg, kept_v)
        return sum(latent_dims(len(g) * h, geo.head_dim, rk) for g in groups) / (total * geo.head_dim), kept_v
    return sum(_budgets(groups, h, rk)) / total, kept_v


def check_reachable(model, cfg: TrainConfig) -> None:
    """Refuse, before calibration, a request whose layout would keep more or less than asked (by over 0.02 of
    the cache, for K, V or both), naming the nearest ratios this layout reaches."""
    from dataclasses import replace

    def misses(c: TrainConfig) -> bool:
        (kk, kv), (rk, rv) = planned_kept(c, model), c.ratios()
        # a kind's own ratio is the user's request only when given (the hybrid's 60/40 split is ours)
        far = (c.k_ratio is not None and abs(kk - (1 - rk)) > 0.02) or (c.v_ratio is not None and abs(kv - (1 - rv)) > 0.02)
        return far or min(kk, kv) == 0 or abs((kk + kv) / 2 - (1 - c.compression_ratio)) > 0.02  # 0: nothing to rebuild from

    if not misses(cfg):
        return
    kk, kv = planned_kept(cfg, model)
    near = [r / 100 for r in range(1, 100) if not misses(replace(cfg, compression_ratio=r / 100, k_ratio=None,
                                                                   v_ratio=None))]
    near = sorted(near, key=lambda r: abs(r - cfg.compression_ratio))[:3]
    what = "mix variant" if cfg.variant == "mix" else f"{cfg.layout} layout of the {cfg.variant} variant"
    raise ValueError(
        f"the {what} cannot compress by {cfg.compression_ratio:g} on this model"
        + (f" (a {8 * next(model.parameters()).dtype.itemsize}-bit cache)" if cfg.variant == "mix" else "")
        + f": it would keep {(kk + kv) / 2:.3f} of the cache (K {kk:.3f}, V {kv:.3f})"
        + ("" if min(kk, kv) else f", nothing of the {'keys' if kk == 0 else 'values'} to rebuild from") + "; "
        + (f"nearest reachable ratios: {', '.join(f'{r:g}' for r in sorted(near))}" if near else
           "no ratio is reachable with these settings")
        + ("" if cfg.variant == "mix" else "; or train the mix variant (the default), which reaches any ratio")
    )


def group_size_for(cfg: TrainConfig, model) -> int:
    geo = kv_geometry(model)
    if cfg.group_size is not None:
        return cfg.group_size
    if cfg.layout == "data":
        return min(DATA_GROUP_SIZE, len(geo.full_attention_layers))
    return len(build_layout(cfg, model).groups[0])


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
    if cfg.retains_components:
        from .mix_training import train_mixes

        return train_mixes(model, tokenizer, cfg, calib, held, layout)
    from .mix_training import check_data_parallel

    check_data_parallel(cfg)  # (refuses these variants under torchrun)
    cfg.validate(model, reachable=layout is None)
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
    def calibrate(groups):
        return collect(model, calib, groups, keep_samples=cfg.stage2_sequences, means=True,
                       desc="stage 1: calibration", progress=cfg.progress)

    cal = calibrate(groups)
    layout = layout or build_layout(cfg, model, cal.moments)
    if [list(g) for g in layout.groups] != groups:  # paper search may pick another S than assumed
        groups = layout.groups
        cal = calibrate(groups)
    recon = Reconstructor(layout, geo.head_dim, bias=cfg.bias)
    recon.fit_closed_form(cal.moments, cfg.ridge)
    stage1_seconds = time.perf_counter() - t1
    calib_err = _moment_error(layout, cal.moments, geo.head_dim)

    ho = collect(model, held, groups, features=(), keep_samples=len(held), desc="held-out capture",
                 progress=cfg.progress)
    modules = readable(attention_modules(model))
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
    trains = any(p.requires_grad for p in recon.parameters())  # nothing to rebuild: nothing to train
    losses = stage2(recon, train_omse, cfg) if cfg.stage2_steps and trains else []
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
        "config": cfg.record(),
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
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.stage2_steps, 1))
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


__all__ = ["OutputMSE", "TrainConfig", "build_layout", "relative_kv_error", "train"]
