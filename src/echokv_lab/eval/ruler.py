"""RULER synthetic long-context tasks, generated locally from a seed.

Follows the task definitions, templates and default complexity settings of RULER (Hsieh et al. 2024,
"RULER: What's the Real Context Size of Your Long-Context Language Models?", arXiv 2404.06654):

* ``niah_*`` needle in a haystack: "One of the special magic numbers for <key> is: <value>." hidden in
  a noise haystack ("The grass is green. The sky is blue. ...") or in real prose, with several keys
  (multikey: distractor needles), several values for one key (multivalue) or several queried keys
  (multiquery).
* ``vt`` variable tracking: follow a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... in noise.
* ``cwe`` common words extraction: the 10 most frequent words of a long numbered word list.
* ``fwe`` frequent words extraction: the 3 most frequent coded words of a Zipf-distributed text.

Differences from the reference scripts, kept small on purpose: ``niah_single_3`` hides an
adjective-noun *word* value (RULER's variant uses a UUID; set ``value_type="uuids"`` to get it),
``vt`` and ``cwe`` keep RULER's one-shot example but make it short, and word lists are built in
(common English words, then pronounceable pseudo-words when a long ``cwe`` list needs more).

Haystacks and phrasings (beyond RULER, which hides one phrasing in Paul Graham's essays): the ``essay``
tasks draw each sample's haystack from a list of sources (:func:`echokv.data.haystack_sources`: prose,
technical prose, code and the user's ``--text``), starting at a random word, and its needle/question wording
from :data:`PHRASINGS` of a split: ``test`` (the reports'; RULER's own wording is one of them) or ``dev`` (for
choosing defaults; other wordings). Sample ``i`` takes source ``i mod S`` and phrasing ``(i div S) mod P``.

The prompt of every sample is fitted by bisection on the haystack size to ``context_length``
tokens of the model's tokenizer (the whole formatted prompt, as :func:`prompt_ids` gives it), within
2 %. All scores are string-match recall (:func:`echokv_lab.eval.metrics.string_match_all`).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from echokv_lab.eval.sample import Sample, prompt_length

TOLERANCE = 0.02  # allowed relative deviation of the prompt length from context_length

NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)

def _word_list(text: str) -> list[str]:
    return text.split()


# Common English words for keys ("adjective-noun", as RULER draws from wonderwords) and for cwe.
ADJECTIVES = _word_list("""
able absent active actual afraid agreeable alert alive amazing ancient angry annual anxious
aromatic ashamed automatic available average awake aware bad basic beautiful big bitter black
blue bold boring brave brief bright broad broken brown busy calm capable careful careless cheap
cheerful chemical chief chilly civil clean clear clever close cloudy coherent cold colorful
common complete complex confident cool correct crazy creative critical crowded cruel curious
cute damp dark dead deep delicate dense direct dirty distinct dizzy dry dull eager early
eastern easy elderly electric elegant empty endless equal even exact excited expensive faint
fair famous fancy fast fat fierce final fine flat fluffy foolish formal fortunate free fresh
friendly frozen full funny gentle giant glad global golden good graceful grand gray great
green grumpy guilty handsome happy hard harsh healthy heavy helpful hidden high hollow honest
hot huge humble hungry icy ideal illegal immense important innocent intense jolly juicy keen
kind large late lazy legal level light little lively local lonely long loose loud lovely low
loyal lucky mad magic major massive mature meek mellow mental mighty mild minor modern moist
narrow nasty natural neat nervous new nice noble noisy normal obvious odd old open orange
ordinary organic pale patient peaceful perfect pink plain plastic pleasant polite poor popular
powerful precious pretty proud public pure purple quick quiet rapid rare raw ready real red
regular rich rigid ripe rough round royal rude rural sad safe salty scary secret selfish
serious shallow sharp shiny short shy silent silly simple slim slow small smooth soft solid
sour spicy splendid square steady steep sticky stiff strange strict strong sudden sunny super
sweet swift tall tame tender thick thin thirsty tidy tiny tough tricky ugly unusual upset
urban useful useless vague vast violet visible vivid warm wasteful weak wealthy wet white whole
wide wild windy wise wooden young zealous
""")

NOUNS = _word_list("""
account actor airport album animal answer apple area army art artist aunt baby back bag bakery
ball banana band bank basket bath beach bean bear bed bee bell bicycle bird birthday blanket
board boat body bone book boot bottle box boy brain branch bread breakfast brick bridge brother
brush bucket building butter button cabin cake camera camp candle cap car card carpet carrot
castle cat cattle cave chair chalk cheese cherry chicken child church circle city class clock
cloud coast coat coffee coin college computer cook corn cotton country cousin cow crayon cream
crowd cup curtain cushion dance daughter deer desert desk diamond dinner doctor dog doll dolphin
door dragon dream dress drum duck eagle earth egg elephant engine evening eye face factory farm
father feather fence field finger fire fish flag flower forest fork fountain fox friend frog
fruit game garage garden gate ghost giraffe girl glass glove goat gold grape grass guitar hair
hammer hand harbor hat heart helmet hill holiday honey horse hospital hotel house island jacket
jam jar jelly jewel judge juice kettle key king kitchen kite knife ladder lake lamp lawyer leaf
lemon letter library lion lizard lock lunch machine magnet map market meadow meat melon milk
mirror monkey moon morning mountain mouse museum music nail needle nest night notebook nurse
ocean office onion orange orchard owl painter palace pan paper parent park parrot party pasta
path peach pear pencil penguin pepper piano picture pig pillow pilot pizza planet plant plate
pocket poem pond potato prince queen rabbit radio rain rainbow river road robot rock rocket roof
room rope rose ruler sail salad sand school scissors sea seed shadow sheep shell ship shirt shoe
shop sister snake snow soap sock soldier song soup spider spoon spring square squirrel stair
star station stone storm story street sugar summer sun swan sweater table tail teacher tent
thread thunder tiger toast tomato tooth towel tower town toy tractor train tree truck tulip
turtle umbrella uncle valley van vase village violin wagon wall watch water wave whale wheel
window wind wing winter wolf wood word worm yard zebra
""")

VERBS = _word_list("""
accept add admire allow answer appear arrive ask bake bathe begin behave believe belong boil
borrow bounce breathe build burn call carry catch change chase cheer chew clap climb collect
compare cook copy count cover crawl cross cry dance decide deliver describe dig discover dream
drink drive drop earn eat enjoy enter explain fetch fill find fix float fly fold follow forget
gather give glow grab greet grow guess hang help hide hop hunt hurry imagine invent invite join
juggle jump kick kiss knit knock laugh learn lift listen look love march melt mix move open
paint pass pick plant play point polish pour pray pull push race rain reach read relax remember
repair rest return ride roll run sail scream search shake share shine shout sing sit skip sleep
slide smile sneeze solve sort speak spell spin splash stand start stay stir swim talk taste
teach tell thank throw travel trust turn visit wait walk wander wash watch wave whisper whistle
win wish wonder work worry write yawn
""")

REAL_WORDS = sorted(set(ADJECTIVES + NOUNS + VERBS))


@dataclass(frozen=True)
class RulerTask:
    """A RULER task: its family (``niah``, ``vt``, ``cwe``, ``fwe``), generation length and options."""

    family: str
    max_new_tokens: int
    options: dict = field(default_factory=dict)
    metric: str = "string_match_all"


def _niah(haystack: str, value_type: str = "numbers", keys: int = 1, values: int = 1, queries: int = 1):
    options = {"haystack": haystack, "key_type": "words", "value_type": value_type,
               "num_keys": keys, "num_values": values, "num_queries": queries}
    return RulerTask("niah", 128, options)


# The RULER configuration (scripts/synthetic.yaml) of each task.
RULER_TASKS: dict[str, RulerTask] = {
    "niah_single_1": _niah("noise"),
    "niah_single_2": _niah("essay"),
    "niah_single_3": _niah("essay", value_type="words"),
    "niah_multikey_1": _niah("essay", keys=4),
    "niah_multivalue": _niah("essay", values=4),
    "niah_multiquery": _niah("essay", queries=4),
    "vt": RulerTask("vt", 30, {"num_chains": 1, "num_hops": 4}),
    "cwe": RulerTask("cwe", 120, {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": RulerTask("fwe", 50, {"alpha": 2.0}),
}

NIAH_TASKS = tuple(name for name, task in RULER_TASKS.items() if task.family == "niah")


@dataclass(frozen=True)
class Phrasing:
    """How a needle is written and asked for. Fields are formatted with ``kind`` ("number", "word", "uuid"),
    ``key`` / ``value`` (needle), ``query`` (the asked key or keys)."""

    needle: str
    intro: str
    question: str
    prefix: str
    intro_many: str
    question_many: str
    prefix_many: str


RULER_PHRASING = Phrasing(
    needle="One of the special magic {kind}s for {key} is: {value}.",
    intro=("A special magic {kind} is hidden within the following text. Make sure to memorize it. "
           "I will quiz you about the {kind} afterwards."),
    question="What is the special magic {kind} for {query} mentioned in the provided text?",
    prefix="The special magic {kind} for {query} mentioned in the provided text is",
    intro_many=("Some special magic {kind}s are hidden within the following text. Make sure to memorize "
                "it. I will quiz you about the {kind}s afterwards."),
    question_many="What are all the special magic {kind}s for {query} mentioned in the provided text?",
    prefix_many="The special magic {kind}s for {query} mentioned in the provided text are",
)

#: needle and question wordings of each split: ``test`` for the reports (RULER's first), ``dev`` for tuning
PHRASINGS: dict[str, tuple[Phrasing, ...]] = {
    "test": (
        RULER_PHRASING,
        Phrasing(
            needle="The {kind} assigned to the {key} project is {value}.",
            intro="The text below mentions the {kind} assigned to a project. Read it carefully: you will be asked for it.",
            question="Which {kind} is assigned to the {query} project?",
            prefix="The {kind} assigned to the {query} project is",
            intro_many="The text below mentions {kind}s assigned to projects. Read it carefully: you will be asked for them.",
            question_many="Which {kind}s are assigned to the {query} project?",
            prefix_many="The {kind}s assigned to the {query} project are",
        ),
        Phrasing(
            needle="Please remember that the {key} password is {value}.",
            intro="A password is given somewhere in the following document. Remember it.",
            question="What is the {query} password given in the document?",
            prefix="The {query} password given in the document is",
            intro_many="Passwords are given somewhere in the following document. Remember them.",
            question_many="What are all the {query} passwords given in the document?",
            prefix_many="The {query} passwords given in the document are",
        ),
    ),
    "dev": (
        Phrasing(
            needle="The secret {kind} of the {key} is {value}.",
            intro="Somewhere in the text below there is a secret {kind}. Memorize it.",
            question="What is the secret {kind} of the {query}?",
            prefix="The secret {kind} of the {query} is",
            intro_many="Somewhere in the text below there are secret {kind}s. Memorize them.",
            question_many="What are all the secret {kind}s of the {query}?",
            prefix_many="The secret {kind}s of the {query} are",
        ),
        Phrasing(
            needle="Note: the registration {kind} of {key} is {value}.",
            intro="The following notes contain a registration {kind}. Keep it in mind.",
            question="What is the registration {kind} of {query}?",
            prefix="The registration {kind} of {query} is",
            intro_many="The following notes contain registration {kind}s. Keep them in mind.",
            question_many="What are all the registration {kind}s of {query}?",
            prefix_many="The registration {kind}s of {query} are",
        ),
        Phrasing(
            needle="In the ledger, the entry for {key} reads {value}.",
            intro="A ledger entry is copied into the text below. You will be asked what it reads.",
            question="What does the ledger entry for {query} read?",
            prefix="The ledger entry for {query} reads",
            intro_many="Ledger entries are copied into the text below. You will be asked what they read.",
            question_many="What do all the ledger entries for {query} read?",
            prefix_many="The ledger entries for {query} read",
        ),
    ),
}


#: a phrasing -> "split:index" (recorded in each sample's metadata)
PHRASING_NAMES = {p: f"{split}:{i}" for split, ps in PHRASINGS.items() for i, p in enumerate(ps)}


# --- text helpers -----------------------------------------------------------------------------


def _nearest(candidates: Sequence[int], target: float) -> int:
    return min(candidates, key=lambda c: abs(c - target))


def insert_at_depths(text: str, items: Sequence[tuple[float, str]],
                     word_fallback: bool = True) -> tuple[str, list[float]]:
    """Insert each ``(depth, sentence)`` at that fraction of ``text``, at a sentence boundary.

    With ``word_fallback``, when no sentence boundary lies within 2.5 % of the requested depth
    (long sentences, short haystacks) the nearest word boundary is used instead. Returns the new
    text and, per item, the depth it really got (character offset of the boundary / ``len(text)``).
    """
    n = len(text)
    sentence_starts = [0, n] + [m.end() for m in re.finditer(r"[.!?] ", text)]
    word_starts = [0, n] + [m.end() for m in re.finditer(r" ", text)]
    placed = []
    for depth, sentence in items:
        target = depth * n
        b = _nearest(sentence_starts, target)
        if word_fallback and abs(b - target) > 0.025 * n:
            b = _nearest(word_starts, target)
        placed.append((b, sentence))
    order = sorted(range(len(placed)), key=lambda i: placed[i][0])
    pieces, last = [], 0
    for i in order:
        b, sentence = placed[i]
        pieces += [text[last:b].strip(), sentence]
        last = b
    pieces.append(text[last:].strip())
    return " ".join(p for p in pieces if p), [b / max(n, 1) for b, _ in placed]


def _noise(n: int) -> str:
    return " ".join(NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(n))


def _cycle_words(words: Sequence[str], n: int, offset: int = 0) -> str:
    # Real prose from word ``offset`` on; it repeats from its start when the context asks for more than the text
    # has (as RULER).
    return " ".join(words[(offset + i) % len(words)] for i in range(n))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; choose numbers, words or uuids")


def _distinct(rng: random.Random, count: int, draw: Callable[[], str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        value = draw()
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """Pronounceable consonant-vowel pseudo-words, for word lists longer than the built-in ones."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    real = set(REAL_WORDS)

    def draw() -> str:
        return "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))

    seen: set[str] = set()
    out = []
    while len(out) < count:
        word = draw()
        if word not in seen and word not in real:
            seen.add(word)
            out.append(word)
    return out


def _zeta(alpha: float, terms: int = 10_000) -> float:
    # Riemann zeta by a partial sum plus the integral of the tail (error ~ terms**-alpha).
    return sum(k**-alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1)


# --- task builders ----------------------------------------------------------------------------
# Each builder draws everything random for one sample from ``rng`` and returns (build, n_min, n_max):
# ``build(n)`` makes the sample with a haystack of ``n`` units and is deterministic in ``n``, so the
# haystack size can be bisected between the smallest sensible haystack and the largest possible one
# (None: unbounded).

Builder = Callable[[int], Sample]
BuildSpec = tuple[Builder, int, int | None]


def _build_niah(name: str, task: RulerTask, rng: random.Random, depth: float | None,
                haystack_words: list[str] | None, context_length: int,
                phrasing: Phrasing = RULER_PHRASING, haystack_name: str | None = None) -> BuildSpec:
    o = task.options
    num_keys = max(o["num_keys"], o["num_queries"])
    keys = _distinct(rng, num_keys, lambda: _random_value(rng, o["key_type"]))
    values = [_distinct(rng, o["num_values"], lambda: _random_value(rng, o["value_type"])) for _ in keys]
    kind = o["value_type"][:-1]  # "number", "word", "uuid"
    needles = [(i, phrasing.needle.format(kind=kind, key=key, value=value))
               for i, key in enumerate(keys) for value in values[i]]
    queried = sorted(rng.sample(range(num_keys), o["num_queries"]))
    single = o["num_queries"] * o["num_values"] == 1

    # Depths: the one queried needle of a single-answer task goes to the requested depth; the other
    # needles (distractor keys, or all needles of multi-answer tasks) to random RULER depths.
    ruler_depths = [i / 39 for i in range(40)]
    depths = rng.sample(ruler_depths, len(needles))
    if single and depth is not None:
        depths[[k for k, _ in needles].index(queried[0])] = depth
    order = list(range(len(needles)))
    rng.shuffle(order)  # RULER shuffles the needles before placing them
    items = [(depths[j], needles[j][1]) for j in order]

    names = [keys[i] for i in queried]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    answers = [v for i in queried for v in values[i]]
    if single:
        intro, question, prefix = phrasing.intro, phrasing.question, phrasing.prefix
    else:
        intro, question, prefix = phrasing.intro_many, phrasing.question_many, phrasing.prefix_many
    intro, question, prefix = (t.format(kind=kind, query=query) for t in (intro, question, prefix))
    # real prose starts at a random word of its source (the same for every haystack size of this sample)
    offset = rng.randrange(len(haystack_words)) if o["haystack"] != "noise" and haystack_words else 0

    def build(n: int) -> Sample:
        base = _noise(n) if o["haystack"] == "noise" else _cycle_words(haystack_words, n, offset)
        haystack, placed = insert_at_depths(base, items)
        return Sample(
            task=name, context=intro + "\n" + haystack, question=question, answers=answers,
            answer_prefix=prefix, context_length=context_length, depth=depth if single else None,
            metric=task.metric, max_new_tokens=task.max_new_tokens,
            metadata={"haystack": o["haystack"] if o["haystack"] == "noise" else (haystack_name or o["haystack"]),
                      "phrasing": PHRASING_NAMES.get(phrasing), "needles": [s for _, s in items],
                      "needle_depths": placed, "keys": keys, "queried_keys": names},
        )

    return build, (5 if o["haystack"] == "noise" else 25), None


_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def _vt_parts(rng: random.Random, num_chains: int, num_hops: int):
    names = _distinct(rng, num_chains * (num_hops + 1), lambda: "".join(rng.choices(string.ascii_uppercase, k=5)))
    chains, first_value = [], None
    for c in range(num_chains):
        chain_vars = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = str(rng.randint(10000, 99999))
        first_value = first_value or value
        statements = [f"VAR {chain_vars[0]} = {value}."]
        statements += [f"VAR {chain_vars[j + 1]} = VAR {chain_vars[j]}." for j in range(num_hops)]
        chains.append((chain_vars, statements))
    # Statements of a chain appear in order, at random depths.
    items = []
    for _, statements in chains:
        depths = sorted(rng.random() for _ in statements)
        items += list(zip(depths, statements))
    return chains[0][0], first_value, items


def _vt_question(value: str, num_vars: int) -> tuple[str, str]:
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {num_vars} "
              f"variables are assigned the value {value}, they are:")
    return question, prefix


def _build_vt(name: str, task: RulerTask, rng: random.Random, depth: float | None,
              haystack_words: list[str] | None, context_length: int) -> BuildSpec:
    hops, chains = task.options["num_hops"], task.options["num_chains"]
    # RULER's one-shot example, kept short: a few noise sentences around one chain.
    ex_vars, ex_value, ex_items = _vt_parts(rng, chains, hops)
    ex_text, _ = insert_at_depths(_noise(10), ex_items, word_fallback=False)
    ex_q, ex_prefix = _vt_question(ex_value, len(ex_vars))
    example = f"{_VT_INTRO}\n\n{ex_text}\n{ex_q} {ex_prefix} {' '.join(ex_vars)}\n"

    answers, value, items = _vt_parts(rng, chains, hops)
    question, prefix = _vt_question(value, len(answers))

    def build(n: int) -> Sample:
        haystack, _ = insert_at_depths(_noise(n), items, word_fallback=False)
        return Sample(
            task=name, context=f"{example}\n{_VT_INTRO}\n\n{haystack}", question=question, answers=answers,
            answer_prefix=prefix, context_length=context_length, metric=task.metric,
            max_new_tokens=task.max_new_tokens, metadata={"value": value},
        )

    return build, 5, None


_CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.")
_CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
_CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _build_cwe(name: str, task: RulerTask, rng: random.Random, depth: float | None,
               haystack_words: list[str] | None, context_length: int) -> BuildSpec:
    num_cw = task.options["num_cw"]
    # RULER lowers the repetitions below 4k tokens: (6, 1) and a 20-word example of (3, 1).
    if context_length < 4096:
        freq_cw, freq_ucw, ex_size, ex_cw, ex_ucw = 6, 1, 20, 3, 1
    else:
        freq_cw, freq_ucw, ex_size, ex_cw, ex_ucw = task.options["freq_cw"], task.options["freq_ucw"], 40, 10, 3
    # Enough distinct words for any list that fits (a numbered entry takes at least 2 tokens).
    needed = context_length // (2 * freq_ucw) + ex_size + num_cw
    real = list(REAL_WORDS)
    rng.shuffle(real)
    vocab = real + _pseudo_words(rng, max(0, needed - len(real)))
    example_words, words = vocab[-ex_size:], vocab[:-ex_size]
    seed = rng.random()

    def word_list(distinct: Sequence[str], f_common: int, f_rare: int, shuffle_seed: float) -> list[str]:
        out = list(distinct[:num_cw]) * f_common + list(distinct[num_cw:]) * f_rare
        random.Random(shuffle_seed).shuffle(out)
        return out

    ex_list = word_list(example_words, ex_cw, ex_ucw, seed + 1)
    example = (f"{_CWE_INTRO}\n{_numbered(ex_list)}\n{_CWE_QUESTION} {_CWE_PREFIX} "
               f"{_numbered(example_words[:num_cw])}\n")

    def build(n: int) -> Sample:
        listing = _numbered(word_list(words[:n], freq_cw, freq_ucw, seed))
        return Sample(
            task=name, context=f"{example}\n{_CWE_INTRO}\n{listing}", question=_CWE_QUESTION,
            answers=list(words[:num_cw]), answer_prefix=_CWE_PREFIX, context_length=context_length,
            metric=task.metric, max_new_tokens=task.max_new_tokens, metadata={"distinct_words": n},
        )

    return build, num_cw + 1, len(words)


_FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. "
              "Find the three most frequently appeared coded words.")
_FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                 "What are the three most frequently appeared words in the above coded text?")
_FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


def _build_fwe(name: str, task: RulerTask, rng: random.Random, depth: float | None,
               haystack_words: list[str] | None, context_length: int) -> BuildSpec:
    alpha = task.options["alpha"]
    vocab_size = max(context_length // 50, 10)  # as RULER: max_seq_length // 50
    vocab = _distinct(rng, vocab_size, lambda: "".join(rng.choices(string.ascii_lowercase, k=6)))
    vocab[0] = "..."  # the most frequent "word" is noise, as in RULER
    zeta = _zeta(alpha)
    weights = [k**-alpha / zeta for k in range(1, vocab_size + 1)]
    seed = rng.random()

    def counts(n: int) -> list[int]:
        return [int(n * w) for w in weights]  # Zipf counts, rounded down

    def build(n: int) -> Sample:
        words = [w for w, c in zip(vocab, counts(n)) for _ in range(c)]
        random.Random(seed).shuffle(words)
        return Sample(
            task=name, context=f"{_FWE_INTRO} {' '.join(words)}", question=_FWE_QUESTION,
            answers=vocab[1:4], answer_prefix=_FWE_PREFIX, context_length=context_length,
            metric=task.metric, max_new_tokens=task.max_new_tokens, metadata={"num_words": n},
        )

    # Smallest size where the three answers are strictly more frequent than every other word.
    n_min = next(n for n in range(10, 10**6) if counts(n)[3] > max(counts(n)[4:], default=0))
    return build, n_min, None


_BUILDERS = {"niah": _build_niah, "vt": _build_vt, "cwe": _build_cwe, "fwe": _build_fwe}


# --- length fitting ---------------------------------------------------------------------------


def _fit(build: Builder, tokenizer, target: int, n_min: int, n_max: int | None, guess: int | None,
         task: str) -> tuple[Sample, int]:
    """Pick the haystack size in [n_min, n_max] whose prompt length is closest to ``target`` tokens."""
    lengths: dict[int, int] = {}
    n_max = n_max if n_max is not None else 10**8

    def length(n: int) -> int:
        if n not in lengths:
            lengths[n] = prompt_length(tokenizer, build(n))
        return lengths[n]

    if length(n_min) > target * (1 + TOLERANCE):
        raise ValueError(
            f"context_length={target} is too short for RULER task {task!r}: its smallest prompt "
            f"already has {length(n_min)} tokens with this tokenizer"
        )
    if length(n_min) >= target:
        best = n_min
    else:
        if guess is None:  # estimate the tokens per haystack unit from a probe
            probe = min(n_min + 64, n_max)
            slope = max((length(probe) - length(n_min)) / max(probe - n_min, 1), 1e-3)
            guess = n_min + int((target - length(n_min)) / slope)
        # Bracket lo < hi with length(lo) <= target < length(hi) around the guess, then bisect.
        lo = hi = min(max(guess, n_min + 1), n_max)
        step = max(1, hi // 32)
        if length(hi) <= target:
            while lo < n_max and length(hi := min(lo + step, n_max)) <= target:
                lo, step = hi, step * 2
        else:
            while length(lo := max(n_min, hi - step)) > target:
                hi, step = lo, step * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if length(mid) <= target else (lo, mid)
        best = hi if length(hi) > target and length(hi) - target < target - length(lo) else lo
    if abs(length(best) - target) > TOLERANCE * target:
        raise ValueError(
            f"could not fit RULER task {task!r} to {target} tokens (closest: {length(best)} tokens)"
        )
    sample = build(best)
    sample.metadata["prompt_tokens"] = length(best)
    return sample, best


# --- public API -------------------------------------------------------------------------------


def _haystack_words(task: str, haystack_text: str | None) -> list[str] | None:
    if RULER_TASKS[task].options.get("haystack") != "essay":
        return None
    words = re.sub(r"\s+", " ", haystack_text or "").strip().split(" ")
    if len(words) < 50:
        raise ValueError(
            f"RULER task {task!r} hides its needles in real prose: pass haystack_text=... "
            "(an English text of at least 50 words; RULER uses Paul Graham's essays)"
        )
    return words


def _sample_depths(depths: Sequence[float] | None, n_samples: int) -> list[float]:
    if depths is None:  # evenly spaced over the samples, both ends included
        return [i / (n_samples - 1) if n_samples > 1 else 0.5 for i in range(n_samples)]
    depths = [float(d) for d in depths]
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"needle depths must be fractions in [0, 1], got {depths}")
    return [depths[i % len(depths)] for i in range(n_samples)]


def generate(task: str, tokenizer, context_length: int, n_samples: int, seed: int = 0,
             depths: Sequence[float] | None = None, haystack_text: str | None = None,
             haystacks: Sequence[tuple[str, str]] | None = None, phrasings: Sequence[Phrasing] | str | None = None,
             ) -> list[Sample]:
    """Generate ``n_samples`` samples of a RULER ``task`` whose prompts have ``context_length`` tokens.

    ``context_length`` counts the tokens of the whole formatted prompt (chat template included, as
    :func:`echokv_lab.eval.sample.prompt_ids` builds it) with ``tokenizer``; each prompt is within 2 % of
    it. ``depths`` (fractions in [0, 1], cycled over the samples; default: evenly spaced) place the
    queried needle of the single-answer NIAH tasks (``niah_single_*``, ``niah_multikey_1``); the
    other tasks ignore them. ``haystack_text`` is the prose of the ``essay`` haystacks. Sample ``i``
    is a function of ``(task, seed, i)``, its depth, the haystack text, the length and the tokenizer.

    ``haystacks`` (``(name, text)`` pairs, instead of ``haystack_text``) and ``phrasings`` (a list of
    :class:`Phrasing`, or a split name of :data:`PHRASINGS`; default RULER's wording) vary the samples: sample
    ``i`` takes haystack ``i mod S`` and phrasing ``(i div S) mod P``.
    """
    if task not in RULER_TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known tasks: {', '.join(RULER_TASKS)}")
    if n_samples < 1 or context_length < 1:
        raise ValueError("n_samples and context_length must be positive")
    spec = RULER_TASKS[task]
    if haystacks:
        sources = [(name, _haystack_words(task, text)) for name, text in haystacks]
    else:
        sources = [(None, _haystack_words(task, haystack_text))]
    if isinstance(phrasings, str):
        if phrasings not in PHRASINGS:
            raise ValueError(f"unknown phrasing split {phrasings!r}; choose one of {', '.join(PHRASINGS)}")
        phrasings = PHRASINGS[phrasings]
    phrasings = list(phrasings or [RULER_PHRASING])
    sample_depths = _sample_depths(depths, n_samples) if spec.family == "niah" else [None] * n_samples
    samples, guesses = [], {}
    for i in range(n_samples):
        rng = random.Random(f"echokv-ruler:{task}:{seed}:{i}")  # str seeds hash with SHA-512: stable
        source = i % len(sources)
        name, words = sources[source]
        extra = {}
        if spec.family == "niah":
            extra = {"phrasing": phrasings[(i // len(sources)) % len(phrasings)], "haystack_name": name}
        build, n_min, n_max = _BUILDERS[spec.family](task, spec, rng, sample_depths[i], words, context_length,
                                                     **extra)
        sample, guesses[source] = _fit(build, tokenizer, context_length, n_min, n_max, guesses.get(source), task)
        sample.metadata.update(seed=seed, index=i)
        samples.append(sample)
    return samples
