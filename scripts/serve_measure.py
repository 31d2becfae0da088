"""Measure echokv inside vLLM (docs/serving.md): KV cache size, greedy agreement, the quick suite's NIAH prompts
and throughput, full engine against compressed engine. Main environment; the servers come from .venv-serve.

    flock /work/scratch/locks/heavy .venv/bin/python scripts/serve_measure.py ARTIFACT MODEL_FOLDER OUT_FOLDER \
        [--samples 10] [--requests 32]
    # speed only, stock engine against the compressed one in one run (concurrency 1 / 8 / 32, and where the stock
    # engine's KV blocks are the limit): OUT_FOLDER/speed.json
    .venv/bin/python scripts/serve_measure.py --speed ARTIFACT MODEL_FOLDER OUT_FOLDER
    # a full engine offloading each prompt's K/V as EchoKV-Q codes and answering from them: OUT_FOLDER/offload.json
    .venv/bin/python scripts/serve_measure.py --offload CODEC MODEL_FOLDER OUT_FOLDER [--samples 4]

MODEL_FOLDER: python -m echokv.serving.export (float32). ARTIFACT: a mix artifact (echokv train) or an EchoKV-Q
codec (python -m echokv.serving.export OUT --echokv-q 0.5). Writes OUT_FOLDER/serve.json and the server logs.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import time
import urllib.error
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from echokv.serving.server import BLOCK_SIZE, Server
from echokv.serving.vllm import serve_args

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
           "Explain in one sentence what a cache is.", "Give me three tips for learning to cook.",
           "What does a compiler do?", "Describe a sunset in two sentences.", "Why is the sky blue?"]
MAX_TOKENS = 48
#: prefill chunk of both engines: echokv's own (generation.PREFILL_CHUNK), so later chunks read a compressed past
#: in both
CHUNK = 512


def chat_ids(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@torch.no_grad()
def greedy(model, ids, max_tokens, eos, artifact=None):
    """transformers' greedy answer; with ``artifact``, through echokv's own cache compressed from the first token
    (exact within one forward call, compressed afterwards: what the vLLM backend does)."""
    from transformers import DynamicCache

    from echokv.attention import echokv_attention
    from echokv.codecs.mix import EchoKVCache
    from echokv.generation import prefill

    cache = DynamicCache() if artifact is None else EchoKVCache(model, artifact, mode="compressed")
    out = []
    with echokv_attention(model):
        logits = prefill(model, cache, torch.tensor([ids]), chunk_size=CHUNK)
        for _ in range(max_tokens):
            nxt = int(logits[0].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            logits = prefill(model, cache, torch.tensor([[nxt]]), chunk_size=1)
    return out


def quick_samples(tokenizer, n):
    from echokv_lab.eval import runner

    job = runner.make_job("quick", "full", "0", samples=n, tasks="niah_single_2,niah_multikey_1")
    inputs = runner.build_inputs(job, None, tokenizer, progress=False)
    return [(s, inputs.prompt_ids[id(s)]) for _, group in inputs.cells for s in group]


def own_niah(model, tokenizer, samples, artifact, eos):
    """echokv's own answers (the eval runner's methods: full, and echokv with the artifact)."""
    from echokv_lab.eval.metrics import score
    from echokv_lab.methods.echokv import EchoKVMethod
    from echokv_lab.methods.full import FullMethod

    out = {}
    for name, method in (("full", FullMethod(0.0)), ("echokv", EchoKVMethod.create(0.5, [str(artifact)]))):
        method.prepare(model, tokenizer, None)
        rows = []
        for s, (ctx, q) in samples:
            new, _ = method.generate(model, list(ctx), list(q), s.max_new_tokens, eos)
            pred = tokenizer.decode(new, skip_special_tokens=True)
            rows.append({"task": s.task, "length": s.context_length, "prediction": pred, "score": score(s, pred)})
        out[name] = rows
    return out


def served_niah(srv, samples):
    from echokv_lab.eval.metrics import score

    rows = []
    for s, (ctx, q) in samples:
        pred = srv.complete(list(ctx) + list(q), s.max_new_tokens)["text"]
        rows.append({"task": s.task, "length": s.context_length, "prediction": pred, "score": score(s, pred)})
    return rows


def throughput(srv, tokenizer, n_requests, concurrency=8, prompt_tokens=256, new_tokens=64):
    """``n_requests`` distinct prompts of ``prompt_tokens`` tokens, ``new_tokens`` generated each (ignore_eos: the
    same work in both engines), ``concurrency`` in flight."""
    from echokv.data import load_text

    words = load_text("evaluation").split()
    per = 2 * prompt_tokens  # words per prompt (more than enough tokens), wrapping around the text
    prompts = []
    for i in range(n_requests):
        start = i * per % max(1, len(words) - per)
        ids = tokenizer(" ".join(words[start : start + per]), add_special_tokens=False)["input_ids"]
        assert len(ids) >= prompt_tokens, "the evaluation text is too short for these prompts"
        prompts.append(ids[:prompt_tokens])
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(lambda p: srv.complete(p, new_tokens, ignore_eos=True), prompts))
    wall = time.perf_counter() - t0
    generated = sum(len(d["token_ids"]) for d in done)
    return {"requests": n_requests, "concurrency": concurrency, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "seconds": round(wall, 2), "requests_per_s": round(n_requests / wall, 3),
            "generated_tokens_per_s": round(generated / wall, 2),
            "total_tokens_per_s": round((generated + n_requests * prompt_tokens) / wall, 2)}


def too_long(srv, max_model_len):
    """A prompt longer than the context: vLLM's error, then the server still answers."""
    try:
        srv.complete([100] * (max_model_len + 10), 4)
        error = None
    except urllib.error.HTTPError as exc:
        error = f"HTTP {exc.code}: {exc.read().decode()[:200]}"
    return {"error": error, "still_serving": bool(srv.complete("Hello", 4)["token_ids"])}


#: the KV-bound case: each engine gets the blocks that 1/KV_BOUND_SHARE of its 1 GiB holds (equal bytes), so the
#: stock engine holds 4 of these 32 requests at a time (2048-token prompts at the full 1 GiB were past the client's
#: timeout on a 2-core AVX2 CPU: vLLM's stock attention decoded 1.8-2.7 tokens/s there)
KV_BOUND = {"n_requests": 32, "concurrency": 32, "prompt_tokens": 512, "new_tokens": 64}
KV_BOUND_SHARE = 8


def speed(a) -> int:
    """Stock engine against the compressed one, the same requests in one run: KV blocks, throughput at
    concurrency 1 / 8 / 32 (both fit), and where the stock engine's KV blocks are the limit."""
    from echokv.models import load_model

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model("smollm2-135m", dtype="float32")
    result = {"artifact": a.artifact, "block_size": BLOCK_SIZE, "kv_cache_gib": 1, "dtype": "float32",
              "kv_bound_gib": 1 / KV_BOUND_SHARE}
    extra = ["--max-num-batched-tokens", str(CHUNK), "--no-enable-prefix-caching"]
    for mode in ("stock", "compressed"):
        args = extra + (serve_args(a.artifact) if mode == "compressed" else [])
        t1 = time.perf_counter()
        with Server(a.model_folder, out / f"speed-{mode}.log", args, max_num_seqs=32) as srv:
            cell = {"startup_seconds": round(time.perf_counter() - t1, 1), "kv_cache_tokens": srv.kv_cache_tokens()}
            cell["kv_cache_blocks"] = cell["kv_cache_tokens"] // BLOCK_SIZE
            for c in a.concurrency:
                cell[f"concurrency_{c}"] = throughput(srv, tokenizer, a.requests, concurrency=c)
                print(mode, c, cell[f"concurrency_{c}"], flush=True)
        if a.kv_bound:
            blocks = cell["kv_cache_blocks"] // KV_BOUND_SHARE
            with Server(a.model_folder, out / f"speed-{mode}-kv-bound.log",
                        args + ["--num-gpu-blocks-override", str(blocks)], max_num_seqs=32,
                        max_model_len=1024) as srv:
                cell["kv_bound"] = {"kv_cache_blocks": srv.kv_cache_tokens() // BLOCK_SIZE,
                                    **throughput(srv, tokenizer, **KV_BOUND)}
            print(mode, "kv-bound", cell["kv_bound"], flush=True)
        result[mode] = cell
        (out / "speed.partial.json").write_text(json.dumps(result, indent=2))  # a cell is not lost to a later one
    st, co = result["stock"], result["compressed"]
    result["compressed_vs_stock_blocks"] = round(co["kv_cache_blocks"] / st["kv_cache_blocks"], 3)
    for c in a.concurrency:
        result[f"compressed_vs_stock_throughput_c{c}"] = round(
            co[f"concurrency_{c}"]["requests_per_s"] / st[f"concurrency_{c}"]["requests_per_s"], 3)
    if 8 in a.concurrency:
        result["compressed_vs_stock_throughput"] = result["compressed_vs_stock_throughput_c8"]
    if a.kv_bound:
        result["compressed_vs_stock_throughput_kv_bound"] = round(
            co["kv_bound"]["requests_per_s"] / st["kv_bound"]["requests_per_s"], 3)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    (out / "speed.partial.json").unlink()
    print(json.dumps({k: v for k, v in result.items() if k.startswith("compressed_vs")}))
    return 0


@torch.no_grad()
def greedy_restored(model, codec, ids, stored, max_tokens, eos):
    """transformers' greedy answer when the prompt's first ``stored`` tokens' K/V went through the offload codes
    (what the offload connector restores), the rest of the prompt computed."""
    from transformers import DynamicCache

    from echokv.serving import offload as store

    past = model(torch.tensor([ids[:stored]]), use_cache=True).past_key_values
    cache = DynamicCache()
    for layer, kv in enumerate(past.layers):
        k, v = store.decode(codec, layer, store.encode(codec, layer, kv.keys[0].transpose(0, 1),
                                                       kv.values[0].transpose(0, 1)))
        cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], layer)
    logits = model(torch.tensor([ids[stored:]]), past_key_values=cache, use_cache=True).logits[:, -1]
    out = []
    while len(out) < max_tokens and int(logits[0].argmax()) not in eos:
        out.append(int(logits[0].argmax()))
        logits = model(torch.tensor([out[-1:]]), past_key_values=cache, use_cache=True).logits[:, -1]
    return out


def offload(a) -> int:
    """A full engine with the offload connector: each NIAH prompt answered twice, computed (its K/V stored as
    EchoKV-Q codes) and restored from the codes; bytes stored against 16-bit K/V, the answers against transformers'
    from the same codes, NIAH scores, seconds of each pass."""
    from echokv.codecs.headq import load, read_config
    from echokv.models import load_model
    from echokv_lab.eval.metrics import score

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    store.mkdir(exist_ok=False)  # a new store: every hit below was stored by this run
    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    codec, eos = load(a.artifact), {tokenizer.eos_token_id}
    samples = quick_samples(tokenizer, a.samples)
    config = {"kv_connector": "EchoKVOffloadConnector", "kv_connector_module_path": "echokv.serving.vllm.offload",
              "kv_role": "kv_both", "kv_connector_extra_config": {"shared_storage_path": str(store.resolve()),
                                                                  "echokv_codec": str(Path(a.artifact).resolve())}}
    args = ["--no-enable-prefix-caching", "--max-num-batched-tokens", "8192", "--kv-transfer-config",
            json.dumps(config)]
    rows, seconds = [], {"computed": 0.0, "restored": 0.0}
    with Server(a.model_folder, out / "offload.log", args) as srv:
        for s, (ctx, q) in samples:
            ids = list(ctx) + list(q)
            row = {"task": s.task, "length": s.context_length, "prompt_tokens": len(ids)}
            for name in seconds:
                t0 = time.perf_counter()
                got = srv.complete(ids, s.max_new_tokens)
                seconds[name] += time.perf_counter() - t0
                row[name] = got["token_ids"][:-1] if got["token_ids"][-1:] and got["token_ids"][-1] in eos \
                    else got["token_ids"]
                row[f"{name}_score"] = score(s, got["text"])
            rows.append(row)
    for row, (s, (ctx, q)) in zip(rows, samples):
        ids = list(ctx) + list(q)
        row["transformers_from_codes"] = greedy_restored(model, codec, ids, (len(ids) - 1) // BLOCK_SIZE * BLOCK_SIZE,
                                                         s.max_new_tokens, eos)
    n = len(rows)
    stored_bytes = sum((f / "kv.safetensors").stat().st_size for f in store.iterdir())
    stored_tokens = sum(json.loads((f / "kv.json").read_text())["tokens"] for f in store.iterdir())
    geo = model.config
    kv16 = stored_tokens * geo.num_hidden_layers * 2 * geo.num_key_value_heads * geo.head_dim * 2
    log = (out / "offload.log").read_text()
    result = {"codec": a.artifact, "compression_ratio": read_config(a.artifact)["compression_ratio"], "prompts": n,
              "stored_prompts": len(list(store.iterdir())), "restored": log.count("K/V restored from"),
              "stored_vs_16bit_bytes": round(stored_bytes / kv16, 4),
              "restored_same_as_transformers_from_codes": sum(r["restored"] == r["transformers_from_codes"]
                                                               for r in rows),
              "restored_same_as_computed": sum(r["restored"] == r["computed"] for r in rows),
              "niah_computed": 100 * sum(r["computed_score"] for r in rows) / n,
              "niah_restored": 100 * sum(r["restored_score"] for r in rows) / n,
              "seconds": {k: round(v, 2) for k, v in seconds.items()}, "rows": rows}
    (out / "offload.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return 0


def _parser(flag: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument(flag, action="store_true")
    for name in ("artifact", "model_folder", "out"):
        p.add_argument(name)
    return p


def main() -> int:
    if "--offload" in sys.argv:
        p = _parser("--offload")
        p.add_argument("--samples", type=int, default=4, help="NIAH samples per task and length")
        return offload(p.parse_args())
    if "--speed" in sys.argv:
        p = _parser("--speed")
        p.add_argument("--requests", type=int, default=32)
        p.add_argument("--concurrency", type=lambda x: [int(c) for c in x.split(",")], default=[1, 8, 32])
        p.add_argument("--no-kv-bound", dest="kv_bound", action="store_false",
                       help="skip the case where the stock engine's KV blocks are the limit (long prompts: slow)")
        return speed(p.parse_args())
    p = argparse.ArgumentParser()
    p.add_argument("artifact")
    p.add_argument("model_folder")
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=10, help="NIAH samples per task and length")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--cells", default="full-bfloat16,echokv-bfloat16,full-float32,echokv-float32",
                   help="which engines to start (MODE-DTYPE, comma-separated)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from echokv.models import load_model

    model, tokenizer = load_model("smollm2-135m", dtype="float32")
    eos = {tokenizer.eos_token_id}
    result = {"artifact": a.artifact, "block_size": BLOCK_SIZE, "kv_cache_gib": 1}
    t0 = time.perf_counter()

    # echokv's own side first (transformers, fp32), kept in OUT/own.json for a rerun with the same settings
    prompts = [chat_ids(tokenizer, t) for t in PROMPTS]
    samples = quick_samples(tokenizer, a.samples)
    own_file = out / "own.json"
    key = {"artifact": str(Path(a.artifact).resolve()), "samples": a.samples, "prompts": PROMPTS}
    saved = json.loads(own_file.read_text()) if own_file.is_file() else {}
    if saved.get("key") == key:
        hf, own = saved["hf"], saved["own"]
    else:
        hf = {"full": [greedy(model, ids, MAX_TOKENS, eos) for ids in prompts],
              "echokv": [greedy(model, ids, MAX_TOKENS, eos, a.artifact) for ids in prompts]}
        own = own_niah(model, tokenizer, samples, a.artifact, eos)
        own_file.write_text(json.dumps({"key": key, "hf": hf, "own": own, "seconds": time.perf_counter() - t0}))
    result["own_seconds"] = round(json.loads(own_file.read_text())["seconds"], 1)

    # no prefix caching: every prompt computed as echokv's own runs compute it (a shared opening block would
    # otherwise be read back from the rows of an earlier request)
    extra = ["--max-num-batched-tokens", str(CHUNK), "--no-enable-prefix-caching"]
    for dtype in ("bfloat16", "float32"):
        for mode in ("full", "echokv"):
            if f"{mode}-{dtype}" not in a.cells.split(","):
                continue
            args = extra + (serve_args(a.artifact) if mode == "echokv" else [])
            t1 = time.perf_counter()
            with Server(a.model_folder, out / f"{mode}-{dtype}.log", args, dtype=dtype) as srv:
                cell = {"startup_seconds": round(time.perf_counter() - t1, 1), "kv_cache_tokens": srv.kv_cache_tokens()}
                cell["kv_cache_blocks"] = cell["kv_cache_tokens"] // BLOCK_SIZE
                if dtype == "float32":
                    answers = [srv.complete(ids, MAX_TOKENS)["token_ids"] for ids in prompts]
                    answers = [x[:-1] if x and x[-1] in eos else x for x in answers]  # vLLM returns the stop token
                    cell["greedy_same_as_transformers"] = sum(x == y for x, y in zip(answers, hf[mode]))
                    cell["greedy_prompts"] = len(prompts)
                    cell["greedy_answers"] = [tokenizer.decode(x) for x in answers]
                    cell["transformers_answers"] = [tokenizer.decode(x) for x in hf[mode]]
                    rows = served_niah(srv, samples)
                    cell["niah_score"] = 100 * sum(r["score"] for r in rows) / len(rows)
                    cell["niah_own_score"] = 100 * sum(r["score"] for r in own[mode]) / len(own[mode])
                    cell["niah_same_prediction"] = sum(
                        x["prediction"].strip() == y["prediction"].strip() for x, y in zip(rows, own[mode]))
                    cell["niah_samples"] = len(rows)
                    cell["niah_rows"] = [{**r, "own": o["prediction"], "own_score": o["score"]}
                                         for r, o in zip(rows, own[mode])]
                    cell["throughput"] = throughput(srv, tokenizer, a.requests)
                    cell["too_long"] = too_long(srv, 4096)
                result[f"{mode}-{dtype}"] = cell
                print(mode, dtype, {k: v for k, v in cell.items() if not k.endswith(("rows", "answers"))}, flush=True)
    for dtype in ("bfloat16", "float32"):
        if f"echokv-{dtype}" in result and f"full-{dtype}" in result:
            result[f"kv_tokens_ratio_{dtype}"] = round(
                result[f"echokv-{dtype}"]["kv_cache_tokens"] / result[f"full-{dtype}"]["kv_cache_tokens"], 3)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    name = "serve.json" if len(a.cells.split(",")) == 4 else f"serve-{a.cells.replace(',', '+')}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("kv_tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
