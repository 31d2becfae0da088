"""Evaluation suites of ``echokv eval``: which tasks, at which lengths, with how many samples.

A :class:`Suite` is a default; :func:`resolve` applies the command line's overrides (``--tasks``,
``--context-lengths``, ``--samples``) and validates the names, before any model is loaded, into a
:class:`Plan`. :func:`Plan.check_model` then checks the lengths against the model's context.

Suites
------

``quick`` (the default): a smoke test of the cache of a *small* model on 2 CPU cores, sized so
that ``full`` + ``echokv`` at one compression ratio finish in at most 10 minutes with SmolLM2-135M-
Instruct (~135M parameters, 30 layers), and so that a 10-point difference between methods is not
noise.

* Tasks: ``niah_single_1`` (a 7-digit number hidden in the repeated-sentence noise haystack) and
  ``niah_single_2`` (the same needle in real prose: the evaluation split's text), at 512 and 1024
  tokens, needles at depths 0, 25, 50, 75 and 100 %. These are the RULER tasks where SmolLM2-135M
  scores clearly above chance but below 100 % at these lengths (measured with the full cache, seed 0,
  20 samples per task and length): niah_single_1 ~85 % at 512 and ~55 % at 1024 tokens,
  niah_single_2 ~60 % / ~40 %. The other tasks were measured too and left out: ``niah_single_3``,
  ``niah_multikey_1``, ``niah_multivalue``, ``niah_multiquery`` score about 0-35 % for this model
  (multi-needle retrieval is beyond it), ``vt``, ``cwe`` and ``fwe`` (aggregation and tracking) about
  0-20 %, i.e. floor effects that cannot show a compression loss. Chance is 0: the score is string
  recall of a random 7-digit number.
* Samples: 25 per task and length, i.e. n = 100 per method. A method's mean score is a proportion
  of Bernoulli outcomes, so its binomial standard error is ``sqrt(p (1 - p) / n) <= sqrt(0.25 / 100)
  = 5`` points; the two methods see the *same* samples (paired), so the standard error of their
  difference is at most ~5-7 points and a 10-point gap is about two standard errors or more, not
  noise. More samples would tighten this but not fit the time budget.
* Generation is capped at :data:`QUICK_MAX_NEW_TOKENS` new tokens (RULER allows 128 for NIAH): the
  answer is a 7-digit number right after the answer prefix, so 16 tokens hold it, and greedy decoding
  of an instruct model that does not stop early would otherwise spend most of the time on text
  that cannot change the score (``string_match_all`` only looks for the number).
* Perplexity: 2 sequences x 1024 tokens of the evaluation split, streamed in chunks of 128 tokens
  through each method's cache (every chunk attends to the compressed past).

Time (measured, see ``echokv eval --suite quick``): prefill dominates, about 0.2 s (512) / 0.45 s
(1024) per sample for ``full`` on 2 idle cores, and ``echokv`` decodes slower (it rebuilds the
discarded heads of the whole compressed context at every step), so the suite is sized with a
margin for cores shared with other work.

``ruler``: all RULER tasks (:data:`echokv.eval.ruler.RULER_TASKS`) at 1024, 2048 and 4096 tokens
(lengths beyond the model's context, minus the generation budget, are dropped), 20 samples per task
and length (:data:`RULER_SAMPLES`), RULER's own generation lengths.

``longbench``: the 16 English LongBench tasks from the ``--data`` folder (``--samples``: the first n
samples of each task, default all), prompts longer than the model's context cut in the middle as
LongBench does.

``ppl``: perplexity of the evaluation split, 8 sequences x 1024 tokens (``--samples`` sequences,
``--context-lengths`` tokens each), chunks of 128 tokens through each method's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from echokv.eval.longbench import LONGBENCH_TASKS
from echokv.eval.ruler import NIAH_TASKS, RULER_TASKS

#: the task name of a perplexity measurement (allowed in ``--tasks`` of the quick and ppl suites)
PERPLEXITY = "perplexity"

SUITES = ("quick", "ruler", "longbench", "ppl")

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


SUITE_DEFS: dict[str, Suite] = {
    "quick": Suite(
        "quick", "ruler", QUICK_TASKS, QUICK_LENGTHS, QUICK_SAMPLES, QUICK_DEPTHS, QUICK_MAX_NEW_TOKENS,
        PerplexitySpec(QUICK_PPL_SEQUENCES, PPL_SEQ_LEN, PPL_CHUNK),
    ),
    "ruler": Suite("ruler", "ruler", tuple(RULER_TASKS), RULER_LENGTHS, RULER_SAMPLES, RULER_DEPTHS,
                   clip_lengths=True),
    "longbench": Suite("longbench", "longbench", tuple(LONGBENCH_TASKS)),
    "ppl": Suite("ppl", "ppl", (PERPLEXITY,), perplexity=PerplexitySpec()),
}


@dataclass
class Plan:
    """What one evaluation runs: the suite's defaults with the user's overrides applied.

    ``tasks`` are RULER or LongBench task names (the perplexity part is ``perplexity``, not in
    ``tasks``); ``context_lengths`` are RULER prompt lengths (LongBench: at most one, the prompt
    cap); ``samples`` per task and length (LongBench: first n per task, None = all).
    """

    suite: Suite
    tasks: list[str]
    context_lengths: list[int]
    samples: int | None
    depths: tuple[float, ...] | None
    max_new_tokens: int | None
    perplexity: PerplexitySpec | None
    explicit_lengths: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.suite.name

    def generation_budget(self) -> int:
        """The most new tokens any sample of the plan may generate."""
        if self.suite.source == "ruler":
            budget = max((RULER_TASKS[t].max_new_tokens for t in self.tasks), default=0)
        elif self.suite.source == "longbench":
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
        if self.suite.source in ("ruler", "longbench") and self.tasks:
            too_long = [c for c in self.context_lengths if c + budget > max_context]
            if too_long and (self.explicit_lengths or not self.suite.clip_lengths):
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


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    return items


def parse_lengths(text: str | list | tuple | None) -> list[int] | None:
    """``"512,1024"`` (or a list of ints) -> ``[512, 1024]``; every length must be a positive integer."""
    if text is None:
        return None
    items = _split(text) if isinstance(text, str) else list(text)
    lengths = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"context length {item!r} is not an integer (pass e.g. --context-lengths 1024,2048)") from None
        if value < 1:
            raise ValueError(f"context lengths must be positive token counts, got {value}")
        lengths.append(value)
    if not lengths:
        raise ValueError("--context-lengths is empty; pass e.g. --context-lengths 1024,2048")
    return lengths


def parse_tasks(text: str | list | tuple | None) -> list[str] | None:
    """``"niah_single_1,vt"`` (or a list) -> task names (not yet checked against a suite)."""
    if text is None:
        return None
    tasks = _split(text) if isinstance(text, str) else [str(t).strip() for t in text]
    if not tasks:
        raise ValueError("--tasks is empty; pass comma-separated task names")
    return tasks


def resolve(suite: str, tasks=None, context_lengths=None, samples: int | None = None) -> Plan:
    """The plan of ``suite`` with the overrides applied; unknown suites, tasks or bad numbers raise.

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

    if spec.source == "ppl":
        if names is not None and names != [PERPLEXITY]:
            raise ValueError(f"the ppl suite has one task, {PERPLEXITY!r}; got {', '.join(names)}")
        if lengths is not None and len(lengths) != 1:
            raise ValueError("the ppl suite takes one --context-lengths value: the length of each sequence")
        ppl = replace(spec.perplexity, sequences=samples or spec.perplexity.sequences,
                      seq_len=lengths[0] if lengths else spec.perplexity.seq_len)
        return Plan(spec, [], [], None, None, None, ppl, explicit_lengths=lengths is not None)

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
        return Plan(spec, chosen, lengths or [], samples, None, None, None, explicit_lengths=lengths is not None)
    return Plan(
        spec, chosen, lengths or list(spec.context_lengths), samples or spec.samples, spec.depths,
        spec.max_new_tokens, ppl, explicit_lengths=lengths is not None,
    )


def uses_depths(task: str) -> bool:
    """Whether the samples of a RULER task carry a needle depth (single-answer NIAH tasks)."""
    if task not in NIAH_TASKS:
        return False
    o = RULER_TASKS[task].options
    return o["num_queries"] * o["num_values"] == 1
