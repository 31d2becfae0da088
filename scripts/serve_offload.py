"""Measure the offloading connector (echokv.serving.vllm.connector): a full engine stores each prompt's K/V as an
artifact's rows and rebuilds it when the prompt comes again. Main environment; the server from .venv-serve.

    flock /work/scratch/locks/heavy .venv/bin/python scripts/serve_offload.py ARTIFACT MODEL_FOLDER OUT_FOLDER

Each prompt is sent twice: the first answer is the full engine's own (its K/V stored on the way), the second is
computed from the stored rows (rebuilt K/V for the block-aligned prefix, then the rest of the prompt). Writes
OUT_FOLDER/offload.json: bytes stored against the full K/V of the same tokens, and both answers.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv.serving.server import Server

PROMPTS = ["Summarize the following text in one sentence.", "What is the main topic of the text above?",
           "Name two people or places mentioned in the text."]


@torch.no_grad()
def own_answer(model_folder, artifact, ids, stored, n, eos):
    """What the connector should answer, computed with transformers and KVSerde: the prompt's first ``stored``
    tokens' K/V through the artifact's bytes, the rest of the prompt and the answer computed on top (greedy)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from echokv.artifact import load
    from echokv.serving.rows import KVSerde

    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    x = torch.tensor([ids])
    past = model(x[:, :stored], use_cache=True).past_key_values
    serde = KVSerde(load(artifact, model), model)
    keys = torch.stack([layer.keys[0].transpose(0, 1) for layer in past.layers])
    values = torch.stack([layer.values[0].transpose(0, 1) for layer in past.layers])
    back_k, back_v = serde.decode(serde.encode(keys, values, torch.arange(stored)))
    cache = DynamicCache()
    for layer in range(back_k.shape[0]):
        cache.update(back_k[layer].transpose(0, 1)[None], back_v[layer].transpose(0, 1)[None], layer)
    logits = model(x[:, stored:], past_key_values=cache, use_cache=True).logits[:, -1]
    out = []
    while len(out) < n:
        out.append(int(logits[0].argmax()))
        if out[-1] == eos:
            break
        logits = model(torch.tensor([out[-1:]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def main() -> int:
    artifact, model_folder, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    store = out / "store"
    store.mkdir(parents=True, exist_ok=False)  # a new store: every hit below was stored by this run
    from transformers import AutoTokenizer

    from echokv.data import load_text
    from echokv.models import kv_geometry

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    words = load_text("evaluation").split()
    prompts = []
    for i, question in enumerate(PROMPTS):
        text = " ".join(words[i * 300 : i * 300 + 220]) + "\n\n" + question
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True, return_dict=False))
    config = {"kv_connector": "EchoKVStorageConnector", "kv_connector_module_path": "echokv.serving.vllm.connector",
              "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(store.resolve()),
                                            "echokv_artifact": str(Path(artifact).resolve())}}
    from transformers import AutoConfig

    geo = kv_geometry(AutoConfig.from_pretrained(model_folder), "float32")
    own = [own_answer(model_folder, artifact, ids, (len(ids) - 1) // 128 * 128, 32, tokenizer.eos_token_id)
           for ids in prompts]
    rows = []
    t0 = time.perf_counter()
    with Server(model_folder, out / "offload.log", ["--kv-transfer-config", json.dumps(config), "--no-enable-prefix-caching"]) as srv:
        for ids in prompts:
            before = set(store.iterdir())
            first = srv.complete(ids, 32)["token_ids"]
            written = [p for p in store.iterdir() if p not in before and not p.name.endswith(".partial")]
            second = srv.complete(ids, 32)["token_ids"]
            stored = sum(f.stat().st_size for p in written for f in p.iterdir())
            tokens = (len(ids) - 1) // 128 * 128  # what the connector stores: the block-aligned prefix
            rows.append({"prompt_tokens": len(ids), "stored_tokens": tokens, "stored_bytes": stored,
                         "full_bytes_float32": tokens * geo.kv_bytes_per_token,
                         "full_bytes_16bit": tokens * geo.kv_bytes_per_token // 2,
                         "same_answer": first == second, "first": tokenizer.decode(first),
                         "from_store": tokenizer.decode(second),
                         "from_store_as_echokv_rebuilds": second == own[len(rows)],
                         "echokv_own": tokenizer.decode(own[len(rows)])})
            print(rows[-1], flush=True)
    log = (out / "offload.log").read_text(errors="replace")
    result = {"artifact": artifact, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
              "external_hits_logged": len(re.findall("External Cache Hit", log)),
              "stored_over_full_16bit": round(sum(r["stored_bytes"] for r in rows)
                                              / max(sum(r["full_bytes_16bit"] for r in rows), 1), 4)}
    (out / "offload.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
