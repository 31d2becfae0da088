"""EchoKV's two-stage training (section 3.3) of the one network (:mod:`echokv.mixes`), for every variant: ``mix``
(learned components of both kinds), ``heads`` (the paper's retained heads) and ``hybrid`` (keys as learned
components, values from retained heads). Keys are always taken before RoPE.

Calibration blocks are taken evenly across the calibration text (every document of it, not only the first), and
a disjoint set of blocks of the same text is held out: stage 2 stops on it, and the report's errors are measured
on it. The evaluation text is never used, so no default is tuned on what reports it.

Stage 1 (closed form, from streamed moments of the group's pre-RoPE keys and values):
* learned components (``mix``; the keys of ``hybrid``): PCA of each group and kind; every component gets a
  precision (16 bits, int8, int4, or dropped) under the byte budget by :func:`~echokv.mixes.allocate`, from the
  error each choice leaves on calibration samples (relative to the group's energy; keys weighted by ``key_weight``);
* retained heads (``heads``; the values of ``hybrid``): the data-driven (or paper) choice of retained heads, then
  ridge regression of the discarded heads on the retained ones of the group.

Then every decoder is refitted by ridge regression to the components as the cache stores them (quantized).

Stage 2: the attention output (after ``o_proj``) of every compressed layer, computed from the original queries
and the K/V the decoders rebuild from the stored components (fixed: the encoders do not change), against the
output with the original K/V, relative MSE; AdamW with a cosine schedule. Every ``stage2_eval_every`` steps the held-out error
is measured and the best state is kept (early stopping): stage 2 never hands back something worse than stage 1
on held-out text.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import artifact as art
from . import distributed
from .config import LAYOUTS, RETIRED_KEYS, VARIANTS, TrainConfig
from .mixes import (
    KINDS,
    WIDTHS,
    Mixes,
    MixLayout,
    Part,
    allocate,
    component_errors,
    cost_bits,
    heads_pair,
    pca_pair,
)
from .models import kv_geometry
from .placement import readable
from .selection import _budgets, check_m, data_layout, make_groups, nearest_paper_layout
from .stats.capture import attention_modules
from .stats.collect import collect
from .stats.rope import Rope, rotate, unrotate

log = logging.getLogger(__name__)


# -- the request, checked before any work ---------------------------------------------------------------------
def validate(cfg: TrainConfig, model, reachable: bool = True) -> None:
    """Raise before any work for settings that cannot fit the model (``reachable=False``: a given layout, not
    the ratio, decides what is kept). Here rather than on :class:`~echokv.config.TrainConfig`, so that the
    configuration stays a leaf of values."""
    cfg.ratios()
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {cfg.layout!r}; choose 'paper' or 'data'")
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose one of {', '.join(VARIANTS)}")
    geo = kv_geometry(model)
    layers = geo.full_attention_layers
    if cfg.group_size is not None:
        make_groups(layers, cfg.group_size)
    if cfg.m is not None:
        check_m(cfg.m, geo.num_kv_heads)
    for name in ("calib_tokens", "seq_len", "stage2_batch", "heldout_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if cfg.stage2_steps < 0:
        raise ValueError(f"stage2_steps must be >= 0, got {cfg.stage2_steps}")
    if geo.max_context and cfg.seq_len > geo.max_context:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {geo.max_context} tokens")
    if cfg.k_ratio is not None and cfg.v_ratio is not None and \
            abs((cfg.k_ratio + cfg.v_ratio) / 2 - cfg.compression_ratio) > 0.02:
        raise ValueError(
            f"--k-ratio {cfg.k_ratio:g} and --v-ratio {cfg.v_ratio:g} compress the cache by "
            f"{(cfg.k_ratio + cfg.v_ratio) / 2:g}, not by --compression-ratio {cfg.compression_ratio:g} "
            "(the ratio the artifact is recorded and matched by): pass a --compression-ratio equal to their mean")
    if cfg.variant == "mix" and (cfg.layout != "data" or cfg.m is not None or cfg.inputs is not None):
        raise ValueError("--layout, --m and --inputs choose retained heads: they apply to the heads and hybrid "
                         "variants, not to mix (pass --variant heads or --variant hybrid)")
    if cfg.keys == RETIRED_KEYS:
        raise ValueError("--keys rope-commuting was retired (RoPE-commuting key maps: 4.0 retrieval at 0.5 on the "
                         "quick suite, against 69.0 with keys rebuilt before RoPE): drop --keys")
    if cfg.inputs not in (None, "all"):
        raise ValueError(f"--inputs {cfg.inputs} was retired with the RoPE-commuting forms: every retained head "
                         "of a group feeds each discarded one; drop --inputs")
    if not cfg.bias:
        raise ValueError("--no-bias was retired with the RoPE-commuting forms: the decoders always add the "
                         "group's mean; drop --no-bias")
    for flag, now in (("keys", "keys are always rebuilt before RoPE"), ("inputs", "every retained head feeds")):
        if getattr(cfg, flag) is not None:
            warnings.warn(f"--{flag} is deprecated and will be removed: {now}", FutureWarning, stacklevel=2)
    check_widths(cfg)
    if reachable:
        check_reachable(model, cfg)  # one plan for every variant and layout (training.planned_kept)


# -- data ---------------------------------------------------------------------------------------------------------
def spread_blocks(tokenizer, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration blocks, held-out blocks) of ``seq_len`` tokens, spread evenly over the calibration text and
    disjoint: every ``k``-th block is held out."""
    from .data import available_tokens, token_blocks

    n_cal = -(-cfg.calib_tokens // cfg.seq_len)
    n_held = -(-cfg.heldout_tokens // cfg.seq_len)
    have = available_tokens(tokenizer, "calibration", cfg.text_paths) // cfg.seq_len
    if have < n_cal + n_held:
        raise ValueError(
            f"the calibration text has {have} blocks of {cfg.seq_len} tokens; {n_cal} calibration + {n_held} "
            "held-out blocks were asked for: pass fewer --calib-tokens / --heldout-tokens or more --text"
        )
    blocks = token_blocks(tokenizer, "calibration", have * cfg.seq_len, cfg.seq_len, cfg.text_paths)
    picked = torch.linspace(0, have - 1, n_cal + n_held).round().long().unique()
    held = picked[1::max(1, len(picked) // n_held)][:n_held]
    cal = picked[~torch.isin(picked, held)][:n_cal]
    return blocks[cal], blocks[held]


class Features:
    """Per group: pre-RoPE keys and values of some blocks [N, T, D] (layers, heads, channels), and per layer the
    queries at the scored positions and the reference attention output, all float32.

    Data parallel (:mod:`echokv.distributed`): ``index`` holds the positions of this rank's blocks among all
    ``n`` blocks of the ranks; errors are this rank's share of the whole (:meth:`error` sums them)."""

    def __init__(self, model, samples: dict, groups: list[list[int]], modules: dict, queries: int | None, seed: int,
                 from_start: bool = False, index: torch.Tensor | None = None, n: int | None = None):
        q0 = next(iter(samples.values()))[0]
        self.n, t = q0.shape[0], q0.shape[2]
        self.index = None
        if index is not None:
            self.index, self.n = {int(g): i for i, g in enumerate(index)}, n
        if queries is None or queries >= t:
            self.pos = torch.arange(t)
        else:  # a fixed random subset of the later positions, which attend to the most context (or of all)
            gen = torch.Generator().manual_seed(seed)
            lo = 0 if from_start else t // 8
            self.pos = (lo + torch.randperm(t - lo, generator=gen)[:queries]).sort().values
        self.mask = torch.arange(t)[None, :] <= self.pos[:, None]  # [queries, T] causal
        self.groups, self.modules = groups, modules
        self.cos, self.sin = {}, {}
        self.x: dict[tuple[int, str], torch.Tensor] = {}
        self.q, self.ref = {}, {}
        self.den = 0.0
        with torch.no_grad():
            for gi, group in enumerate(groups):
                ks, vs = [], []
                for layer in group:
                    q, k, v = (x.float() for x in samples[layer])
                    rope = Rope(model, layer)
                    cos, sin = rope.table(t, k.device)  # (samples are kept on the CPU)
                    self.cos[layer], self.sin[layer] = cos, sin
                    ks.append(unrotate(k, cos, sin).transpose(1, 2).flatten(2))
                    vs.append(v.transpose(1, 2).flatten(2))
                    self.q[layer] = q[:, :, self.pos]
                    self.ref[layer] = out = self._attend(self.q[layer], k, v, modules[layer])
                    self.den += float(out.pow(2).sum())
                self.x[gi, "k"], self.x[gi, "v"] = torch.cat(ks, -1), torch.cat(vs, -1)
        self.den = distributed.sum_float(self.den)

    def _attend(self, q, k, v, module):
        """The attention output (after ``o_proj``) of the queries ``q`` over K/V of fewer heads (GQA)."""
        n_rep = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                                           attn_mask=self.mask, scale=module.scaling)
        b, hq, tq, d = o.shape
        return o.transpose(1, 2).reshape(b, tq, hq * d) @ module.o_proj.weight.float().T

    def _layer_output(self, lay: MixLayout, rebuilt: dict, j: int, layer: int, q) -> torch.Tensor:
        """The output of ``layer`` (the ``j``-th of its group; ``q`` its queries) over the K/V in its group's
        ``rebuilt`` features, the keys rotated to their positions."""
        h, d = lay.num_kv_heads, lay.head_dim
        cols = slice(j * h * d, (j + 1) * h * d)
        k, v = (rebuilt[kind][..., cols].unflatten(-1, (h, d)).transpose(1, 2) for kind in KINDS)
        return self._attend(q, rotate(k, self.cos[layer], self.sin[layer]), v, self.modules[layer])

    def encode(self, mixes: Mixes, quantized: bool = True) -> None:
        """Fix every sample's components as the cache stores them (the encoder does not change in stage 2)."""
        self.z = {}
        with torch.no_grad():
            for (gi, kind), x in self.x.items():
                i = mixes.index(gi, kind)
                z = mixes.encode(i, x)
                self.z[gi, kind] = mixes.fake_quantize(i, z) if quantized else z

    def output_error(self, mixes: Mixes, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Relative output MSE of every compressed layer with the K/V ``mixes`` rebuilds from the fixed
        components (:meth:`encode`). ``batch``: positions among all ``n`` blocks (this rank scores its own)."""
        if batch is not None and self.index is not None:
            local = torch.tensor([self.index[int(b)] for b in batch if int(b) in self.index], dtype=torch.long)
            if not len(local):  # none of the batch is this rank's
                return torch.zeros(())
        pick = (lambda x: x) if batch is None else (lambda x: x[local if self.index is not None else batch])
        total = 0.0
        for gi, group in enumerate(self.groups):
            rebuilt = {kind: mixes.decode(mixes.index(gi, kind), pick(self.z[gi, kind])) for kind in KINDS}
            for j, layer in enumerate(group):
                out = self._layer_output(mixes.layout, rebuilt, j, layer, pick(self.q[layer]))
                total = total + (out - pick(self.ref[layer])).pow(2).sum()
        scale = 1.0 if batch is None else self.n / len(batch)
        return total * scale / max(self.den, 1e-30)

    def error(self, mixes: Mixes) -> float:
        """:meth:`output_error` of every block (of every rank)."""
        with torch.no_grad():
            return distributed.sum_float(float(self.output_error(mixes)))

    def kv_error(self, mixes: Mixes) -> dict[str, float]:
        """Relative squared error of the rebuilt keys (pre-RoPE) and values, all heads."""
        out = {}
        with torch.no_grad():
            for kind in KINDS:
                num = den = 0.0
                for gi in range(len(self.groups)):
                    x = self.x[gi, kind]
                    num += float((mixes.decode(mixes.index(gi, kind), self.z[gi, kind]) - x).pow(2).sum())
                    den += float(x.pow(2).sum())
                num, den = distributed.sum_float(num), distributed.sum_float(den)
                out[kind] = num / max(den, 1e-30)
        return out

    def details(self, mixes: Mixes) -> dict:
        """Where the error is (:mod:`echokv_lab.referee`): per layer and KV head the relative error of keys (pre-RoPE)
        and values, per layer the relative attention-output error, and per token position the relative error of
        K and V (all layers and heads) and of the output (the scored query positions)."""
        lay = mixes.layout
        h, d = lay.num_kv_heads, lay.head_dim
        out = {"layers": [], "k": [], "v": [], "output": [], "positions": self.pos.tolist()}
        t = next(iter(self.x.values())).shape[1]
        pos_num = {kind: torch.zeros(t) for kind in KINDS}
        pos_den = {kind: torch.zeros(t) for kind in KINDS}
        out_num, out_den = torch.zeros(len(self.pos)), torch.zeros(len(self.pos))
        with torch.no_grad():
            for gi, group in enumerate(self.groups):
                rebuilt = {kind: mixes.decode(mixes.index(gi, kind), self.z[gi, kind]) for kind in KINDS}
                for j, layer in enumerate(group):
                    cols = slice(j * h * d, (j + 1) * h * d)
                    heads = {}
                    for kind in KINDS:
                        x = self.x[gi, kind][..., cols].unflatten(-1, (h, d))  # [N, T, H, d]
                        err = (rebuilt[kind][..., cols].unflatten(-1, (h, d)) - x).pow(2)
                        heads[kind] = (err.sum((0, 1, 3)) / x.pow(2).sum((0, 1, 3)).clamp_min(1e-30)).tolist()
                        pos_num[kind] += err.sum((0, 2, 3))
                        pos_den[kind] += x.pow(2).sum((0, 2, 3))
                    o = self._layer_output(lay, rebuilt, j, layer, self.q[layer])
                    diff, ref = (o - self.ref[layer]).pow(2), self.ref[layer].pow(2)
                    out_num += diff.sum((0, 2))
                    out_den += ref.sum((0, 2))
                    out["layers"].append(layer)
                    out["k"].append(heads["k"])
                    out["v"].append(heads["v"])
                    out["output"].append(float(diff.sum() / ref.sum().clamp_min(1e-30)))
        out["by_position"] = {kind: (pos_num[kind] / pos_den[kind].clamp_min(1e-30)).tolist() for kind in KINDS}
        out["by_position"]["output"] = (out_num / out_den.clamp_min(1e-30)).tolist()
        return out


def refit_decoders(mixes: Mixes, train: Features, ridge: float) -> None:
    """Stage 1, second half: each decoder refitted by ridge regression of the features on the components as the
    cache gives them back (quantized), which shrinks what quantization made noisy. Heads parts: only the discarded
    heads' columns (the retained heads stay copies). Data parallel: means and normal equations summed over ranks."""
    with torch.no_grad():
        for (gi, kind), x in train.x.items():
            i = mixes.index(gi, kind)
            z = train.z[gi, kind].flatten(0, 1).double()
            x = x.flatten(0, 1).double()
            mz, mx = distributed.pooled_mean(z.mean(0), len(z)), distributed.pooled_mean(x.mean(0), len(x))
            zc, xc = z - mz, x - mx
            a = distributed.all_sum(zc.T @ zc)
            a += ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype)
            w = torch.linalg.solve(a, distributed.all_sum(zc.T @ xc))  # [r, D]: x ~ (z - mz) w + mx
            _, _, r, c, scale = mixes.tensors(i)
            cols = mixes.discarded_columns(i) if mixes.layout.parts[i].selection is not None else \
                torch.ones(r.shape[1], dtype=torch.bool)
            r[:, cols] = (w / scale.double()[:, None])[:, cols].float()
            c[cols] = (mx - mz @ w)[cols].float()


# -- stage 1 ------------------------------------------------------------------------------------------------------
def check_widths(cfg: TrainConfig) -> None:
    allowed = ("auto", "16", "8", "4")
    if str(cfg.widths) not in allowed:
        raise ValueError(f"widths {cfg.widths!r}: choose 'auto' (the byte budget picks int8, int4 or 16 bits per "
                         "component) or one precision for every retained component: 16 (the cache's dtype), 8 or 4 "
                         "(int8 / int4)")


def _fixed_width(cfg: TrainConfig) -> int | None:
    return None if str(cfg.widths) == "auto" else int(cfg.widths)


def head_ratio(ratio: float, width: int, element_bits: int, group: int) -> float:
    """The share of heads to discard so that the retained ones, kept at ``width``, fill ``1 - ratio`` of the
    cache (retained heads at int8 in a bf16 cache: twice as many heads for the same bytes)."""
    return max(0.0, 1.0 - (1.0 - ratio) * element_bits / cost_bits(width, group))


#: the kinds each variant keeps as retained heads (a selection encoder); the rest are learned components
HEAD_KINDS = {"mix": (), "heads": KINDS, "hybrid": ("v",)}


def head_ratios(cfg: TrainConfig, width: int, element_bits: int) -> tuple[float, float]:
    """The shares of K and V heads to discard (:func:`head_ratio`) for ``cfg``'s kinds kept as retained heads; a
    kind kept as components (the hybrid's keys) gets the values' share, so that its unused head layout is valid."""
    rk, rv = (head_ratio(r, width, element_bits, cfg.quant_group) for r in cfg.ratios())
    return (rk if "k" in HEAD_KINDS[cfg.variant] else rv), rv


def stage1(model, cfg: TrainConfig, moments: dict, samples: Features, groups: list[list[int]],
           heads=None) -> Mixes:
    """The closed-form pairs and the precision of every learned component under the byte budget. ``heads``: the
    retained heads (a :class:`~echokv.selection.HeadLayout`) of the kinds kept as heads, chosen here when None."""
    geo = kv_geometry(model)
    h, d = geo.num_kv_heads, geo.head_dim
    element_bits = max(16, 8 * next(model.parameters()).dtype.itemsize)
    pairs, parts, errors = [], [], []
    width = _fixed_width(cfg)
    head_kinds = HEAD_KINDS[cfg.variant]
    head_width = width or element_bits
    if head_kinds and heads is None:
        rk, rv = head_ratios(cfg, head_width, element_bits)
        stats = {"k": moments["k_pre"], "v": moments["v"]}
        if cfg.layout == "data":
            heads = data_layout(geo.full_attention_layers, h, len(groups[0]), rk, rv, stats)
        else:
            heads = paper_heads(geo.full_attention_layers, h, rk, rv, len(groups[0]), cfg.m)
    for gi, group in enumerate(groups):
        for kind in KINDS:
            mom = moments["k_pre" if kind == "k" else "v"][gi]
            if kind in head_kinds:
                kept = [j * h + hh for j, layer in enumerate(group) for hh in heads.retained_in_layer(kind, layer)]
                pair = heads_pair(mom, kept, d, cfg.ridge)
                parts.append(Part(kind, gi, list(group), [head_width] * len(kept) * d, selection=kept))
            else:
                pair = pca_pair(mom)
                parts.append(Part(kind, gi, list(group), []))
                z = ((samples.x[gi, kind] - pair[0]) @ pair[1]) / pair[4]
                # (data parallel: means over every rank's samples)
                energy = float(distributed.pooled_mean(samples.x[gi, kind].pow(2).mean(0).sum(), len(z)))
                weight = (cfg.key_weight if kind == "k" else 1.0) / max(energy, 1e-30)
                err = distributed.pooled_mean(component_errors(z.flatten(0, 1), WIDTHS, cfg.quant_group),
                                              z.shape[0] * z.shape[1]) * pair[4].pow(2)[:, None]
                if width is not None:  # one precision for every kept component: only dropping is chosen
                    err = torch.stack([err[:, 0], err[:, WIDTHS.index(width)]], 1)
                errors.append(err * weight)
            pairs.append(pair)
    layout = MixLayout(geo.full_attention_layers, h, d, groups, parts, cfg.variant, cfg.quant_group, "pre-rope",
                       element_bits)
    learned = [p for p in parts if p.selection is None]
    if learned:
        widths = WIDTHS if width is None else (0, width)
        kind = None if cfg.variant == "mix" else "k"  # the kinds the allocator spends on
        target = _learned_bits(cfg, layout, kind)
        budget = target - layout.POSITION_BITS * len(groups)
        for _ in range(4):  # the allocator counts whole scale groups; shrink until the stored bits fit
            chosen, _ = allocate(errors, budget, widths, cfg.quant_group)
            for part, w in zip(learned, chosen):
                part.widths = w
            layout.parts = [_ordered(p) if p.selection is None else p for p in parts]
            over = layout.bits(kind) - target
            if over <= 0:
                break
            budget -= over
    mixes = Mixes(layout)
    for i, (part, pair) in enumerate(zip(layout.parts, pairs)):
        m, e, r, c, scale = pair
        if part.selection is None:  # the components the budget kept, in storage order
            e, r, scale = e[:, part.order], r[part.order], scale[part.order]
        mixes.set_part(i, m, e, r, c, scale)
    return mixes


def _learned_bits(cfg: TrainConfig, layout: MixLayout, kind: str | None) -> float:
    """The stored bits per token the learned components of ``kind`` (None: both) may take, positions included: the
    mix's whole budget; the hybrid's keys, what the values' whole heads leave of it (or the key ratio asked)."""
    full = sum(layout.group_dims) * layout.element_bits
    if kind is None:
        return (1.0 - cfg.compression_ratio) * 2 * full
    if cfg.k_ratio is not None or cfg.v_ratio is not None:
        return (1.0 - cfg.ratios()[0]) * full
    return (1.0 - cfg.compression_ratio) * 2 * full - layout.bits("v")


def _ordered(part: Part) -> Part:
    """Drop the components of width 0 and sort the rest by width (16, 8, 4), remembering where each came from."""
    idx = [c for w in (32, 16, 8, 4) for c, x in enumerate(part.widths) if x == w]
    out = Part(part.kind, part.group, part.layers, [part.widths[c] for c in idx], part.selection)
    out.order = torch.tensor(idx, dtype=torch.long)
    return out


# -- stage 2 ------------------------------------------------------------------------------------------------------
#: a held-out output error below this is bf16 rounding (8-bit KV quantization measures 4e-5): stage 2 is skipped
LOSSLESS = 1e-4


def stage2(mixes: Mixes, train: Features, held: Features, cfg: TrainConfig) -> dict:
    """Output-MSE fine-tuning with early stopping on held-out blocks (see the module docstring). Data parallel:
    every rank draws the same batches, computes the loss of the blocks it holds, and the gradients and held-out
    errors are summed over the ranks, so all take the same steps and keep the same best state."""
    start = held.error(mixes)
    curve, losses = [(0, start)], []
    if not cfg.stage2_steps or start < LOSSLESS:  # not asked for, or nothing left to gain
        mixes.requires_grad_(False)
        out = {"heldout_output_error_curve": curve, "best_step": 0, "train_losses": losses}
        if cfg.stage2_steps:
            out["skipped"] = f"stage 1 is already lossless (held-out output error {start:.2g} < {LOSSLESS:g})"
        return out
    params = mixes.trainable()
    mixes.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.stage2_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    best = (start, 0, {k: v.detach().clone() for k, v in mixes.state_dict().items()})
    bar = tqdm(range(cfg.stage2_steps), desc="stage 2: output MSE", disable=not cfg.progress, leave=False)
    for step in bar:
        batch = torch.randperm(train.n, generator=gen)[: min(cfg.stage2_batch, train.n)]
        loss = train.output_error(mixes, batch)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # (not when none of the batch is this rank's)
            loss.backward()
        distributed.sum_gradients(params)
        mixes.mask_gradients()
        opt.step()
        sched.step()
        losses.append(distributed.sum_float(float(loss.detach())))
        if (step + 1) % cfg.stage2_eval_every == 0 or step + 1 == cfg.stage2_steps:
            err = held.error(mixes)
            curve.append((step + 1, err))
            if err < best[0]:
                best = (err, step + 1, {k: v.detach().clone() for k, v in mixes.state_dict().items()})
            bar.set_postfix(held=f"{err:.4g}")
    mixes.load_state_dict(best[2])
    mixes.requires_grad_(False)
    return {"heldout_output_error_curve": curve, "best_step": best[1], "train_losses": losses}


# -- the whole procedure ------------------------------------------------------------------------------------------
def train(model, tokenizer, cfg: TrainConfig, calib=None, held=None, layout=None) -> tuple[Mixes, dict]:
    """Calibrate, fit (stage 1), allocate the budget, fine-tune (stage 2). Returns the network and a report.

    ``calib``/``held`` are token blocks [N, T] (by default spread over the calibration text); ``layout`` (a
    :class:`~echokv.selection.HeadLayout`) overrides the groups and the retained heads of the heads and hybrid
    variants."""
    if layout is not None and not HEAD_KINDS[cfg.variant]:
        raise ValueError("a head layout can only be given to the heads and hybrid variants")
    validate(cfg, model, reachable=layout is None)  # (a given layout, not the ratio, decides what is kept)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    geo = kv_geometry(model)
    if calib is None or held is None:
        calib, held = spread_blocks(tokenizer, cfg)
    check_data_parallel(cfg, len(calib), len(held))
    # this rank's blocks (every block in one process); the first stage2_sequences blocks are kept for stage 2
    cal_index, held_index = distributed.shard(len(calib)), distributed.shard(len(held))
    kept = min(cfg.stage2_sequences, len(calib))
    keep = cal_index[cal_index < kept]
    groups = layout.groups if layout is not None else make_groups(
        geo.full_attention_layers, cfg.group_size or min(4, len(geo.full_attention_layers)))
    model.requires_grad_(False)
    modules = readable(attention_modules(model))

    t1 = time.perf_counter()
    cal = collect(model, calib[cal_index], groups, features=("k_pre", "v"), keep_samples=len(keep),
                  desc="stage 1: calibration", progress=cfg.progress).pool()
    if cal.moments["k_pre"] is None:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to undo RoPE with: EchoKV stores "
                         "keys before RoPE, so it cannot compress this model's cache (the quant and kivi methods can)")
    train_set = Features(model, cal.samples, groups, modules, cfg.stage2_queries, cfg.seed, index=keep, n=kept)
    ho = collect(model, held[held_index], groups, features=(), keep_samples=len(held_index), desc="held-out capture",
                 progress=cfg.progress).pool()
    held_set = Features(model, ho.samples, groups, modules, cfg.stage2_queries, cfg.seed + 1, index=held_index,
                        n=len(held))
    mixes = stage1(model, cfg, cal.moments, train_set, groups, layout)
    train_set.encode(mixes)
    held_set.encode(mixes)
    with torch.no_grad():
        kv_closed = held_set.kv_error(mixes)
        out_closed = held_set.error(mixes)
    refit_decoders(mixes, train_set, cfg.ridge)
    stage1_seconds = time.perf_counter() - t1
    with torch.no_grad():
        kv1 = held_set.kv_error(mixes)
    stage1_state = {k: v.detach().clone() for k, v in mixes.state_dict().items()}

    t2 = time.perf_counter()
    s2 = stage2(mixes, train_set, held_set, cfg)
    stage2_seconds = time.perf_counter() - t2
    mixes.round_to_stored()
    with torch.no_grad():
        kv2 = held_set.kv_error(mixes)
        held_set.encode(mixes, quantized=False)
        unquantized = held_set.error(mixes)
    lay = mixes.layout
    report = {
        "model": getattr(model, "echokv_name", None),
        "variant": cfg.variant,
        "compression_ratio": cfg.compression_ratio,
        "kept_fraction": lay.kept_fraction(),
        "kept_fraction_k": lay.kept_fraction("k"),
        "kept_fraction_v": lay.kept_fraction("v"),
        "width_counts": {str(w): n for w, n in lay.width_counts().items()},
        "layout": {"variant": cfg.variant, "group_size": len(groups[0]), "keys": lay.keys,
                   "quant_group": lay.quant_group},
        "network_parameters": mixes.num_parameters(),
        "network_bytes": mixes.num_bytes(),
        "calibration_tokens": cal.tokens,
        "heldout_tokens": ho.tokens,
        "stage1": {"seconds": stage1_seconds, "heldout_rel_error": kv1, "final_loss": (kv1["k"] + kv1["v"]) / 2,
                   "before_refit": {"heldout_rel_error": kv_closed, "heldout_output_error": out_closed}},
        "stage2": {"seconds": stage2_seconds, "steps": cfg.stage2_steps, **s2,
                   "omse_before": s2["heldout_output_error_curve"][0][1],
                   "omse_after": min(e for _, e in s2["heldout_output_error_curve"]),
                   "omse_after_unquantized": unquantized,
                   "reverted_to_stage1": s2["best_step"] == 0 and cfg.stage2_steps > 0 and not s2.get("skipped")},
        "heldout": {"rel_error_stage1": kv1, "rel_error_stage2": kv2},
        "total_seconds": time.perf_counter() - t0,
        "config": cfg.record(),
    }
    if distributed.active():
        report["data_parallel"] = {"processes": distributed.size(), "backend": distributed.backend()}
    mixes.stage1_state = stage1_state
    return mixes, report


def check_data_parallel(cfg: TrainConfig, calibration: int | None = None, heldout: int | None = None,
                        processes: int | None = None) -> None:
    """Refuse, before any work, a data-parallel run (:mod:`echokv.distributed`) this trainer cannot split: the
    more processes than calibration, held-out or stage-2 sequences (blocks
    of ``seq_len`` tokens; counted from the configuration when not given)."""
    processes = distributed.size() if processes is None else processes
    if processes < 2:
        return
    calibration = -(-cfg.calib_tokens // cfg.seq_len) if calibration is None else calibration
    heldout = -(-cfg.heldout_tokens // cfg.seq_len) if heldout is None else heldout
    counts = {"calibration": calibration, "held-out": heldout, "stage-2": min(cfg.stage2_sequences, calibration)}
    least = min(counts.values())
    if processes > least:
        raise ValueError(
            f"torchrun started {processes} processes, but training splits its sequences of {cfg.seq_len} tokens "
            f"over them and has only {', '.join(f'{n} {k}' for k, n in counts.items())} sequences: start at most "
            f"{least} (--nproc-per-node {least}), or pass more --calib-tokens / --heldout-tokens / "
            "--stage2-sequences")


def paper_heads(layers, num_kv_heads: int, head_ratio_k: float, head_ratio_v: float, group_size: int, m):
    """The retained heads of the paper layout for pre-RoPE heads: keys' and values' nearest layouts at one S."""
    heads = nearest_paper_layout(layers, num_kv_heads, head_ratio_k, group_size, m, "all")
    heads.retained_v = nearest_paper_layout(layers, num_kv_heads, head_ratio_v, group_size, m, "all").retained_v
    return heads


def planned_kept(model, cfg: TrainConfig) -> tuple[float, float]:
    """The kept fractions (K, V) :func:`stage1` will store for ``cfg``, from the geometry alone: learned components
    keep what their byte budget asks, up to every component at its width; retained heads are whole heads at their
    width, as many as the layout (data budgets, or the nearest paper layout) retains."""
    geo = kv_geometry(model)
    layers, h = geo.full_attention_layers, geo.num_kv_heads
    element_bits = max(16, 8 * next(model.parameters()).dtype.itemsize)
    width = _fixed_width(cfg)
    most = cost_bits(width or 16, cfg.quant_group) / element_bits  # every component kept at its width
    if cfg.variant == "mix":  # one byte budget over both kinds
        kept = min(1.0 - cfg.compression_ratio, most)
        return kept, kept
    groups = make_groups(layers, cfg.group_size or min(4, len(layers)))
    head_width = width or element_bits
    rk, rv = head_ratios(cfg, head_width, element_bits)
    if cfg.layout == "data":
        heads = [sum(_budgets(groups, h, r)) for r in (rk, rv)]
    else:
        lay = paper_heads(layers, h, rk, rv, len(groups[0]), cfg.m)
        heads = [len(lay.retained_k), len(lay.retained_v)]
    per_head = cost_bits(head_width, cfg.quant_group) / element_bits / (len(layers) * h)  # one head's share
    kept_k, kept_v = heads[0] * per_head, heads[1] * per_head
    if cfg.variant == "hybrid":  # keys: what the values' heads leave (or the key ratio asked)
        asked = cfg.k_ratio is not None or cfg.v_ratio is not None
        kept_k = max(0.0, min(most, 1.0 - cfg.ratios()[0] if asked else 2 * (1.0 - cfg.compression_ratio) - kept_v))
    return kept_k, kept_v


def check_reachable(model, cfg: TrainConfig) -> None:
    """Refuse, before calibration, a request whose layout would keep more or less than asked (by over 0.02 of
    the cache, for K, V or both), naming the nearest ratios this layout reaches."""
    from dataclasses import replace

    def misses(c: TrainConfig) -> bool:
        (kk, kv), (rk, rv) = planned_kept(model, c), c.ratios()
        # a kind's own ratio is the user's request only when given (the hybrid's 60/40 split is ours)
        far = (c.k_ratio is not None and abs(kk - (1 - rk)) > 0.02) or (c.v_ratio is not None and abs(kv - (1 - rv)) > 0.02)
        return far or min(kk, kv) == 0 or abs((kk + kv) / 2 - (1 - c.compression_ratio)) > 0.02  # 0: nothing to rebuild from

    if not misses(cfg):
        return
    kk, kv = planned_kept(model, cfg)
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


# -- an artifact kept for a configuration (the demo, the evaluation's on-the-spot training) -------------------
def artifact_dir(work_dir, config: TrainConfig) -> Path:
    """Where an artifact trained on the spot for ``config`` is kept."""
    return Path(work_dir) / f"echokv-{config.variant}-{config.compression_ratio:g}"


def train_or_reuse(model, tokenizer, folder, config: TrainConfig) -> tuple[str, dict]:
    """The artifact in ``folder`` when it was trained for this model with ``config``; otherwise one trained
    now and saved there. Returns its path and its training report."""
    folder = Path(folder)
    wanted = config.record()
    if folder.exists():
        try:
            saved = art.read_config(folder)
            art.check_compatible(saved, model, str(folder))
            if saved.get("training") == wanted:
                log.info("reusing %s", folder)
                return str(folder), json.loads((folder / art.REPORT).read_text())
        except (art.ArtifactError, OSError, json.JSONDecodeError):
            pass
    log.info("training an EchoKV-%s artifact at compression ratio %g (stage 1 + %d stage-2 steps) into %s",
             config.variant, config.compression_ratio, config.stage2_steps, folder)
    network, report = train(model, tokenizer, config)
    art.save(network, model, folder, report, overwrite=True)
    return str(folder), report
