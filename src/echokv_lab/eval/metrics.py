"""Scoring functions of RULER and LongBench, all in [0, 1].

* RULER (Hsieh et al. 2024, arXiv 2404.06654) scores by string-match recall: ``string_match_all``
  (share of the answers found in the prediction) and ``string_match_part`` (any answer found).
* LongBench (Bai et al. 2023, arXiv 2308.14508) scores each prediction against every reference
  answer with a per-dataset metric and keeps the best: SQuAD-style token F1, ROUGE-L, classification
  and retrieval accuracy, counting, and an edit similarity for code.

:data:`METRICS` maps the name stored in :attr:`Sample.metric` to a ``(prediction, answers, sample)``
function; :func:`score` applies the right one to a sample.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from echokv_lab.eval.sample import Sample

# --- RULER ------------------------------------------------------------------------------------


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Mean over answers of ``answer.lower() in prediction.lower()`` (RULER's recall metric)."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any answer occurs in the prediction (case-insensitive), else 0.0 (RULER's QA metric)."""
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


# --- LongBench --------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/LongBench normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """Bag-of-tokens F1 between the normalised prediction and reference (LongBench ``qa_f1_score``)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One-row dynamic programme: O(len(a) * len(b)) time, O(len(b)) memory.
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F1 (Lin 2004): LCS of lowercased whitespace tokens, ``2PR / (P + R)``.

    This approximates the ``rouge`` package (``Rouge().get_scores(...)["rouge-l"]["f"]``) that
    LongBench uses for gov_report, qmsum, multi_news and samsum; that package splits the texts into
    sentences at "." for a summary-level union LCS and weights P/R with beta = P/R, so its numbers
    differ slightly from these.
    """
    pred, ref = prediction.lower().split(), ground_truth.lower().split()
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str]) -> float:
    """LongBench ``classification_score`` (trec): 1/k if the true class is among the k class names
    found in the prediction, dropping names that are only substrings of the true class; else 0.

    (LongBench's fallback to the most similar class never runs because of an always-true test,
    so a prediction naming no class scores 0, as here.)
    """
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_of_numbers_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, ground_truth: str) -> float:
    """passage_retrieval_en: share of the numbers in the prediction equal to N of "Paragraph N"."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    return _share_of_numbers_equal(prediction, found[0]) if found else 0.0


def count_score(prediction: str, ground_truth: str) -> float:
    """passage_count: share of the numbers in the prediction equal to the true count."""
    return _share_of_numbers_equal(prediction, str(ground_truth).strip())


def code_sim_score(prediction: str, ground_truth: str) -> float:
    """lcc / repobench-p: similarity of the first code line of the prediction to the reference line.

    As LongBench, take the first line (after leading newlines) containing no "`", "#" or "//".
    LongBench then uses ``fuzzywuzzy.fuzz.ratio / 100``; this uses ``difflib.SequenceMatcher.ratio()``,
    the same 2*matches/total formula but with difflib's matching blocks (and no rounding to whole
    percents), so values can differ by a little.
    """
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return difflib.SequenceMatcher(None, line, ground_truth).ratio()


# --- registry ---------------------------------------------------------------------------------


def _best_of(fn: Callable[[str, str], float]) -> Callable[[str, Sequence[str], Sample | None], float]:
    # LongBench: the best score over all reference answers.
    def metric(prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
        return max((fn(prediction, a) for a in answers), default=0.0)

    return metric


def _classification(prediction: str, answers: Sequence[str], sample: Sample | None = None) -> float:
    classes = (sample.metadata.get("all_classes") if sample else None) or []
    return max((classification_score(prediction, a, classes) for a in answers), default=0.0)


METRICS: dict[str, Callable[[str, Sequence[str], Sample | None], float]] = {
    "string_match_all": lambda p, a, s=None: string_match_all(p, a),
    "string_match_part": lambda p, a, s=None: string_match_part(p, a),
    "qa_f1_score": _best_of(qa_f1_score),
    "rouge_l_score": _best_of(rouge_l_score),
    "classification_score": _classification,
    "retrieval_score": _best_of(retrieval_score),
    "count_score": _best_of(count_score),
    "code_sim_score": _best_of(code_sim_score),
}


def score(sample: Sample, prediction: str) -> float:
    """Score one prediction for ``sample`` with its metric, in [0, 1]."""
    if sample.metric not in METRICS:
        raise ValueError(f"unknown metric {sample.metric!r}; known: {', '.join(METRICS)}")
    if sample.metadata.get("first_line_only"):
        # LongBench scores only the first line on its few-shot tasks (trec, triviaqa, samsum).
        prediction = prediction.lstrip("\n").split("\n")[0]
    value = METRICS[sample.metric](prediction, sample.answers, sample)
    return min(1.0, max(0.0, float(value)))
