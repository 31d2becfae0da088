"""Evaluation suites of ``echokv eval``: which tasks, at which lengths, with how many samples.

A :class:`Suite` is a default; :func:`resolve` applies the command line's overrides (``--tasks``,
``--context-lengths``, ``--samples``) and validates the names, before any model is loaded, into a
:class:`ResolvedSuite`. :func:`ResolvedSuite.check_model` then checks the lengths against the model's context.

Suites
------

``quick`` (the default): a smoke test of a method on a *small* model with 2 CPU cores, sized so
that ``full`` + ``echokv`` at one compression ratio finish in at most 10 minutes with SmolLM2-135M-
Instruct (30 layers, 3 KV heads), and so that a 10-point difference between methods is not noise.

* Tasks: ``niah_single_2`` (a 7-digit number hidden in real prose, the evaluation split's text) and
  ``niah_multikey_1`` (the same with three distractor needles under other keys), at 512 and 1024
  tokens, needles at depths 0, 25, 50, 75 and 100 %. Full-cache scores of SmolLM2-135M measured per
  RULER task (seed 0, 5 samples per task and length, 512 / 1024 tokens, RULER's generation lengths):
  niah_single_1 100/100, niah_single_2 100/100, niah_single_3 80/0, niah_multikey_1 60/60,
  niah_multivalue 95/95, niah_multiquery 70/70, vt 52/36, fwe 53/47 (cwe cannot be made shorter than
  ~690 tokens and answers with ~120 tokens). The two chosen tasks are clearly above chance (0 for a
  guessed 7-digit number, ~25 % for returning a random needle of multikey) and test retrieval, what a
  lossy KV cache breaks first: niah_single_2 sits at the ceiling (any loss shows), niah_multikey_1 at
  ~80 % (key discrimination, with room both ways). Left out: niah_single_1 duplicates niah_single_2 on
  an artificial haystack; niah_single_3 collapses at 1024; multivalue, multiquery, vt, fwe and cwe
  answer with 30-120 tokens (3-10x the decoding time) for partial-credit scores.
* Samples: 25 per task and length, each length with its own needles (:func:`length_seed`), i.e.
  n = 100 independent samples per method. A method's mean is a proportion of (mostly 0/1) outcomes,
  so its binomial standard error is ``sqrt(p (1 - p) / n) <= sqrt(0.25 / 100) = 5`` points; methods
  answer the *same* samples, so a 10-point gap is two standard errors or more, not noise.
* Generation is capped at :data:`QUICK_MAX_NEW_TOKENS` = 12 new tokens (RULER allows 128): the answer
  is the 7-digit number right after the answer prefix (" 4780374." is 9 SmolLM2 tokens), and a
  broken cache that never stops would otherwise spend most of the time on text that cannot change
  ``string_match_all``.
* Perplexity: 4 sequences x 1024 tokens of the evaluation split, streamed in chunks of 128 tokens
  through each method's cache (every chunk attends to the compressed past).

Time, measured on 2 otherwise idle cores (``echokv eval --suite quick --methods full,echokv
--compression-ratios 0.5``): ``full`` 1.2 s per sample at 512 tokens and 2.2 s at 1024, ``echokv`` 1.8
and 3.0 s (decoding rebuilds the discarded heads), perplexity 2-3 s per sequence: 176 s + 249 s, and
7.5 minutes in all with the model load. Processes sharing the cores slow 2-thread PyTorch down far
more than their share (a run beside other jobs took 59 minutes).

``ruler``: all RULER tasks (:data:`echokv_lab.eval.ruler.RULER_TASKS`) at 1024, 2048 and 4096 tokens
(lengths beyond the model's context, minus the generation budget, are dropped), 20 samples per task
and length (:data:`RULER_SAMPLES`), RULER's own generation lengths.

``longbench``: the 16 English LongBench tasks from the ``--data`` folder (``--samples``: the first n
samples of each task, default all), prompts longer than the model's context cut in the middle as
LongBench does.

``long``: the quick suite's tasks at the lengths where the embedded model's full cache stops coping
(:data:`LONG_LENGTHS`: the first two lengths past the full cache's short-context level; measured, README),
10 samples per task and length.

``fidelity``: error propagation, every method against the full cache on the same held-out text
(:mod:`echokv_lab.eval.fidelity`): per-layer attention-output error, last-layer hidden-state error and the KL
divergence of next-token distributions, 2 sequences x 1024 tokens in chunks of 128 (``--samples``,
``--context-lengths`` change them).

``ppl``: perplexity of the evaluation split, 8 sequences x 1024 tokens (``--samples`` sequences,
``--context-lengths`` tokens each), chunks of 128 tokens through each method's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from echokv.config import SUITES
from echokv.util import parse_csv
from echokv_lab.eval.longbench import LONGBENCH_TASKS
from echokv_lab.eval.ruler import NIAH_TASKS, RULER_TASKS

#: the task name of a perplexity measurement (allowed in ``--tasks`` of the quick and ppl suites)
PERPLEXITY = "perplexity"


QUICK_TASKS = ("niah_single_2", "niah_multikey_1")
QUICK_LENGTHS = (512, 1024)
QUICK_SAMPLES = 25
QUICK_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUICK_MAX_NEW_TOKENS = 12
QUICK_PPL_SEQUENCES = 4

RULER_LENGTHS = (1024, 2048, 4096)
RULER_SAMPLES = 20
RULER_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

PPL_SEQUENCES = 8
PPL_SEQ_LEN = 1024
PPL_CHUNK = 128

#: the ``long`` suite: where the full cache of the embedded SmolLM2-135M stops coping. Measured on the test split
#: (bf16, 10 samples per task and length; README, "How long a context the model can use"): both quick tasks
#: 75 / 70 / 55 / 60 / 40 % at 512 / 1024 / 2048 / 4096 / 8000 tokens (niah_single_2 80 / 80 / 70 / 70 / 40):
#: the first two lengths past its short-context level
LONG_TASKS = QUICK_TASKS
LONG_LENGTHS = (2048, 4096)
LONG_SAMPLES = 10

#: the ``fidelity`` suite: held-out sequences streamed in chunks, every method against the full cache
FIDELITY_SEQUENCES = 2
FIDELITY_SEQ_LEN = 1024
FIDELITY = "fidelity"

#: tokens kept free for the chat template and special tokens when LongBench prompts are cut
LONGBENCH_MARGIN = 64


@dataclass(frozen=True)
class PerplexitySpec:
    """Perplexity on the evaluation split: ``sequences`` x ``seq_len`` tokens, ``chunk`` tokens per step."""

    sequences: int = PPL_SEQUENCES
    seq_len: int = PPL_SEQ_LEN
    chunk: int = PPL_CHUNK


@dataclass(frozen=True)
class Suite:
    """Defaults of one suite; ``source`` is ``ruler``, ``longbench`` or ``ppl``."""

    name: str
    source: str
    tasks: tuple[str, ...] = ()
    context_lengths: tuple[int, ...] = ()
    samples: int | None = None
    depths: tuple[float, ...] | None = None
    max_new_tokens: int | None = None  # cap on each sample's own generation length
    perplexity: PerplexitySpec | None = None
    clip_lengths: bool = False  # drop default lengths the model cannot hold (explicit ones raise)
    fidelity: PerplexitySpec | None = None  # the fidelity suite's sequences (source "fidelity")


SUITE_DEFS: dict[str, Suite] = {
    "quick": Suite(
        "quick", "ruler", QUICK_TASKS, QUICK_LENGTHS, QUICK_SAMPLES, QUICK_DEPTHS, QUICK_MAX_NEW_TOKENS,
        PerplexitySpec(QUICK_PPL_SEQUENCES, PPL_SEQ_LEN, PPL_CHUNK),
    ),
    "ruler": Suite("ruler", "ruler", tuple(RULER_TASKS), RULER_LENGTHS, RULER_SAMPLES, RULER_DEPTHS,
                   clip_lengths=True),
    "longbench": Suite("longbench", "longbench", tuple(LONGBENCH_TASKS)),
    "ppl": Suite("ppl", "ppl", (PERPLEXITY,), perplexity=PerplexitySpec()),
    "long": Suite("long", "ruler", LONG_TASKS, LONG_LENGTHS, LONG_SAMPLES, QUICK_DEPTHS, QUICK_MAX_NEW_TOKENS),
    "fidelity": Suite("fidelity", "fidelity", (FIDELITY,),
                      fidelity=PerplexitySpec(FIDELITY_SEQUENCES, FIDELITY_SEQ_LEN, PPL_CHUNK)),
}


@dataclass
class ResolvedSuite:
    """What one evaluation runs: the suite's defaults (``defaults``) with the user's overrides applied.

    ``tasks`` are RULER or LongBench task names (the perplexity part is ``perplexity``, not in
    ``tasks``); ``context_lengths`` are RULER prompt lengths (LongBench: at most one, the prompt
    cap); ``samples`` per task and length (LongBench: first n per task, None = all).
    """

    defaults: Suite
    tasks: list[str]
    context_lengths: list[int]
    samples: int | None
    depths: tuple[float, ...] | None
    max_new_tokens: int | None
    perplexity: PerplexitySpec | None
    explicit_lengths: bool = False
    notes: list[str] = field(default_factory=list)
    fidelity: PerplexitySpec | None = None

    @property
    def name(self) -> str:
        return self.defaults.name

    @property
    def source(self) -> str:
        return self.defaults.source

    def generation_budget(self) -> int:
        """The most new tokens any sample may generate."""
        if self.source == "ruler":
            budget = max((RULER_TASKS[t].max_new_tokens for t in self.tasks), default=0)
        elif self.source == "longbench":
            budget = max((LONGBENCH_TASKS[t].max_new_tokens for t in self.tasks), default=0)
        else:
            budget = 0
        return min(budget, self.max_new_tokens) if self.max_new_tokens else budget

    def check_model(self, max_context: int | None) -> None:
        """Check (and for default lengths, clip) the lengths against the model's context, before work.

        A RULER prompt of ``L`` tokens plus its generation must fit ``max_context``; explicit
        ``--context-lengths`` that do not fit raise a :class:`ValueError`, the ``ruler`` suite's
        defaults are dropped with a note. The perplexity sequence length must fit too.
        """
        if not max_context:
            return
        budget = self.generation_budget()
        if self.source in ("ruler", "longbench") and self.tasks:
            too_long = [c for c in self.context_lengths if c + budget > max_context]
            if too_long and (self.explicit_lengths or not self.defaults.clip_lengths):
                raise ValueError(
                    f"context length(s) {', '.join(map(str, too_long))} do not fit the model's context of "
                    f"{max_context} tokens (with up to {budget} generated tokens); pass --context-lengths "
                    f"of at most {max_context - budget}"
                )
            if too_long:
                kept = [c for c in self.context_lengths if c not in too_long]
                if not kept:
                    kept = [max_context - budget]
                self.notes.append(
                    f"context lengths {', '.join(map(str, too_long))} exceed the model's context of "
                    f"{max_context} tokens: using {', '.join(map(str, kept))}"
                )
                self.context_lengths = kept
        if self.fidelity is not None and self.fidelity.seq_len > max_context:
            raise ValueError(
                f"fidelity sequences of {self.fidelity.seq_len} tokens do not fit the model's context of "
                f"{max_context} tokens; pass --context-lengths of at most {max_context}"
            )
        if self.perplexity is not None and self.perplexity.seq_len > max_context:
            raise ValueError(
                f"perplexity sequences of {self.perplexity.seq_len} tokens do not fit the model's context of "
                f"{max_context} tokens; pass --context-lengths of at most {max_context}"
            )

    def longbench_max_prompt(self, max_context: int | None) -> int | None:
        """Prompt cap for LongBench: ``--context-lengths`` if given, else what the model can hold."""
        if self.context_lengths:
            return self.context_lengths[0]
        if not max_context:
            return None
        return max_context - self.generation_budget() - LONGBENCH_MARGIN


def parse_lengths(text: str | list | tuple | None) -> list[int] | None:
    """``"512,1024"`` (or a list of ints) -> ``[512, 1024]``; every length must be a positive integer."""
    lengths = parse_csv(text, int, "context length", "--context-lengths 1024,2048")
    if lengths is None:
        return None
    for value in lengths:
        if value < 1:
            raise ValueError(f"context lengths must be positive token counts, got {value}")
    if not lengths:
        raise ValueError("--context-lengths is empty; pass e.g. --context-lengths 1024,2048")
    return lengths


def parse_tasks(text: str | list | tuple | None) -> list[str] | None:
    """``"niah_single_1,vt"`` (or a list) -> task names (not yet checked against a suite)."""
    tasks = parse_csv(text, lambda t: str(t).strip(), "task")
    if tasks is None:
        return None
    if not tasks:
        raise ValueError("--tasks is empty; pass comma-separated task names")
    return tasks


def resolve(suite: str, tasks=None, context_lengths=None, samples: int | None = None) -> ResolvedSuite:
    """``suite`` with the overrides applied; unknown suites, tasks or bad numbers raise.

    ``tasks`` / ``context_lengths`` are comma-separated strings or lists. For ``quick`` and ``ppl``,
    the task ``perplexity`` selects the perplexity measurement (quick runs it with its RULER tasks by
    default; ``--tasks`` without ``perplexity`` leaves it out). For ``ppl``, ``samples`` is the number
    of sequences and ``context_lengths`` (one value) their length.
    """
    if suite not in SUITE_DEFS:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    spec = SUITE_DEFS[suite]
    names = parse_tasks(tasks)
    lengths = parse_lengths(context_lengths)
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"--samples must be a positive integer, got {samples!r}")

    if spec.source in ("ppl", "fidelity"):  # one task, one length: the sequences of a streamed measurement
        task, base = (PERPLEXITY, spec.perplexity) if spec.source == "ppl" else (FIDELITY, spec.fidelity)
        if names is not None and names != [task]:
            raise ValueError(f"the {spec.name} suite has one task, {task!r}; got {', '.join(names)}")
        if lengths is not None and len(lengths) != 1:
            raise ValueError(f"the {spec.name} suite takes one --context-lengths value: the length of each sequence")
        part = replace(base, sequences=samples or base.sequences, seq_len=lengths[0] if lengths else base.seq_len)
        ppl, fid = (part, None) if spec.source == "ppl" else (None, part)
        return ResolvedSuite(spec, [], [], None, None, None, ppl, explicit_lengths=lengths is not None, fidelity=fid)

    if spec.source == "longbench":
        known = LONGBENCH_TASKS
        if lengths is not None and len(lengths) != 1:
            raise ValueError("the longbench suite takes one --context-lengths value: the prompt cap in tokens")
    else:
        known = RULER_TASKS
    allowed = list(known) + ([PERPLEXITY] if spec.perplexity is not None else [])
    if names is not None:
        unknown = [t for t in names if t not in allowed]
        if unknown:
            raise ValueError(
                f"unknown task(s) {', '.join(unknown)} for the {suite} suite; known tasks: {', '.join(allowed)}"
            )
    chosen = list(dict.fromkeys(names if names is not None else list(spec.tasks) + (
        [PERPLEXITY] if spec.perplexity is not None else [])))
    ppl = spec.perplexity if PERPLEXITY in chosen else None
    chosen = [t for t in chosen if t != PERPLEXITY]
    if spec.source == "longbench":
        return ResolvedSuite(spec, chosen, lengths or [], samples, None, None, None,
                             explicit_lengths=lengths is not None)
    return ResolvedSuite(
        spec, chosen, lengths or list(spec.context_lengths), samples or spec.samples, spec.depths,
        spec.max_new_tokens, ppl, explicit_lengths=lengths is not None,
    )


def length_seed(seed: int, index: int) -> int:
    """Seed of the RULER samples at the ``index``-th context length of a suite.

    Each length gets its own seed, so the samples of different lengths hold different needles
    and keys: every sample of a task is an independent draw (the sample count behind a task's
    mean, and its standard error, is the total over lengths).
    """
    return seed + 1000 * index


def uses_depths(task: str) -> bool:
    """Whether the samples of a RULER task carry a needle depth (single-answer NIAH tasks)."""
    if task not in NIAH_TASKS:
        return False
    o = RULER_TASKS[task].options
    return o["num_queries"] * o["num_values"] == 1
