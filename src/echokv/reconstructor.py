"""The reconstruction network: per group of S layers, linear maps from retained heads to discarded ones.

Values: each discarded head is ``sum_s W[t, s] v_s + b_t`` over the retained heads s that feed it
(the layout's input mask). Keys: the RoPE-commuting form, one complex
coefficient per (target, source, frequency), applied to the post-RoPE keys the cache holds
(:mod:`echokv.stats.moments`).
EchoKV-Hybrid keeps keys as a per-group latent instead (:mod:`echokv.key_latent`): the group's
``k_basis`` buffer, fitted in stage 1 and left as it is by stage 2.
"""

from __future__ import annotations

import torch
from torch import nn

from . import key_latent
from .selection import HeadLayout
from .stats.moments import RIDGE, KeyMoments, ValueMoments, key_matrix


class GroupReconstructor(nn.Module):
    """Maps the retained heads of one group to its discarded heads."""

    def __init__(self, layout: HeadLayout, group: list[int], head_dim: int, bias: bool = True):
        super().__init__()
        self.group, self.head_dim, self.use_bias = list(group), head_dim, bias
        f = head_dim // 2
        mk, mv = layout.input_mask("k", group), layout.input_mask("v", group)
        self.register_buffer("k_mask", mk.float(), persistent=False)
        self.register_buffer("v_mask", mv.float(), persistent=False)
        self.k_re = nn.Parameter(torch.zeros(*mk.shape, f))
        self.k_im = nn.Parameter(torch.zeros(*mk.shape, f))
        self.v_weight = nn.Parameter(torch.zeros(*mv.shape, head_dim, head_dim))  # [t, s, out, in]
        self.v_bias = nn.Parameter(torch.zeros(mv.shape[0], head_dim), requires_grad=bias)
        if layout.hybrid:
            n = len(group) * layout.num_kv_heads
            self.register_buffer("k_basis", torch.zeros(n * head_dim, layout.key_latent[layout.groups.index(list(group))]))
        else:
            self.k_basis = None

    def key_coefficients(self):
        return self.k_re * self.k_mask[..., None], self.k_im * self.k_mask[..., None]

    def value_weight(self):
        return self.v_weight * self.v_mask[..., None, None]

    def key_maps(self) -> torch.Tensor:
        """Dense real form [n_tgt, n_src, d_in, d_out] of the complex key coefficients."""
        return key_matrix(*self.key_coefficients())

    def value_maps(self) -> torch.Tensor:
        """[n_tgt, n_src, d_in, d_out]."""
        return self.value_weight().transpose(-1, -2)

    def keys(self, src: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, n_src, T, d] post-RoPE -> discarded keys [B, n_tgt, T, d] (or only ``rows``)."""
        maps = self.key_maps()
        return _apply(src, maps if rows is None else maps[rows])

    def values(self, src: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """src [B, n_src, T, d] -> discarded values [B, n_tgt, T, d] (or only ``rows``)."""
        maps, bias = self.value_maps(), self.v_bias
        if rows is not None:
            maps, bias = maps[rows], bias[rows]
        return _apply(src, maps) + bias.to(src.dtype)[None, :, None, :]

    def num_parameters(self) -> int:
        """Parameters that are really used (masked-out entries do not count)."""
        f, d = self.head_dim // 2, self.head_dim
        n = int(self.k_mask.sum()) * 2 * f + int(self.v_mask.sum()) * d * d
        n += 0 if self.k_basis is None else key_latent.stored_numel(self.k_basis, d)
        return n + (self.v_bias.numel() if self.use_bias else 0)


def _apply(src: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Every target head from every source head in one matrix product.

    src [B, n_src, T, d_in], maps [n_tgt, n_src, d_in, d_out] -> [B, n_tgt, T, d_out]
    """
    b, s, t, d = src.shape
    n_tgt, d_out = maps.shape[0], maps.shape[-1]
    x = src.permute(0, 2, 1, 3).reshape(b, t, s * d)
    w = maps.to(src.dtype).permute(1, 2, 0, 3).reshape(s * d, n_tgt * d_out)
    return (x @ w).view(b, t, n_tgt, d_out).permute(0, 2, 1, 3)


class Reconstructor(nn.Module):
    """All groups of a model; rebuilds the full K and V of a layer from the retained heads."""

    def __init__(self, layout: HeadLayout, head_dim: int, bias: bool = True):
        super().__init__()
        self.layout, self.head_dim = layout, head_dim
        self.groups = nn.ModuleList(GroupReconstructor(layout, g, head_dim, bias) for g in layout.groups)
        # per layer: (group index, target rows of this layer, target head ids) for k and v
        self._targets = {}
        for gi, group in enumerate(layout.groups):
            for layer in group:
                entry = {}
                for kind in ("k", "v"):
                    tgt = layout.targets(kind, group)
                    rows = [i for i, (lay, _) in enumerate(tgt) if lay == layer]
                    entry[kind] = (torch.tensor(rows, dtype=torch.long), [tgt[i][1] for i in rows])
                self._targets[layer] = (gi, entry)

    def place(self, devices: list[torch.device]) -> None:
        """Each group's maps on ``devices[group]`` (its group device on a model split across devices)."""
        for mod, dev in zip(self.groups, devices):
            mod.to(dev)

    def layer_targets(self, kind: str, layer: int) -> tuple[int, torch.Tensor, list[int]]:
        """``layer``'s discarded heads of ``kind``: (group index, their rows among the group's targets,
        their head ids)."""
        gi, entry = self._targets[layer]
        return (gi, *entry[kind])

    # -- stage 1: closed form --------------------------------------------------------------------
    @torch.no_grad()
    def fit_closed_form(self, moments: dict[str, list], ridge: float = RIDGE) -> None:
        """Ridge least squares from per-group moments (``moments[kind][g]``, heads layer-major)."""
        lay = self.layout
        for gi, (group, mod) in enumerate(zip(lay.groups, self.groups)):
            index = {x: i for i, x in enumerate(lay.group_heads(group))}
            if lay.hybrid:
                mod.k_basis.copy_(key_latent.fit_basis(moments["k"][gi], mod.k_basis.shape[1])[0])
            for kind in ("k", "v"):
                mom: KeyMoments | ValueMoments = moments[kind][gi]
                src = [index[x] for x in lay.sources(kind, group)]
                mask = lay.input_mask(kind, group)
                for t, head in enumerate(lay.targets(kind, group)):
                    cols = [j for j in range(len(src)) if mask[t, j]]
                    if kind == "k":
                        c = mom.solve([src[j] for j in cols], index[head], ridge)  # [F, |cols|]
                        for jj, j in enumerate(cols):
                            mod.k_re[t, j] = c[:, jj].real.float()
                            mod.k_im[t, j] = c[:, jj].imag.float()
                    else:
                        w, b = mom.solve([src[j] for j in cols], index[head], ridge)  # [d, |cols|*d]
                        for jj, j in enumerate(cols):
                            mod.v_weight[t, j] = w[:, jj * self.head_dim : (jj + 1) * self.head_dim].float()
                        if mod.use_bias:
                            mod.v_bias[t] = b.float()

    # -- inference ---------------------------------------------------------------------------------
    def group_sources(self, kind: str, group_idx: int, retained: dict[int, torch.Tensor]) -> torch.Tensor:
        """Concatenate the retained heads of a group's layers (layer-major = the sources order)."""
        group = self.layout.groups[group_idx]
        parts = [retained[layer] for layer in group if retained[layer].shape[1] > 0]
        return torch.cat(parts, dim=1)

    def rebuild(self, kind: str, layer: int, retained: dict[int, torch.Tensor]) -> torch.Tensor:
        """Full [B, H, T, d] keys or values of ``layer`` from the retained heads of its group.

        ``retained[l]`` is [B, n_kept(l), T, d] for every layer l of the group.
        """
        gi, rows, heads = self.layer_targets(kind, layer)
        own = retained[layer]
        b, _, t, d = own.shape
        full = own.new_empty(b, self.layout.num_kv_heads, t, d)
        full[:, self.layout.retained_in_layer(kind, layer)] = own
        if heads:
            src = self.group_sources(kind, gi, retained)
            mod = self.groups[gi]
            full[:, heads] = mod.keys(src, rows) if kind == "k" else mod.values(src, rows)
        return full

    # -- hybrid keys -----------------------------------------------------------------------------------
    def key_rows(self, layer: int) -> torch.Tensor:
        """Hybrid: the rows of the group's key basis that decode ``layer``'s heads [H*d, r]."""
        gi = self.layout.group_of(layer)
        j, width = self.layout.groups[gi].index(layer), self.layout.num_kv_heads * self.head_dim
        return self.groups[gi].k_basis[j * width : (j + 1) * width]

    def encode_keys(self, group_idx: int, keys: list[torch.Tensor]) -> torch.Tensor:
        """Hybrid: full keys [B, H, T, d] of the group's layers (in order) -> latent [B, 1, T, r]."""
        return key_latent.encode(torch.cat(keys, dim=1), self.groups[group_idx].k_basis)

    def decode_keys(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Hybrid: the group's latent [B, 1, T, r] -> ``layer``'s keys [B, H, T, d]."""
        return key_latent.decode(latent, self.key_rows(layer), self.head_dim)

    def num_parameters(self) -> int:
        return sum(g.num_parameters() for g in self.groups)

    def num_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        return self.num_parameters() * dtype.itemsize
