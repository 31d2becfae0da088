"""EchoKV-Q, the fast codec: per layer and KV head, post-RoPE K and V in a data-driven basis, each basis channel kept
at 16, 8, 4 or 2 bits or dropped under one byte budget allocated over the whole model, read in place by a fused kernel
(:mod:`echokv.kernels`).

Per (layer, kind, head): a mean ``m`` and a basis (PCA of calibration V, channels by falling variance, scaled to
unit variance: ``z = (x - m) U diag(1/s)``, read back as ``x = z diag(s) U^T + m``; for K the same in the metric of
the head's queries, ``A A = E[q q^T]``: ``z = (k - m) A U diag(1/s)``, ``k = z diag(s) U^T A^-1 + m``, so that the
error the allocation counts is the scores' and a direction the queries read is kept even where keys vary little;
plain PCA dropped such directions). Per (layer, kind), the classes: the first ``n16`` channels as float16, the next
``n8`` as int8 codes, the next ``n4`` as int4, the next ``n2`` as int2, the rest dropped; a quantized class of values
has one float16 scale and zero per token and head, one of keys a scale and zero per channel and block of 64 tokens
(KIVI's layout: measured on SmolLM2 at 0.75, every key channel at int4, next-token KL 0.0144 per token, 0.0049 per
channel);
:mod:`echokv.kernels.reference` is the stored layout.

Reading (decode steps): keys fold into the query, ``q.k = (q U).z + q.m``, so the kernel scores with ``q U`` on the
codes and ``q.m`` is added to the stored part's log-sum-exp; values come out as ``(sum_t p_t z_t) U^T + m``. No
positions are stored and no RoPE runs at read time: a decode step costs what attention costs (2 Hq d MACs per token
and layer), where the cross-layer mix rebuilds every past key (r H d MACs, ~117x at 0.5: ``shared/design/fast.md``).

New tokens are stored in blocks of :data:`TOKEN_BLOCK` (:attr:`token_block`; the cache keeps the rest exact, at most
``TOKEN_BLOCK - 1`` recent tokens, counted in its bytes): encoding a token costs about as much per layer as a decode
step's attention, so it runs once per block.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import kernels
from ..cache.codec import KVCodec
from ..cache.store import spare_room
from ..kernels.reference import BLOCK, WIDTHS, quantize_channels, quantize_class
from ..kernels.reference import dequantize as dequantize_classes

KINDS = ("k", "v")
#: tokens encoded together (the cache flushes whole blocks; KIVI's residual): a block's keys share their scales
TOKEN_BLOCK = BLOCK
#: the first token slots of a sequence kept exact beside their codes (attention sinks: StreamingLLM, KVTC)
SINK_TOKENS = 4
#: the class widths the allocator may use, in the order classes are stored (falling variance): float16, int8, int4,
#: int2. Measured on SmolLM2 (fidelity suite, next-token KL): 2-bit classes take 0.75 from 0.0162 to 0.0116 and 0.875
#: from 0.58 to 0.285 (keys, where the allocator had dropped channels, keep them at 2 bits)
CLASS_WIDTHS = WIDTHS
#: the class sizes the allocator tries per (layer, kind): float16 channels, then the others in steps of 8
N16 = (0, 8)
STEP = 8
#: calibration tokens per (layer, head) the allocation measures its errors on
ERROR_SAMPLES = 1024


def token_bytes(widths, kind: str = "v") -> float:
    """Stored bytes per token and head of the classes ``widths`` of ``kind``: codes, plus a float16 scale and zero per
    quantized class and token (values) or per channel and block of :data:`TOKEN_BLOCK` tokens (keys)."""
    if kind == "k":
        return sum(n * w / 8 + (4 * n / TOKEN_BLOCK if w < 16 else 0) for w, n in widths)
    return sum(n * w // 8 + (4 if w < 16 and n else 0) for w, n in widths)


class HeadQuantCodec(KVCodec):
    """Per-head coded K/V (the module docstring). ``params``: per layer, ``{"k_mean" [H, d], "k_encode" [H, d, d]
    (``U diag(1/s)``), "k_basis" [H, d, d] (``U diag(s)``: channels back to the head), "v_mean", "v_encode",
    "v_basis"}`` (float32); ``widths``: per layer, ``{"k": ((16, n16), (8, n8), (4, n4), (2, n2)), "v": ...}``."""

    token_block = TOKEN_BLOCK
    #: the first token slots kept exact (:data:`SINK_TOKENS`): :meth:`encode` is told where a block starts
    sink_tokens = SINK_TOKENS
    needs_start = True

    def __init__(self, params: dict[int, dict[str, torch.Tensor]], widths: dict[int, dict[str, tuple]],
                 dtype: torch.dtype, kernel: str = "auto"):
        self.params, self.widths, self.dtype = params, widths, dtype
        self.kernel = kernel
        self.groups = [[layer] for layer in sorted(params)]
        self._reads: dict = {}  # (layer, device) -> the basis columns the read path uses
        self._sinks: tuple = (None, None)  # ((batch, stored length, sinks, device), the codes' mask)
        # self._steps (the kernel setter): layer -> (a stored tensor, (batch, device), the one-call step's arguments)
        self._leads: dict = {}  # layer -> the name of a stored tensor that grows with the store

    # -- storing ---------------------------------------------------------------------------------------------
    def encode(self, group, keys, values, start: int = 0):
        layer = self.groups[group][0]
        out = {}
        n_sink = min(self.sink_tokens - start, keys[0].shape[-2]) if start < self.sink_tokens else 0
        if n_sink > 0:  # kept exact too (their codes are masked out when read): only in the first block's tensors
            out["sink.k"], out["sink.v"] = keys[0][..., :n_sink, :].clone(), values[0][..., :n_sink, :].clone()
        cpp = self._path_on(keys[0].device) == "cpp"
        for kind, x in (("k", keys[0]), ("v", values[0])):
            p = self.params[layer]
            m, u = p[f"{kind}_mean"].to(x.device), p[f"{kind}_encode"].to(x.device)
            z = torch.einsum("bhtd,hde->bhte", x.float() - m[None, :, None], u)
            s = 0
            for width, n in self.widths[layer][kind]:
                if not n:
                    continue
                part = z[..., s : s + n]
                if width == 16:
                    out[f"{kind}16"] = part.clamp(-65504, 65504).to(torch.float16)
                elif kind == "k":  # a block's sinks do not widen its scales (their exact copies are read)
                    out.update({kind + name: t for name, t in
                                kernels.quantize(part, width, True, skip=n_sink, cpp=cpp).items()})
                else:  # scales and zeros [B, H, T, 1]: the store grows every tensor along dim -2
                    out.update({kind + name: t if name == str(width) else t[..., None]
                                for name, t in kernels.quantize(part, width, False, cpp=cpp).items()})
                s += n
        return out

    def _classes(self, stored: dict, kind: str) -> dict:
        """One kind's stored tensors under the kernel's names (``"16"``, ``"8"``, ``"8.s"``, ...)."""
        return {name[1:]: t[..., 0] if name.endswith((".s", ".z")) and kind == "v" else t
                for name, t in stored.items() if name[0] == kind}

    @property
    def kernel(self) -> str:
        """The kernel asked for (:mod:`echokv.kernels`): auto, cpp, triton or torch."""
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        self._kernel, self._paths, self._steps = value, {}, {}

    def _path_on(self, device: torch.device) -> str:
        """:meth:`kernel_path`, once per device (a codec's groups may be stored on several)."""
        path = self._paths.get(device)
        if path is None:
            path = self._paths[device] = self.kernel_path(device)
        return path

    def kernel_path(self, device) -> str:
        """The kernel that reads this codec's classes on ``device`` (:func:`echokv.kernels.path`): cpp, triton or
        torch."""
        return kernels.path(self.kernel, device, [c for w in self.widths.values() for kind in KINDS for c in w[kind]])

    def _prepared(self, layer: int, stored: dict) -> tuple:
        """The kernel's arguments for ``layer``'s stored tensors (a decode step's are kept by :meth:`_one_call`)."""
        w = self.widths[layer]
        return kernels.prepared(self._classes(stored, "k"), self._classes(stored, "v"), w["k"], w["v"])

    def _kept(self, layer: int, kind: str) -> int:
        return sum(n for _, n in self.widths[layer][kind])

    def _read(self, layer: int, device) -> tuple:
        """The read path's constants: key basis columns [H, d, n_k], key mean [H, d], value basis rows [H, n_v, d],
        value mean [H, d] (one copy per device)."""
        key = (layer, device)
        if key not in self._reads:
            p = self.params[layer]
            nk, nv = self._kept(layer, "k"), self._kept(layer, "v")
            self._reads[key] = tuple(t.to(device).contiguous() for t in (
                p["k_basis"][..., :nk], p["k_mean"], p["v_basis"][..., :nv].transpose(1, 2), p["v_mean"]))
        return self._reads[key]

    # -- reading ---------------------------------------------------------------------------------------------
    def decode(self, layer, stored):
        p = self.params[layer]
        out = []
        sinks = [stored.get("sink.k"), stored.get("sink.v")]
        for kind in KINDS:
            z = dequantize_classes(self._classes(stored, kind), self.widths[layer][kind])
            n = z.shape[-1]
            u = p[f"{kind}_basis"].to(z.device)[..., :n]
            x = torch.einsum("bhtn,hdn->bhtd", z, u) + p[f"{kind}_mean"].to(z.device)[None, :, None]
            x = x.to(self.dtype)
            sink = sinks[len(out)]
            if sink is not None:
                x[..., : sink.shape[-2], :] = sink.to(x.device, x.dtype)
            out.append(x)
        return out[0], out[1]

    def fast_attention(self, layer, stored):
        stored = dict(stored)  # the tensors as they are now: the cache may append to its store before the call
        return lambda q, k, v, mask, scaling: self._attend(layer, stored, q, k, v, mask, scaling)

    def _one_call(self, layer: int, stored: dict, b: int, device) -> tuple | None:
        """The one-call decode step's arguments besides the query, the recent tokens and padding (None off the C++
        path), rebuilt only when the store grows: gathered at every step, they cost a step half again as much Python
        per layer as full mode's."""
        lead = self._leads.get(layer) or self._leads.setdefault(layer, next(n for n in stored if n[:4] != "sink"))
        first, memo = stored[lead], self._steps.get(layer)
        if memo is None or memo[0] is not first or memo[1] != (b, device):
            step = None
            if self._path_on(device) == "cpp":
                sink_k = stored.get("sink.k")  # the sinks' codes are not read: their exact copies are
                codes = None if sink_k is None else self._sink_mask(b, first.shape[-2], sink_k.shape[-2], device)
                step = (self._read(layer, device), self._prepared(layer, stored), codes, sink_k, stored.get("sink.v"))
            memo = self._steps[layer] = (first, (b, device), step)
        return memo[2]

    def _attend(self, layer, stored, q, recent_k, recent_v, mask, scaling):
        b, hq, tq, d = q.shape
        h = recent_k.shape[1]
        rows = hq // h * tq
        step = self._one_call(layer, stored, b, q.device) if tq == 1 else None
        past_mask = None if step is None else step[2]
        if mask is not None or step is None:
            tc = next(t for n, t in stored.items() if not n.startswith("sink")).shape[-2]
            sink_k, sink_v = stored.get("sink.k"), stored.get("sink.v")
            ns = 0 if sink_k is None else sink_k.shape[-2]
            if mask is not None:
                seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
                past_mask = seen[:, 0, -1, :tc]  # stored tokens are in every query's past: one row says who pads
                past_mask = None if bool(past_mask.all()) else past_mask
            if ns:  # the sinks' codes are not read: their exact copies are
                codes = self._sink_mask(b, tc, ns, q.device)
                past_mask = codes if past_mask is None else past_mask & codes
                if mask is not None:  # the mask's columns in the order of the exact tokens: sinks, then the recent
                    mask = torch.cat([mask[..., :tc], mask[..., :ns], mask[..., tc:]], dim=-1)
        if step is not None and (mask is None or mask.dtype == torch.bool):
            # one call: the query folded into the bases, the stored tokens, the exact ones (sinks, then recent) and
            # the value basis, merged in C++ (a decode step's few PyTorch calls per layer cost as much as its reads)
            (ku, k_mean, vu, v_mean), args, _, sink_k, sink_v = step
            res = kernels.attend_step(q.reshape(b, h, rows, d), scaling, ku, k_mean, args, past_mask, sink_k, sink_v,
                                      recent_k, recent_v, None if mask is None else mask[:, 0, -1, tc:], vu, v_mean)
            return res.reshape(b, hq, tq, d).transpose(1, 2)
        ku, km, vu, vm = self._read(layer, q.device)
        path = self._path_on(q.device)
        qs = q.reshape(b, h, rows, d).float() * scaling
        if ns:
            recent_k, recent_v = torch.cat([sink_k, recent_k], dim=-2), torch.cat([sink_v, recent_v], dim=-2)
        # the stored tokens: the query in the key basis, scores on the codes, the weighted sum in the value basis
        if path == "cpp":
            out, lse = kernels.attend_prepared(qs @ ku, self._prepared(layer, stored), past_mask)
        else:
            out, lse = kernels.attend(qs @ ku, self._classes(stored, "k"), self._classes(stored, "v"),
                                      self.widths[layer]["k"], self.widths[layer]["v"], past_mask, kernel=path)
        # merged with the recent (exact) tokens: the stored part is one more score, its log-sum-exp (plus the key
        # mean's score, the same for every stored token), whose value is its weighted sum
        recent = qs @ recent_k.transpose(-1, -2).float()  # [B, H, rows, Tr]
        if mask is not None or tq > 1:
            tr = recent.shape[-1]
            shaped = recent.view(b, h, rows // tq, tq, tr)
            if mask is None:
                keep = torch.ones(tq, tr, dtype=torch.bool, device=q.device).tril(tr - tq)
                shaped.masked_fill_(~keep, float("-inf"))
            elif mask.dtype == torch.bool:
                shaped.masked_fill_(~mask[:, :, None, :, tc:], float("-inf"))
            else:
                shaped.add_(mask[:, :, None, :, tc:].float())
        p = torch.softmax(torch.cat([(qs @ km[..., None]).add_(lse[..., None]), recent], dim=-1), dim=-1)
        res = (out @ vu).add_(vm[:, None]).mul_(p[..., :1]).add_(p[..., 1:] @ recent_v.float())
        return res.to(q.dtype).reshape(b, hq, tq, d).transpose(1, 2).contiguous()

    def _sink_mask(self, b: int, tc: int, ns: int, device) -> torch.Tensor:
        """[B, Tc] bool: every stored token but the first ``ns`` (one tensor per length, shared by the layers)."""
        key = (b, tc, ns, device)
        if self._sinks[0] != key:
            keep = torch.ones(b, tc, dtype=torch.bool, device=device)
            keep[:, :ns] = False
            self._sinks = (key, keep)
        return self._sinks[1]

    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.params.values() for t in p.values())


# -- files (what a serving engine loads: the bases and the allocation, fitted in the main environment) -----------
#: the two files of a saved codec
CODEC_JSON, CODEC_WEIGHTS = "echokv-q.json", "echokv-q.safetensors"


def save(codec: HeadQuantCodec, out, model, compression_ratio: float):
    """Write ``codec`` (fitted on ``model``) to the new folder ``out``: bases as safetensors, the allocation, the
    model's geometry and K/V fingerprints and the weights' sha256 as JSON. Returns ``out``."""
    from ..artifact import fingerprints, sha256_file
    from ..models import kv_geometry
    from ..util import atomic_dir

    with atomic_dir(out, flag=None) as tmp:
        tensors = {f"{layer}.{name}": t.contiguous() for layer, p in codec.params.items() for name, t in p.items()}
        save_file(tensors, str(tmp / CODEC_WEIGHTS))
        config = {"format": "echokv-q", "version": 1, "compression_ratio": compression_ratio,
                  "dtype": str(codec.dtype).removeprefix("torch."),
                  "widths": {str(layer): {k: [list(c) for c in w[k]] for k in KINDS} for layer, w in codec.widths.items()},
                  "model": {"name": getattr(model.config, "_name_or_path", ""),
                            "geometry": kv_geometry(model).to_dict(), **fingerprints(model)},
                  "sha256": sha256_file(tmp / CODEC_WEIGHTS)}
        (tmp / CODEC_JSON).write_text(json.dumps(config, indent=1))
    return out


def read_config(path) -> dict | None:
    """A saved codec's JSON (None where ``path`` holds none)."""
    file = Path(path).expanduser() / CODEC_JSON
    return json.loads(file.read_text()) if file.is_file() else None


def load(path, kernel: str = "auto") -> HeadQuantCodec:
    """The codec :func:`save` wrote (its weights' checksum checked; ValueError, one line, on any mismatch)."""
    from ..artifact import sha256_file

    folder = Path(path).expanduser()
    config = read_config(folder)
    if config is None or config.get("format") != "echokv-q":
        raise ValueError(f"{folder} holds no EchoKV-Q codec ({CODEC_JSON}): write one with python -m "
                         "echokv.serving.export --echokv-q RATIO")
    if sha256_file(folder / CODEC_WEIGHTS) != config["sha256"]:
        raise ValueError(f"{folder / CODEC_WEIGHTS} does not match the checksum in {CODEC_JSON}: the file was "
                         "changed or cut short; write the codec again")
    params: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in load_file(str(folder / CODEC_WEIGHTS)).items():
        layer, key = name.split(".", 1)
        params.setdefault(int(layer), {})[key] = t
    widths = {int(layer): {k: tuple(tuple(c) for c in w[k]) for k in KINDS} for layer, w in config["widths"].items()}
    if set(widths) != set(params):
        raise ValueError(f"{folder}: the allocation and the bases name different layers; write the codec again")
    return HeadQuantCodec(params, widths, getattr(torch, config["dtype"]), kernel=kernel)


# -- fitting ---------------------------------------------------------------------------------------------------------
def _candidates(d: int, widths=CLASS_WIDTHS) -> list[tuple]:
    """Every layout the allocator weighs for a head of ``d`` channels: per width of ``widths`` (in falling order) a
    class of a multiple of :data:`STEP` channels (16 bit: :data:`N16`), at least one channel kept."""
    sizes = [N16 if w == 16 else range(0, d + 1, STEP) for w in widths]
    out = []

    def grow(i, left, acc):
        if i == len(widths):
            if any(n for _, n in acc):  # the reading path needs stored tensors of each kind
                out.append(tuple(acc))
            return
        for n in sizes[i]:
            if n <= left:
                grow(i + 1, left - n, acc + [(widths[i], n)])

    grow(0, d, [])
    return out


def _error(z: torch.Tensor, widths, scale: torch.Tensor, kind: str = "v", memo: dict | None = None) -> float:
    """Squared error, in the head's space, of storing ``z`` [H, N, d] (unit-variance channels; ``scale`` [H, d]: their
    standard deviations; keys: N in whole blocks of consecutive tokens) with the classes ``widths``. ``memo``: the
    errors of classes already measured on the same ``z``, by (width, first channel, channels)."""
    w2 = scale.pow(2)[:, None]
    s, err = 0, 0.0
    for width, n in widths:
        if not n:
            continue
        e = None if memo is None else memo.get((width, s, n))
        if e is None:
            part = z[..., s : s + n]
            if width == 16:
                back = part.to(torch.float16).float()
            else:
                quantize = quantize_channels if kind == "k" else quantize_class
                back = dequantize_classes(quantize(part, width), ((width, n),))
            e = float(((back - part).pow(2) * w2[..., s : s + n]).sum())
            if memo is not None:
                memo[(width, s, n)] = e
        err += e
        s += n
    return err + float((z[..., s:].pow(2) * w2[..., s:]).sum())


def exact_tokens(context: int) -> int:
    """The tokens a cache of ``context`` tokens holds exact beside its codes: the recent ones short of a block,
    and the copies of the sinks."""
    return context % TOKEN_BLOCK + min(SINK_TOKENS, context)


def allocate(errors: dict, budget: float) -> dict:
    """``errors``: (layer, kind) -> [(widths, bytes, error)]. The widths of each (layer, kind) that minimise the
    summed error with the summed bytes at most ``budget``: the Lagrangian ``error + lam * bytes`` per (layer, kind),
    ``lam`` the smallest whose choice fits (the bytes only fall as ``lam`` grows)."""
    def choose(lam):
        return {key: min(opts, key=lambda o: o[2] + lam * o[1]) for key, opts in errors.items()}

    def used(choice):
        return sum(o[1] for o in choice.values())

    lo, hi = 0.0, 1.0
    while used(choose(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            raise ValueError(f"no allocation fits {budget:.0f} bytes per token")
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(choose(mid)) <= budget else (mid, hi)
    return {key: o[0] for key, o in choose(hi).items()}


def _offsets(model, blocks: torch.Tensor) -> torch.Tensor:
    """Where each calibration block is placed: at a random position over the model's context. Post-RoPE keys and
    queries rotate with position, so a basis fitted at positions 0..T alone misses how they spread at the positions
    the cache holds (SmolLM2 at 0.75, 512-token blocks, KL on a held-out 4096-token sequence: 0.955 at 0..T, 0.012
    spread; on 1024 tokens 0.031 and 0.018)."""
    n, t = blocks.shape
    top = max(0, int(getattr(model.config, "max_position_embeddings", t) or t) - t)
    return torch.randint(0, top + 1, (n,), generator=torch.Generator().manual_seed(0))


def _samples(n: int, seq_len: int) -> torch.Tensor:
    """About :data:`ERROR_SAMPLES` of ``n`` calibration tokens (sequences of ``seq_len`` laid end to end), in whole
    windows of :data:`TOKEN_BLOCK` consecutive tokens inside one sequence (a block's keys share their scales)."""
    if seq_len < TOKEN_BLOCK:  # sequences shorter than a block: the first tokens
        return torch.arange(min(n, ERROR_SAMPLES))
    starts = torch.arange(0, seq_len - TOKEN_BLOCK + 1, TOKEN_BLOCK)
    starts = (torch.arange(0, n - seq_len + 1, seq_len)[:, None] + starts[None, :]).flatten()
    starts = starts[:: max(1, len(starts) * TOKEN_BLOCK // ERROR_SAMPLES)]
    return (starts[:, None] + torch.arange(TOKEN_BLOCK)[None, :]).flatten()


def _query_metric(q2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = W^(1/2)`` and ``A^-1`` [H, d, d] of the queries' second moment ``W`` [H, d, d], regularised (a direction
    no calibration query reads still counts a little)."""
    w = q2 + torch.eye(q2.shape[-1]) * (q2.diagonal(dim1=-2, dim2=-1).mean(-1) * 1e-3 + 1e-12)[:, None, None]
    lam, vec = torch.linalg.eigh(w)
    root = lam.clamp_min(1e-12).sqrt()
    return vec @ torch.diag_embed(root) @ vec.transpose(1, 2), vec @ torch.diag_embed(1 / root) @ vec.transpose(1, 2)


@torch.no_grad()
def fit_calibrated(model, tokenizer, compression_ratio: float, **kwargs) -> HeadQuantCodec:
    """:func:`fit` on echokv's calibration text (the split train uses; seconds on a small model)."""
    from ..config import CALIBRATION_SEQ_LEN, CALIBRATION_TOKENS
    from ..data import token_blocks
    from ..placement import input_device

    blocks = token_blocks(tokenizer, "calibration", CALIBRATION_TOKENS, CALIBRATION_SEQ_LEN)
    return fit(model, blocks.to(input_device(model)), compression_ratio, **kwargs)


def fit(model, blocks: torch.Tensor, compression_ratio: float, kernel: str = "auto",
        progress: bool = False, widths: tuple = CLASS_WIDTHS, context: int | None = None,
        element_bytes: int | None = None) -> HeadQuantCodec:
    """Fit the bases and the allocation on calibration ``blocks`` [N, T] (token ids) for a cache keeping
    ``1 - compression_ratio`` of the full cache's bytes (stored codes, scales and zero points), with classes of
    ``widths`` (a subset of :data:`CLASS_WIDTHS`). ``context``: the number of tokens at which the whole cache,
    its exact tokens included (the sinks' copies and the recent tokens short of a block, :func:`exact_tokens`) and
    the room its buffers reserve to grow into (:func:`~echokv.cache.store.spare_room`), holds at most that share of
    the full cache's stored bytes; None: the coded tokens alone keep it (the rest comes on top). ``element_bytes``:
    of the full cache whose bytes the ratio counts (None: the model's dtype; 2: a 16-bit cache, for a model run in
    float32)."""
    from ..attention import serves
    from ..models import kv_geometry
    from ..stats.capture import capture

    if not serves(model):
        raise ValueError("EchoKV-Q cannot serve this model: its attention soft-caps the logits, which the fused "
                         "kernel does not apply; use the mix (echokv) or a quantizer (quant, kivi)")
    if not 0 < compression_ratio < 1:
        raise ValueError(f"compression_ratio must be between 0 and 1 (the fraction of the cache removed), got "
                         f"{compression_ratio!r}")
    if not widths or set(widths) - set(CLASS_WIDTHS):
        raise ValueError(f"widths must be some of {CLASS_WIDTHS}, got {widths!r}")
    kept = 1 - compression_ratio
    if context is not None:
        if isinstance(context, bool) or not isinstance(context, int) or context < TOKEN_BLOCK:
            raise ValueError(f"context must be a whole number of tokens, at least one block ({TOKEN_BLOCK}), got "
                             f"{context!r}")
        exact, coded = exact_tokens(context), context - context % TOKEN_BLOCK
        kept = (kept * context - exact) / (coded + spare_room(coded))  # the coded tokens' share
        if kept <= 0:
            raise ValueError(f"at {context} tokens the exact ones ({exact}) alone take more than "
                             f"{1 - compression_ratio:g} of the cache: pass a longer context or a smaller ratio")
    geo = kv_geometry(model)
    layers = list(geo.full_attention_layers)
    samples: dict[tuple[int, str], list[torch.Tensor]] = {(layer, kind): [] for layer in layers for kind in KINDS}
    queries: dict[int, torch.Tensor] = {}  # layer -> [H, d, d]: second moment of the queries each KV head serves

    def on_layer(layer, module, q, k, v):
        for kind, x in (("k", k), ("v", v)):
            samples[(layer, kind)].append(x.float().transpose(0, 1).flatten(1, 2).cpu())  # [H, B*T, d]
        h = k.shape[1]
        qh = q.float().cpu().unflatten(1, (h, -1)).transpose(0, 1).flatten(1, 3)  # [H, B*rep*T, d]
        queries[layer] = queries.get(layer, 0) + qh.transpose(1, 2) @ qh / qh.shape[1]

    capture(model, blocks, on_layer, layers=layers, progress=progress, desc="EchoKV-Q calibration",
            offsets=_offsets(model, blocks))
    params: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    errors: dict = {}
    cands = _candidates(geo.head_dim, tuple(w for w in CLASS_WIDTHS if w in widths))
    for (layer, kind), xs in samples.items():
        x = torch.cat(xs, dim=1)  # [H, N, d]
        m = x.mean(1)
        c = x - m[:, None]
        # keys are measured by the error of the scores they give: ||dk A||^2 with A A = E[q q^T] (the queries of
        # the head), so a direction the queries read is kept even where the keys vary little; values by their own
        a, a_inv = _query_metric(queries[layer]) if kind == "k" else (None, None)
        ct = c @ a if a is not None else c
        var, vec = torch.linalg.eigh(ct.transpose(1, 2) @ ct / ct.shape[1])
        u = vec.flip(-1)  # channels by falling variance
        # channels scaled to unit variance, so that one scale per token serves all of a class. Measured on SmolLM2
        # (next-token KL, fidelity text): at 0.5 / 0.75 with the allocation, 0.0025 / 0.157 scaled, 0.0027 / 0.208
        # unscaled; but with every channel at int4, 0.115 scaled against 0.023 unscaled and 0.022 without a basis:
        # scaling magnifies rare tokens (attention sinks) in the channels calibration saw vary little
        std = var.flip(-1).clamp_min(0).sqrt()
        std = torch.maximum(std, std[:, :1] * 1e-4 + 1e-12)  # a channel of no variance is dropped, not divided by 0
        enc, dec = u / std[:, None], u * std[:, None]
        if a is not None:
            enc, dec = a @ enc, a_inv @ dec
        params[layer].update({f"{kind}_mean": m, f"{kind}_encode": enc.contiguous(), f"{kind}_basis": dec.contiguous()})
        picked = _samples(c.shape[1], blocks.shape[1])
        z = c[:, picked] @ params[layer][f"{kind}_encode"]
        energy = float(ct[:, picked].pow(2).sum()) or 1.0
        memo: dict = {}  # a class's error depends on its width and channels only: measured once
        errors[(layer, kind)] = [(w, token_bytes(w, kind), _error(z, w, std, kind, memo) / energy) for w in cands]
    full = 2 * geo.head_dim * (element_bytes or geo.bytes_per_element)  # K and V bytes per token and head
    chosen = allocate(errors, kept * full / 2 * len(errors))
    widths = {layer: {kind: chosen[(layer, kind)] for kind in KINDS} for layer in layers}
    return HeadQuantCodec(params, widths, next(model.parameters()).dtype, kernel=kernel)
