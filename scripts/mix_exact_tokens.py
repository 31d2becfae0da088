"""Do exact sinks (the first 4 tokens) or an exact recent window help the cross-layer mix? (issue #26, item 1)

    .venv/bin/python scripts/mix_exact_tokens.py runs/A0.875      # an artifact of `echokv train`; ~10 min here

Calibration text only: four held-out 1024-token blocks (after the 8192 training tokens); the first 768 tokens
compressed (explicit path), the next 256 fed in chunks of 64; next-token KL against the full cache, and the kept
fraction. The sinks are an experiment, not a feature: this script patches the mix codec to store each layer's first 4
post-RoPE K/V exact beside their components (counted in the bytes) and to put them back when it decodes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv.cache import FullCache
from echokv.codecs.mix import EchoKVCache, MixCodec
from echokv.config import CALIBRATION_TOKENS
from echokv.data import token_blocks
from echokv.generation import prefill
from echokv.models import cache_kwarg, load_model

SINKS = 4
PATCH = {"sinks": False}
VARIANTS = {"mix": (False, 0), "mix+sinks": (True, 0), "mix+recent64": (False, 64), "mix+sinks+recent64": (True, 64)}
_encode, _decode = MixCodec.encode, MixCodec.decode


def encode(self, group, keys, values, positions=None):
    out = _encode(self, group, keys, values, positions)
    if PATCH["sinks"] and positions is not None and int(positions[0, 0]) == 0:  # the sequence's first block
        for j in range(len(self.groups[group])):
            out[f"sink.k.{j}"] = keys[j][..., :SINKS, :].clone()
            out[f"sink.v.{j}"] = values[j][..., :SINKS, :].clone()
    return out


def decode(self, layer, stored):
    k, v = _decode(self, layer, stored)
    j = self.groups[self.layout.group_of(layer)].index(layer)
    if f"sink.k.{j}" in stored:
        k, v = k.clone(), v.clone()
        k[..., :SINKS, :] = stored[f"sink.k.{j}"].to(k.dtype)
        v[..., :SINKS, :] = stored[f"sink.v.{j}"].to(v.dtype)
    return k, v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if not (args.artifact / "config.json").is_file():
        sys.exit(f"{args.artifact}: not an artifact folder (no config.json); make one with echokv train --out DIR")
    torch.set_num_threads(2)
    MixCodec.encode, MixCodec.decode = encode, decode
    model, tok = load_model(dtype="bfloat16")
    skip = CALIBRATION_TOKENS // 1024
    blocks = token_blocks(tok, "calibration", CALIBRATION_TOKENS + 4 * 1024, 1024)[skip: skip + 4]

    def logits(cache, ids):
        with torch.no_grad():
            prefill(model, cache, ids[:, :768])
            return torch.cat([model(input_ids=ids[:, s: s + 64], use_cache=True, **cache_kwarg(model, cache))
                              .logits.float() for s in range(768, 1024, 64)], 1)

    full = [logits(FullCache(model), blocks[i: i + 1]) for i in range(blocks.shape[0])]
    for name in args.variants:
        PATCH["sinks"], window = VARIANTS[name]
        kls, kept = [], []
        for i, ref in enumerate(full):
            cache = EchoKVCache(model, args.artifact, mode="compressed", fast=False, full_window=window)
            lg = logits(cache, blocks[i: i + 1])
            kl = torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)
            kls.append(kl.mean().item())
            kept.append(cache.kept_fraction())
        print(f"{name:20s} KL {sum(kls) / len(kls):.4f} (per block {', '.join(f'{k:.4f}' for k in kls)}), kept "
              f"{sum(kept) / len(kept):.4f}", flush=True)


if __name__ == "__main__":
    main()
