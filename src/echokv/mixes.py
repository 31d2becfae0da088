"""Retained components: per group of S layers, what the cache keeps of its K (pre-RoPE) and V, and how every head is
rebuilt from it.

EchoKV keeps a subset of a group's heads and rebuilds the rest with a small linear network. Both halves are one
affine pair per group and kind (K, V), over the group's heads stacked layer-major, ``x`` [D = S*H*d]:

    retained components   z = (x - m) E           E [D, r]
    rebuilt heads         x_hat = z R + c         R [r, D]

* ``heads`` (the paper's form): E selects the retained heads (whitened channel by channel), R copies them back and
  maps them onto the discarded heads (stage 1: ridge regression, stage 2: attention-output MSE).
* ``mix``: the components are learned mixes of all the group's heads: PCA (stage 1), the decoder refitted to the
  components as the cache stores them (quantized), then trained on the attention-output MSE (stage 2) with the
  encoder fixed (training both, at lr 1e-3 with a straight-through quantizer, raised the held-out output error of
  SmolLM2 at 0.75 from 0.0039 to 0.0135). Retained heads are the special case where E is a selection.

Keys are handled before RoPE: the cache's post-RoPE keys are rotated back at their positions, encoded, and the
rebuilt keys are rotated at the same positions (exact at any position, left padding included). A full linear map
on pre-RoPE keys rebuilds them far better than a map that must commute with RoPE (held-out relative error 0.036
against 0.20 on SmolLM2, issue #15), at the price of rebuilding past keys when attention reads them.

Each component is kept at a precision: 16 bits (as the cache's dtype), int8 or int4, with a float16 scale and
zero-point per token and group of :data:`QUANT_GROUP` components of one width, or not at all (the byte budget's
allocation, :func:`allocate`). Components are whitened (unit calibration variance), so a group mixes like scales.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
from torch import nn

from . import quantize as quant
from .quantize import FP16_MAX, unpack

#: precisions a component can be kept at (0: dropped). 2-bit codes were measured (SmolLM2, S=4, kept 0.125: mean
#: attention-output error 0.047 with them, 0.056 without) but are left out: the issue asks for int8/int4 storage.
WIDTHS = (0, 4, 8, 16)
#: components per scale/zero-point. Whitened components, per token (SmolLM2, S=4, kept 0.25, mean held-out
#: attention-output error): groups of 16: 0.0121, 32: 0.0079, 64: 0.0064; per component over 64-token blocks
#: (KIVI's key layout, needs a full-precision residual): 0.0093.
QUANT_GROUP = 64
KINDS = ("k", "v")


#: widths stored as floats (float16, float32) rather than integer codes
FLOAT_WIDTHS = (16, 32)


def cost_bits(width: int, group: int = QUANT_GROUP) -> float:
    """Bits per token one component costs at ``width`` (its share of a full group's scale and zero)."""
    if width == 0 or width in FLOAT_WIDTHS:
        return float(width)
    return width + 32.0 / group


def class_bits(c: int, width: int, group: int = QUANT_GROUP) -> int:
    """Stored bits per token of ``c`` components at ``width``, as :func:`quantize` stores them."""
    if width in FLOAT_WIDTHS:
        return width * c
    n, g = _layout(c, group)
    per = 8 // width
    return -(-(n * g) // per) * per * width + 32 * n


def _layout(c: int, group: int) -> tuple[int, int]:
    """(groups, size): ``c`` components in equal groups of at most ``group``."""
    n = -(-c // group)
    return n, -(-c // n)


def quantize(z: torch.Tensor, width: int, group: int = QUANT_GROUP) -> dict[str, torch.Tensor]:
    """Components [..., c] -> {"q": packed codes, "s": scale, "z": zero [..., groups] fp16} (per token)."""
    c = z.shape[-1]
    n, g = _layout(c, group)
    if n * g > c:  # pad with copies of the last component: no group's range changes
        z = torch.cat([z, z[..., -1:].expand(*z.shape[:-1], n * g - c)], -1)
    return quant.quantize(z, width, g)


def dequantize(st: dict[str, torch.Tensor], width: int, c: int, dtype=torch.float32,
               group: int = QUANT_GROUP) -> torch.Tensor:
    n, g = _layout(c, group)
    q = unpack(st["q"], width)[..., : n * g].to(dtype).unflatten(-1, (n, g))
    x = torch.addcmul(st["z"].to(dtype)[..., None], q, st["s"].to(dtype)[..., None])
    return x.flatten(-2)[..., :c]


def fake_quantize(z: torch.Tensor, width: int, group: int = QUANT_GROUP) -> torch.Tensor:
    """What the cache gives back for ``z`` at ``width``, with the gradient of the identity (straight-through)."""
    if width == 32:
        return z
    if width == 16:
        return z + (z.detach().clamp(-FP16_MAX, FP16_MAX).half().float() - z.detach())
    with torch.no_grad():
        zq = dequantize(quantize(z.detach(), width, group), width, z.shape[-1])
    return z + (zq - z).detach()


@dataclass
class Part:
    """The retained components of one group and kind. Parameters live in :class:`Mixes` (by ``name``)."""

    kind: str
    group: int
    layers: list[int]
    widths: list[int]  # per kept component, in storage order (32, 16, 8, then 4)
    selection: list[int] | None = None  # heads: the retained (layer-major) head indices of the group

    @property
    def rank(self) -> int:
        return len(self.widths)

    def classes(self) -> list[tuple[int, int, int]]:
        """(width, start, end) of each run of components stored at one width."""
        out, start = [], 0
        for w in (32, 16, 8, 4):
            n = sum(1 for x in self.widths if x == w)
            if n:
                out.append((w, start, start + n))
                start += n
        return out

    def bits_per_token(self, group: int = QUANT_GROUP) -> int:
        """Stored bits per token of this part (codes, scales and zero-points as stored)."""
        return sum(class_bits(e - s, w, group) for w, s, e in self.classes())

    def to_dict(self) -> dict:
        return {"kind": self.kind, "group": self.group, "layers": list(self.layers), "widths": list(self.widths),
                "selection": None if self.selection is None else list(self.selection)}


@dataclass
class MixLayout:
    """What a mixes artifact keeps: the groups, and per group and kind the components and their widths."""

    layers: list[int]
    num_kv_heads: int
    head_dim: int
    groups: list[list[int]]
    parts: list[Part]
    variant: str = "mix"
    quant_group: int = QUANT_GROUP
    keys: str = "pre-rope"
    element_bits: int = 16  # of the model's full cache (16: bf16/fp16, 32: float32)
    notes: dict = field(default_factory=dict)

    @property
    def group_dims(self) -> list[int]:
        return [len(g) * self.num_kv_heads * self.head_dim for g in self.groups]

    def part(self, group: int, kind: str) -> Part:
        return self.parts[2 * group + KINDS.index(kind)]

    def group_of(self, layer: int) -> int:
        for gi, g in enumerate(self.groups):
            if layer in g:
                return gi
        raise KeyError(layer)

    #: bits per token and group of the stored token positions (int32), which pre-RoPE keys need to be rotated
    POSITION_BITS = 32

    def bits(self, kind: str | None = None) -> int:
        """Stored bits per token (codes, scales, zero-points; positions counted with the keys)."""
        parts = [p for p in self.parts if kind is None or p.kind == kind]
        total = sum(p.bits_per_token(self.quant_group) for p in parts)
        if self.keys == "pre-rope" and kind in (None, "k"):
            total += self.POSITION_BITS * len(self.groups)
        return total

    def kept_fraction(self, kind: str | None = None) -> float:
        """Stored bits per token over the bits of the full cache of these layers (K and V, or ``kind``)."""
        full = sum(self.element_bits * dim for dim in self.group_dims) * (1 if kind else 2)
        return self.bits(kind) / max(full, 1)

    def width_counts(self) -> dict[int, int]:
        """How many components are kept at each width, and how many of the groups' dims are dropped (0)."""
        counts = {w: 0 for w in (*WIDTHS, 32)}
        for p in self.parts:
            for w in p.widths:
                counts[w] += 1
            counts[0] += self.group_dims[p.group] - p.rank
        return counts

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "groups": [list(g) for g in self.groups], "parts": [p.to_dict() for p in self.parts],
                "variant": self.variant, "quant_group": self.quant_group, "keys": self.keys,
                "element_bits": self.element_bits,
                "kept_fraction": self.kept_fraction(), "kept_fraction_k": self.kept_fraction("k"),
                "kept_fraction_v": self.kept_fraction("v"), "width_counts": self.width_counts(),
                "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> MixLayout:
        parts = [Part(p["kind"], p["group"], p["layers"], p["widths"], p.get("selection")) for p in d["parts"]]
        return cls(d["layers"], d["num_kv_heads"], d["head_dim"], d["groups"], parts, d.get("variant", "mix"),
                   d.get("quant_group", QUANT_GROUP), d.get("keys", "pre-rope"), d.get("element_bits", 16),
                   d.get("notes", {}))


class Mixes(nn.Module):
    """The encoders and decoders of every group and kind (see the module docstring).

    Part ``i`` holds ``m`` [D] (encoder offset), ``E`` [D, r] and ``R`` [r, D] (unit-scale axes: orthonormal for
    PCA, one-hot for retained heads), ``c`` [D] (decoder offset) and the fixed ``scale`` [r] that whitens the
    components: ``z = ((x - m) E) / scale``, ``x_hat = (z * scale) R + c``. Stage 2 trains R and c (``heads``
    parts: only the columns that rebuild discarded heads).
    """

    def __init__(self, layout: MixLayout):
        super().__init__()
        self.layout = layout
        self.params = nn.ParameterDict()
        for i, p in enumerate(layout.parts):
            dim = layout.group_dims[p.group]
            self.params[f"p{i}_m"] = nn.Parameter(torch.zeros(dim))
            self.params[f"p{i}_E"] = nn.Parameter(torch.zeros(dim, p.rank))
            self.params[f"p{i}_R"] = nn.Parameter(torch.zeros(p.rank, dim))
            self.params[f"p{i}_c"] = nn.Parameter(torch.zeros(dim))
            self.register_buffer(f"p{i}_scale", torch.ones(p.rank))
        width = layout.num_kv_heads * layout.head_dim
        self.rows = {layer: slice(j * width, (j + 1) * width) for g in layout.groups for j, layer in enumerate(g)}

    def tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        """(m, E, R, c, scale) of part ``i``."""
        pr = self.params
        return pr[f"p{i}_m"], pr[f"p{i}_E"], pr[f"p{i}_R"], pr[f"p{i}_c"], getattr(self, f"p{i}_scale")

    def set_part(self, i: int, m, e, r, c, scale) -> None:
        with torch.no_grad():
            for t, v in zip(self.tensors(i), (m, e, r, c, scale)):
                t.copy_(v)

    def index(self, group: int, kind: str) -> int:
        return 2 * group + KINDS.index(kind)

    def place(self, devices: list[torch.device]) -> None:
        """Each group's parts on ``devices[group]`` (its group device on a model split across devices)."""
        for i, part in enumerate(self.layout.parts):
            dev = devices[part.group]
            for key in ("m", "E", "R", "c"):
                self.params[f"p{i}_{key}"].data = self.params[f"p{i}_{key}"].data.to(dev)
            setattr(self, f"p{i}_scale", getattr(self, f"p{i}_scale").to(dev))

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Group features [..., D] -> whitened components [..., r] (not yet quantized)."""
        m, e, _, _, scale = self.tensors(i)
        return ((x - m.to(x.dtype)) @ e.to(x.dtype)) / scale.to(x.dtype)

    def decoder(self, i: int, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(R with the scale folded in [r, D or H*d], c) of part ``i`` (one layer's columns with ``layer``)."""
        _, _, r, c, scale = self.tensors(i)
        r = r * scale[:, None]
        if layer is not None:
            rows = self.rows[layer]
            r, c = r[:, rows], c[rows]
        return r, c

    def decode(self, i: int, z: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Components [..., r] -> the group's features [..., D] (or one layer's [..., H*d])."""
        r, c = self.decoder(i, layer)
        return torch.addmm(c.to(z.dtype), z.flatten(0, -2), r.to(z.dtype)).unflatten(0, z.shape[:-1])

    def fake_quantize(self, i: int, z: torch.Tensor) -> torch.Tensor:
        """Components as the cache will give them back (straight-through gradient)."""
        pieces = [fake_quantize(z[..., s:e], w, self.layout.quant_group) for w, s, e in self.layout.parts[i].classes()]
        return torch.cat(pieces, -1) if pieces else z

    def num_parameters(self) -> int:
        """Numbers an artifact stores (m, E, R, c and the scales of every part)."""
        return sum(p.numel() for p in self.params.values()) + sum(b.numel() for b in self.buffers())

    def num_bytes(self) -> int:
        return sum(t.numel() * self.stored_dtype(n).itemsize for n, t in self.state_dict().items())

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype an artifact stores a parameter in: bfloat16 for the decoders R of a 16-bit cache (SmolLM2-135M,
        bf16, 0.875, calibration text: next-token KL 0.02570 with R in float32, 0.02567 in bfloat16, 0.02604 with
        the encoders E too), else float32 (a float32 model's exact decoders stay exact)."""
        return torch.bfloat16 if name.endswith("_R") and self.layout.element_bits == 16 else torch.float32

    @torch.no_grad()
    def round_to_stored(self) -> None:
        """Round the parameters to the dtypes an artifact stores, so the network in memory is the one saved."""
        for n, p in self.params.items():
            p.copy_(p.to(self.stored_dtype(n)))

    def trainable(self) -> list[nn.Parameter]:
        """What stage 2 trains: the decoders (R, c; for ``heads`` parts masked to the discarded heads by
        :meth:`mask_gradients`). Encoders stay as stage 1 made them, so the stored components are fixed and
        stage 2 learns to rebuild the heads from exactly what the cache holds."""
        return [t for i in range(len(self.layout.parts)) for t in self.tensors(i)[2:4]]

    def mask_gradients(self) -> None:
        """Heads parts: the retained heads are copied back as they are; only the discarded heads' maps train."""
        for i, part in enumerate(self.layout.parts):
            if part.selection is None:
                continue
            _, _, r, c, _ = self.tensors(i)
            keep = self.discarded_columns(i).to(r.device)
            if r.grad is not None:
                r.grad[:, ~keep] = 0
            if c.grad is not None:
                c.grad[~keep] = 0

    def discarded_columns(self, i: int) -> torch.Tensor:
        """Bool [D]: the columns of part ``i`` that no retained head covers."""
        part, d = self.layout.parts[i], self.layout.head_dim
        cols = torch.ones(self.layout.group_dims[part.group], dtype=torch.bool)
        for h in part.selection or []:
            cols[h * d : (h + 1) * d] = False
        return cols


# -- stage 1 -------------------------------------------------------------------------------------------------------
def pca_pair(moments):
    """PCA of a group's features as a pair: (m, E [D, D], R [D, D], c, scale [D]), components by decreasing
    variance; ``scale`` is each component's standard deviation on the calibration text."""
    evals, evecs, mu, _ = moments.pca(center=True)
    scale = evals.clamp_min(float(evals.max()) * 1e-12 + 1e-30).sqrt()
    return mu.float(), evecs.float(), evecs.T.float().contiguous(), mu.float(), scale.float()


def heads_pair(moments, retained: list[int], head_dim: int, ridge: float):
    """The paper's form as a pair: E selects the retained heads (``retained``: head indices of the group,
    layer-major), R copies them back and maps them onto the other heads by ridge regression on the calibration
    moments (a linear map with bias per discarded head). Channels are centred and scaled by their deviation."""
    mu = (moments.total / max(moments.count, 1)).float()
    cov = moments.cov
    dim = mu.numel()
    cols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in retained]) if retained else \
        torch.zeros(0, dtype=torch.long)
    enc = torch.zeros(dim, len(cols))
    enc[cols, torch.arange(len(cols))] = 1.0
    dec = enc.T.clone()
    others = [h for h in range(dim // head_dim) if h not in retained]
    if others and len(cols):
        tcols = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in others])
        a = cov[cols[:, None], cols]
        a = a + ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cols), dtype=a.dtype)
        dec[:, tcols] = torch.linalg.solve(a, cov[cols[:, None], tcols]).float()  # on centred features
    scale = cov.diagonal()[cols].clamp_min(1e-12).sqrt().float()
    return mu, enc, dec, mu.clone(), scale


# -- the byte budget ---------------------------------------------------------------------------------------------
def component_errors(z: torch.Tensor, widths=WIDTHS, group: int = QUANT_GROUP) -> torch.Tensor:
    """Mean squared error of every component of calibration samples ``z`` [N, r] (whitened) at each width, in
    units of its own variance: [r, len(widths)] (width 0: the component dropped)."""
    out = []
    for w in widths:
        if w == 0:
            out.append(z.pow(2).mean(0))
        elif w == 32:
            out.append(torch.zeros_like(z[0]))
        elif w == 16:
            out.append((z.clamp(-FP16_MAX, FP16_MAX).half().float() - z).pow(2).mean(0))
        else:
            out.append((dequantize(quantize(z, w, group), w, z.shape[-1]) - z).pow(2).mean(0))
    return torch.stack(out, 1)


def allocate(errors: list[torch.Tensor], budget_bits: float, widths=WIDTHS,
             group: int = QUANT_GROUP) -> tuple[list[list[int]], float]:
    """Widths of every component under one byte budget: greedily, the step (a component to a larger width) that
    removes the most weighted error per bit, until the budget is spent.

    ``errors[i]`` [r_i, len(widths)]: the error of part i's components at each width, already weighted by what
    an error of that part costs. Returns the widths and the bits spent per token.
    """
    state = [torch.zeros(e.shape[0], dtype=torch.long) for e in errors]
    heap: list = []

    def push(pi: int, c: int) -> None:
        j = int(state[pi][c])
        best = None
        for jj in range(j + 1, len(widths)):
            cost = cost_bits(widths[jj], group) - cost_bits(widths[j], group)
            gain = float(errors[pi][c, j] - errors[pi][c, jj])
            if best is None or gain / cost > best[0]:
                best = (gain / cost, jj, cost)
        if best is not None and best[0] > 0:
            heapq.heappush(heap, (-best[0], pi, c, j, best[1], best[2]))

    for pi, e in enumerate(errors):
        for c in range(e.shape[0]):
            push(pi, c)
    spent = 0.0
    while heap:
        _, pi, c, j, jj, cost = heapq.heappop(heap)
        if int(state[pi][c]) != j or spent + cost > budget_bits + 1e-9:
            continue
        state[pi][c] = jj
        spent += cost
        push(pi, c)
    return [[widths[int(j)] for j in s] for s in state], spent
