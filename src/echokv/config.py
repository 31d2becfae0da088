"""Every default in one place: training's configuration and each command's options.

Each field's ``metadata`` carries its help (and, where the command line needs them, its flag aliases, a value
check, choices): the command line (``cli/_args.py``) makes its flags from these dataclasses and builds them
back from the parsed flags, so a default is written once, here, and every field is reachable from the command
line. Measured tuning constants stay next to the code they tune, with their measurement notes
(:data:`HYBRID_KEY_SHARE` here; ``FAST_MAX_QUERIES`` in :mod:`echokv.cache.layers`, ``SPARE_ROOM`` in
:mod:`echokv.cache.store`, ``CAPTURE_BLOCK`` in :mod:`echokv.stats.collect`).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field

from .geometry import DTYPES
from .selection import INPUTS, check_ratio

#: the model every command loads unless told otherwise (an embedded GGUF, :mod:`echokv.models`)
DEFAULT_MODEL = "smollm2-135m"
#: stage-1 ridge, relative to the mean diagonal of the normal equations
RIDGE = 1e-3

#: EchoKV's variants, one network (:mod:`echokv.mixes`) with a choice of encoder per kind: ``mix`` (learned
#: components: mixes of a group's heads, each kept at the precision the byte budget gives it), ``heads`` (the
#: paper's form: discarded K and V heads rebuilt from retained ones) and ``hybrid`` (the paper's Hybrid: keys as
#: learned components, values rebuilt from retained heads). Keys are always rebuilt before RoPE.
VARIANTS = ("mix", "heads", "hybrid")
#: the retired RoPE-commuting key form (``--keys rope-commuting``): 4.0 retrieval at 0.5 on the quick suite
RETIRED_KEYS = "rope-commuting"
LAYOUTS = ("data", "paper")
CACHE_MODES = ("full", "compressed", "auto")
#: the evaluation suites (defined in the harness, :mod:`echokv_lab.eval.suites`)
SUITES = ("quick", "ruler", "longbench", "ppl", "long", "fidelity")

#: calibration text of training and of the evaluation's baselines: tokens, in sequences of this length
CALIBRATION_TOKENS = 8192
CALIBRATION_SEQ_LEN = 512

# Hybrid default: keys get this share of the kept K+V budget. SmolLM2-135M, ratio 0.5, NIAH at 512
# tokens (10 samples each): keys/values kept 0.4/0.6 found 3/10 needles, 0.5/0.5 7-9/10, 0.6/0.4 10/10,
# although the held-out output MSE ranks them the other way (0.117 < 0.133 < 0.187).
HYBRID_KEY_SHARE = 0.6


def option(default=MISSING, help: str = "", *, aliases: tuple[str, ...] = (), check: str | None = None,
           choices: tuple | None = None, one_of: str | None = None, role: str | None = None):
    """A dataclass field with its command-line description.

    ``aliases``: extra flags (``--steps`` for ``stage2_steps``); ``check``: a value check of the command line
    (``"ratio"``, ``"positive"``, ``"non_negative"``); ``one_of``: fields sharing this tag form a required
    group of which exactly one is given; ``role``: ``"input"`` (a path the command reads) or ``"output"`` (the
    folder it writes: never one of its inputs, nor holding one). A field without a default is a required flag.
    """
    meta = {"help": help, "aliases": aliases, "check": check, "choices": choices, "one_of": one_of, "role": role}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class ModelConfig:
    """Which model every command loads."""

    model: str = option(DEFAULT_MODEL, "embedded name, Hub id, folder or .gguf", role="input")
    dtype: str = option("bfloat16", "dtype the model and its KV cache run in (bfloat16: what users serve; "
                        "float32 for reference numbers)", choices=tuple(DTYPES))
    device: str = option("cpu", "torch device")
    device_map: str | None = option(None, "split the model across devices with accelerate: auto (or balanced, "
                                    "sequential; within --max-memory), or a JSON object or .json file of module -> "
                                    "device (GPU index, cpu, disk)", role="input")
    max_memory: str | None = option(None, "with --device-map auto: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    offload_folder: str | None = option(None, "empty or new folder for the weights a device map puts on disk "
                                        "(default: a temporary folder)")
    keep_groups_on_device: bool = option(False, "keep each group of layers (which share stored components) on one "
                                         "device: --device-map auto moves a split group whole, a given map that "
                                         "splits one is refused")


#: stage-2 learning rate. Stage 2 trains decoders on fixed components, which 1e-3 overshoots (SmolLM2 at ratio
#: 0.75, held-out output error: 0.0038 -> 0.0106 at 1e-3, 0.0031 -> 0.0027 at 1e-4)
STAGE2_LR = 1e-4


@dataclass(kw_only=True)
class TrainConfig:
    """How ``echokv train`` (:func:`echokv.training.train`) makes an artifact."""

    compression_ratio: float = option(0.5, "fraction of the KV cache removed", check="ratio")
    k_ratio: float | None = option(None, "compression ratio of keys (default: from --compression-ratio)",
                                   check="ratio")
    v_ratio: float | None = option(None, "compression ratio of values", check="ratio")
    layout: str = option("data", "data (measured best): greedy choice of retained heads from calibration; paper: "
                         "first layer of each group + first m heads (loses answers on SmolLM2 at 0.5)",
                         choices=LAYOUTS)
    variant: str = option("mix", "mix: per group of S layers, the principal components of pre-RoPE keys and of "
                          "values, each kept at 16 bits, int8 or int4 or dropped as the byte budget allows, rebuilt "
                          "by linear decoders. heads: the paper's form, retained heads rebuild the discarded ones "
                          "(loses retrieval on SmolLM2 at 0.5, measured). hybrid: keys as learned components, "
                          "values rebuilt from retained heads (keys get 60%% of the kept budget unless "
                          "--k-ratio/--v-ratio are given)", choices=VARIANTS)
    keys: str | None = option(None, "retired: keys are always rebuilt before RoPE (accepted as pre-rope for one "
                              "release; rope-commuting is refused)", choices=("pre-rope", RETIRED_KEYS))
    widths: str = option("auto", "precision of retained components: auto (mix: the byte budget gives each "
                         "component 16 bits, int8, int4 or drops it), or one of 16, 8, 4 for every retained "
                         "component (heads: default 16)")
    key_weight: float = option(1.0, "mix: weight of key errors against value errors when the budget is spent")
    quant_group: int = option(64, "components per float16 scale and zero-point of int8/int4 codes",
                              check="positive")
    group_size: int | None = option(None, "layers per group S (default: 4 for the data layout, searched for the "
                                    "paper layout)", aliases=("-S",), check="positive")
    m: int | None = option(None, "paper layout: heads kept in each non-first layer (default: searched)")
    inputs: str | None = option(None, "retired: every retained head of a group feeds each discarded one (accepted "
                                "as all for one release; the others are refused)", choices=INPUTS)
    calib_tokens: int = option(CALIBRATION_TOKENS, "calibration tokens", check="positive")
    seq_len: int = option(CALIBRATION_SEQ_LEN, "tokens per calibration sequence", check="positive")
    heldout_tokens: int = option(2048, "held-out tokens for the report", check="positive")
    stage2_sequences: int = option(16, "calibration sequences kept for stage 2 (mix/heads: also those the "
                                   "decoders are refitted on)", check="positive")
    stage2_steps: int = option(100, "stage-2 steps (0: stage 1 only)", aliases=("--steps",))
    stage2_lr: float | None = option(None, f"stage-2 learning rate (AdamW, cosine schedule; default {STAGE2_LR:g})",
                                     aliases=("--lr",))
    stage2_batch: int = option(2, "sequences per stage-2 step", check="positive")
    stage2_queries: int | None = option(128, "query positions scored per sequence in stage 2 (None, from "
                                        "Python: every position)", check="positive")
    stage2_eval_every: int = option(25, "mix/heads: steps between held-out checks of stage 2 (the best state is "
                                    "kept)", check="positive")
    ridge: float = option(RIDGE, "stage-1 ridge, relative to the mean diagonal of the normal equations")
    bias: bool = option(True, "retired: the decoders always add the group's mean (--no-bias is refused)")
    seed: int = option(0, "seed of stage 2")
    text_paths: list[str] | None = option(None, "your own text files/folders instead of the bundled text",
                                          aliases=("--text",), role="input")
    progress: bool = option(True, "progress bars")

    def record(self) -> dict:
        """The configuration as an artifact records it (``config.json``'s ``training``, JSON values)."""
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k != "progress"}))

    def ratios(self) -> tuple[float, float]:
        """Compression ratios of keys and values. The hybrid, unless told otherwise, gives keys
        :data:`HYBRID_KEY_SHARE` of the kept budget: retrieval follows key fidelity (measured)."""
        r = check_ratio(self.compression_ratio)
        if self.variant == "hybrid" and self.k_ratio is None and self.v_ratio is None:
            kept = 1.0 - r
            kept_k = min(1.0, 2 * HYBRID_KEY_SHARE * kept)
            return round(1.0 - kept_k, 9), round(1.0 - (2 * kept - kept_k), 9)
        # one kind given: the other gets the rest of the budget, so the cache is compressed by the ratio asked
        k = self.k_ratio if self.k_ratio is not None else r if self.v_ratio is None else round(2 * r - self.v_ratio, 9)
        v = self.v_ratio if self.v_ratio is not None else r if self.k_ratio is None else round(2 * r - self.k_ratio, 9)
        if (self.k_ratio is None) != (self.v_ratio is None) and not (0 <= k < 1 and 0 <= v < 1):
            raise ValueError(f"--k-ratio/--v-ratio with --compression-ratio {r:g} leave the other kind a ratio of "
                             f"{min(k, v) if min(k, v) < 0 else max(k, v):g}, outside [0, 1): pass both, or a nearer one")
        return check_ratio(k, "K ratio"), check_ratio(v, "V ratio")

    @property
    def learning_rate(self) -> float:
        """The stage-2 learning rate: ``stage2_lr``, or the default."""
        return STAGE2_LR if self.stage2_lr is None else self.stage2_lr


#: the variant ``echokv train`` makes, and so the one method ``echokv`` evaluates
DEFAULT_VARIANT = TrainConfig.variant


@dataclass(kw_only=True)
class TrainOutput:
    """Where ``echokv train`` writes its artifact."""

    out: str = option(help="artifact folder to create", role="output")
    overwrite: bool = option(False, "replace --out if it exists")


@dataclass(kw_only=True)
class InfoConfig(ModelConfig):
    json: bool = option(False, "one JSON object")


@dataclass(kw_only=True)
class GenerateConfig(ModelConfig):
    """``echokv generate``; the sampling defaults are also :func:`echokv.generation.generate`'s."""

    artifact: str | None = option(None, "trained artifact folder (compressed/auto need it or --echokv-q)",
                                  role="input")
    echokv_q: float | None = option(None, "EchoKV-Q, the fast codec (decodes as fast as full mode), at this "
                                    "compression ratio, e.g. 0.5; fitted on the calibration text at start "
                                    "(seconds). With --artifact and --memory-budget: the first tier, the artifact's "
                                    "mix the next when the budget is passed again", check="ratio")
    prompt: str | None = option(None, "the prompt", one_of="prompt")
    prompt_file: str | None = option(None, "a file holding the prompt", one_of="prompt", role="input")
    mode: str | None = option(None, "cache mode (default: auto with --switch-at or --memory-budget; else "
                              "compressed with --echokv-q alone, full otherwise)", choices=CACHE_MODES)
    switch_at: int | None = option(None, "auto mode: compress from this many tokens", check="positive")
    memory_budget: int | None = option(None, "auto mode: compress above this many bytes", check="positive")
    full_window: int = option(0, "keep the last W tokens uncompressed", check="non_negative")
    max_new_tokens: int = option(64, "tokens to generate", check="positive")
    chat: str = option("auto", "use the chat template", choices=("auto", "on", "off"))
    sample: bool = option(False, "sample instead of greedy decoding")
    temperature: float = option(0.7, "sampling temperature")
    top_p: float = option(0.9, "sampling nucleus")
    seed: int = option(0, "sampling seed")
    json: bool = option(False, "print one JSON object instead of streaming")


@dataclass(kw_only=True)
class AnalyzeConfig(ModelConfig):
    calib_tokens: int = option(4096, "calibration tokens", check="positive")
    seq_len: int = option(CALIBRATION_SEQ_LEN, "tokens per calibration sequence", check="positive")
    layers: str | None = option(None, "range of layers to compare, e.g. 0-7 (default: all)")
    text: list[str] | None = option(None, "your own text files/folders instead of the bundled text (with "
                                    "--artifact: one more text to measure on)", role="input")
    artifact: str | None = option(None, "a trained artifact (mix or pre-RoPE heads): instead of head similarity, "
                                  "where its rebuilt cache errs: per layer and head, across texts, by token position",
                                  role="input")
    out: str = option(help="output folder to create", role="output")
    overwrite: bool = option(False, "replace --out if it exists")


@dataclass(kw_only=True)
class EvalConfig(ModelConfig):
    """``echokv eval`` (the arguments of :func:`echokv_lab.eval.runner.make_job`)."""

    suite: str = option("quick", "evaluation suite", choices=SUITES)
    methods: str = option("full,echokv", "comma-separated list, or 'all'")
    compression_ratios: str = option(f"{TrainConfig.compression_ratio:g}", "comma-separated, e.g. 0.5,0.7")
    artifacts: list[str] | None = option(None, "echokv artifacts (matched by ratio and variant)", role="input")
    data: str | None = option(None, "LongBench folder of <task>.jsonl files", role="input")
    tasks: str | None = option(None, "comma-separated task names (default: the suite's)")
    context_lengths: str | None = option(None, "comma-separated token counts")
    samples: int | None = option(None, "samples per task and length", check="positive")
    seed: int = option(0, "seed of the RULER samples")
    split: str = option("test", "haystacks and needle phrasings: test (for reports) or dev (for choosing "
                        "defaults)", choices=("test", "dev"))
    text: list[str] | None = option(None, "your own text files/folders: one more haystack source", role="input")
    out: str = option("runs/eval", "output folder", role="output")
    overwrite: bool = option(False, "replace the results in --out if it exists")
    resume: bool = option(False, "keep the results already in --out and run only the missing cells")
    train_missing: bool = option(False, "train an EchoKV artifact on the fly (minutes) for a ratio no "
                                 "--artifacts folder has (otherwise that method is skipped with a message)")
    peers: str = option("auto", "kvpress presses from the main environment: auto (run them in the peers "
                        "environment, .venv-peers or $ECHOKV_PEERS_PYTHON), off", choices=("auto", "off"))
    inputs: str | None = option(None, "internal: the prompts file a parent echokv eval wrote (the peers run)",
                                role="input")


@dataclass(kw_only=True)
class BenchConfig(ModelConfig):
    artifact: str = option(help="trained artifact folder", role="input")
    contexts: str = option("512,2048,4096", "comma-separated context lengths ('none': only --kv-budget)")
    kv_budget: str | None = option(None, "comma-separated KV-cache budgets: bytes (190000000), sizes (190MB, "
                                   "1.5GiB) or full-mode sequences (4x); each variant decodes the largest batch that "
                                   "fits, and its throughput is compared with full mode's")
    budget_context: int = option(2048, "prompt length of the --kv-budget runs", check="positive")
    decode_tokens: int = option(32, "decode steps timed per round", check="positive")
    repeats: int = option(3, "rounds", check="positive")
    compare_dtype: str = option("float32", "also time transformers' default cache with the model in this dtype "
                                "against --dtype ('none': skip)", choices=(*DTYPES, "none"))
    codec_ratios: str = option("0.5,0.75", "compression ratios of the fast codec EchoKV-Q timed beside the artifact "
                               "(fitted on the calibration text first, seconds; with --kv-budget each keeps 1 - R of "
                               "the full cache at --budget-context + --decode-tokens tokens, its exact tokens "
                               "included; 'none': skip)")
    overwrite: bool = option(False, "replace the bench.json and figures of an earlier run in --out")
    kernel: str = option("auto", "the fast codec's attention kernel: auto (C++ on CPU, Triton on a GPU, else "
                         "PyTorch), or one forced (an error if it cannot run)", choices=("auto", "cpp", "triton", "torch"))
    out: str = option("runs/bench", "output folder", role="output")


@dataclass(kw_only=True)
class DemoConfig(ModelConfig):
    compression_ratio: float = option(TrainConfig.compression_ratio, "fraction of the KV cache removed",
                                      check="ratio")
    out: str = option("runs/demo", "output folder (the artifact is kept there for later runs)", role="output")
    steps: int = option(TrainConfig.stage2_steps, "stage-2 steps")
