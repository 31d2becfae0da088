"""Does storing the mix network's decoders R (and encoders E) in bfloat16 cost accuracy? (issue #26, item 4)

    .venv/bin/python scripts/network_dtype.py runs/A0.875     # an artifact of `echokv train`; ~6 min here

Calibration text only, as scripts/mix_exact_tokens.py: two held-out 1024-token blocks, 768 compressed (explicit path),
the next 256 scored in chunks of 64; next-token KL against the full cache, with the artifact's float32 weights rounded
to bfloat16 in memory (R, then E and R).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from echokv.artifact import load
from echokv.attention import echokv_attention
from echokv.cache import FullCache
from echokv.codecs.mix import EchoKVCache
from echokv.config import CALIBRATION_TOKENS
from echokv.data import token_blocks
from echokv.generation import prefill
from echokv.models import cache_kwarg, load_model

torch.set_num_threads(2)
path = sys.argv[1]
model, tok = load_model(dtype="bfloat16")
skip = CALIBRATION_TOKENS // 1024
blocks = token_blocks(tok, "calibration", CALIBRATION_TOKENS + 4 * 1024, 1024)[skip: skip + 2]

def logits(cache, ids):
    with torch.no_grad(), echokv_attention(model):
        prefill(model, cache, ids[:, :768])
        return torch.cat([model(input_ids=ids[:, s: s + 64], use_cache=True, **cache_kwarg(model, cache))
                          .logits.float() for s in range(768, 1024, 64)], 1)

full = [logits(FullCache(model), blocks[i: i + 1]) for i in range(blocks.shape[0])]
for name, keys in (("float32", ()), ("R bf16", ("_R",)), ("E+R bf16", ("_R", "_E"))):
    net = load(path, model)
    with torch.no_grad():
        for n, p in net.params.items():
            if n.endswith(keys) and keys:
                p.data = p.data.bfloat16().float()
    for fast in (False,):
        kls = []
        for i, ref in enumerate(full):
            cache = EchoKVCache(model, net, mode="compressed", fast=fast)
            lg = logits(cache, blocks[i: i + 1])
            kls.append(torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                  reduction="none").sum(-1).mean().item())
        print(f"{name:10s} fast={fast!s:5s} KL {sum(kls) / len(kls):.5f} ({', '.join(f'{k:.5f}' for k in kls)})", flush=True)
