"""RULER generators and prompt_ids (echokv_lab.eval.ruler, echokv_lab.eval.sample) with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pydoc_data.topics
import re
from collections import Counter

import pytest

from echokv_lab.eval.metrics import score
from echokv_lab.eval.ruler import RULER_TASKS, generate, insert_at_depths
from echokv_lab.eval.sample import Sample, encode, format_prompt, prompt_ids

# Real English prose from the standard library, standing in for echokv's default haystack text.
PROSE = " ".join(pydoc_data.topics.topics.values())


def _total_tokens(tokenizer, sample: Sample) -> int:
    context_ids, question_ids = prompt_ids(tokenizer, sample)
    return len(context_ids) + len(question_ids)


# --- prompt_ids -------------------------------------------------------------------------------


def _check_split(tokenizer, sample: Sample) -> None:
    text, split = format_prompt(tokenizer, sample)
    context_ids, question_ids = prompt_ids(tokenizer, sample)
    assert context_ids + question_ids == encode(tokenizer, text)
    assert tokenizer.decode(context_ids + question_ids, skip_special_tokens=False) == text
    assert text[split:].startswith(sample.question)
    assert context_ids and question_ids
    # The question part decodes to the question (plus the template tail and answer prefix).
    assert sample.question in tokenizer.decode(question_ids, skip_special_tokens=False)


def test_prompt_ids_with_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.chat_template
    sample = Sample(task="t", context="Alice lives in Paris. Bob lives in Rome.", question="Where does Bob live?",
                    answers=["Rome"], answer_prefix="Bob lives in")
    _check_split(tok, sample)
    text, _ = format_prompt(tok, sample)
    assert "Alice lives in Paris. Bob lives in Rome.\n\nWhere does Bob live?" in text
    assert text.endswith("assistant\nBob lives in")
    _, question_ids = prompt_ids(tok, sample)
    assert tok.decode(question_ids).endswith("Bob lives in")


def test_prompt_ids_without_chat_template(smollm2_tokenizer, monkeypatch):
    sample = Sample(task="t", context="Some context.", question="What?", answers=["x"], answer_prefix="Answer:")
    plain = Sample(**{**sample.__dict__, "metadata": {"use_chat_template": False}})
    text, _ = format_prompt(smollm2_tokenizer, plain)
    assert text == "Some context.\n\nWhat? Answer:"
    _check_split(smollm2_tokenizer, plain)
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", None)
    assert format_prompt(smollm2_tokenizer, sample)[0] == "Some context.\n\nWhat? Answer:"
    _check_split(smollm2_tokenizer, sample)


@pytest.mark.parametrize("task", ["niah_single_2", "vt", "cwe", "fwe"])
def test_prompt_ids_of_generated_samples(smollm2_tokenizer, task):
    (sample,) = generate(task, smollm2_tokenizer, 1000, 1, haystack_text=PROSE)
    _check_split(smollm2_tokenizer, sample)


# --- lengths, determinism, content ------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 1000, 2000])
@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1",
                                  "niah_multivalue", "niah_multiquery"])
def test_niah_prompt_length(smollm2_tokenizer, task, length):
    samples = generate(task, smollm2_tokenizer, length, 2, seed=1, haystack_text=PROSE)
    for s in samples:
        assert abs(_total_tokens(smollm2_tokenizer, s) - length) <= 0.02 * length
        assert s.context_length == length and s.max_new_tokens == 128


@pytest.mark.parametrize("length", [1000, 2000])
@pytest.mark.parametrize("task", ["vt", "cwe", "fwe"])
def test_other_tasks_prompt_length(smollm2_tokenizer, task, length):
    samples = generate(task, smollm2_tokenizer, length, 2, seed=3)
    for s in samples:
        assert abs(_total_tokens(smollm2_tokenizer, s) - length) <= 0.02 * length


@pytest.mark.parametrize("task", list(RULER_TASKS))
def test_deterministic_per_seed_and_different_across_seeds(smollm2_tokenizer, task):
    a = generate(task, smollm2_tokenizer, 1000, 2, seed=7, haystack_text=PROSE)
    b = generate(task, smollm2_tokenizer, 1000, 2, seed=7, haystack_text=PROSE)
    c = generate(task, smollm2_tokenizer, 1000, 2, seed=8, haystack_text=PROSE)
    assert [(s.context, s.question, s.answers) for s in a] == [(s.context, s.question, s.answers) for s in b]
    assert [s.answers for s in a] != [s.answers for s in c]
    assert a[0].answers != a[1].answers  # samples of one call differ too


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_1"])
@pytest.mark.parametrize("length", [1000, 2000])
def test_needle_at_requested_depth(smollm2_tokenizer, task, length):
    depths = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    samples = generate(task, smollm2_tokenizer, length, len(depths), seed=2, depths=depths, haystack_text=PROSE)
    for s, depth in zip(samples, depths):
        assert s.depth == depth
        haystack = s.context.split("\n", 1)[1]  # after the task's one-line introduction
        needle = next(n for n in s.metadata["needles"] if s.answers[0] in n)
        others = [n for n in s.metadata["needles"] if n != needle]
        for other in others:  # distractor needles of multikey do not count as haystack
            haystack = haystack.replace(other + " ", "").replace(" " + other, "")
        position = haystack.index(needle)
        plain_length = len(haystack) - len(needle) - 1
        assert abs(position / plain_length - depth) <= 0.05, (task, depth, position / plain_length)


def test_default_depths_evenly_spaced(smollm2_tokenizer):
    samples = generate("niah_single_1", smollm2_tokenizer, 500, 5)
    assert [s.depth for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(s.depth is None for s in generate("niah_multivalue", smollm2_tokenizer, 500, 2, haystack_text=PROSE))


def test_niah_content_and_scoring(smollm2_tokenizer):
    (s,) = generate("niah_single_1", smollm2_tokenizer, 1000, 1, depths=[0.5])
    (value,) = s.answers
    assert re.fullmatch(r"\d{7}", value)
    key = s.metadata["queried_keys"][0]
    assert f"One of the special magic numbers for {key} is: {value}." in s.context
    assert "The grass is green. The sky is blue." in s.context
    assert key in s.question and s.answer_prefix.endswith("is")
    assert s.metric == "string_match_all"
    assert score(s, f"The special magic number is {value}.") == 1.0
    assert score(s, "I do not know.") == 0.0

    (multi,) = generate("niah_multivalue", smollm2_tokenizer, 1000, 1, haystack_text=PROSE)
    assert len(multi.answers) == 4 and all(v in multi.context for v in multi.answers)
    assert score(multi, " ".join(multi.answers[:2])) == 0.5
    (word,) = generate("niah_single_3", smollm2_tokenizer, 600, 1, haystack_text=PROSE)
    assert re.fullmatch(r"[a-z]+-[a-z]+", word.answers[0]) and word.answers[0] in word.context


def test_vt_cwe_fwe_content(smollm2_tokenizer):
    (vt,) = generate("vt", smollm2_tokenizer, 1000, 1)
    main = vt.context.split("\n\n")[-1]  # after the one-shot example
    value = vt.metadata["value"]
    first, *rest = vt.answers
    chain = [f"VAR {first} = {value}."] + [f"VAR {v} = VAR {p}." for p, v in zip(vt.answers, rest)]
    positions = [main.index(statement) for statement in chain]  # all there, in chain order
    assert len(vt.answers) == 5 and positions == sorted(positions)
    assert value in vt.question

    (cwe,) = generate("cwe", smollm2_tokenizer, 1000, 1)
    listing = cwe.context.split("\n")[-1]
    counts = Counter(re.findall(r"\d+\. ([a-z]+)", listing))
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(cwe.answers)
    assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)

    (fwe,) = generate("fwe", smollm2_tokenizer, 1000, 1)
    counts = Counter(w for w in fwe.context.split() if re.fullmatch(r"[a-z]{6}", w))
    assert sorted(w for w, _ in counts.most_common(3)) == sorted(fwe.answers)
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]


# --- errors -----------------------------------------------------------------------------------


def test_unknown_task_lists_known_tasks(smollm2_tokenizer):
    with pytest.raises(ValueError, match="unknown RULER task 'nope'.*niah_single_1.*fwe"):
        generate("nope", smollm2_tokenizer, 1000, 1)


def test_too_short_context_length(smollm2_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        generate("cwe", smollm2_tokenizer, 300, 1)
    with pytest.raises(ValueError, match="too short"):
        generate("niah_single_1", smollm2_tokenizer, 50, 1)


def test_prose_haystack_required(smollm2_tokenizer):
    with pytest.raises(ValueError, match="haystack_text"):
        generate("niah_single_2", smollm2_tokenizer, 1000, 1)


def test_bad_depths(smollm2_tokenizer):
    with pytest.raises(ValueError, match="depths"):
        generate("niah_single_1", smollm2_tokenizer, 1000, 1, depths=[1.5])


def test_insert_at_depths_sentence_boundaries():
    text = " ".join(f"Sentence number {i} is here." for i in range(100))
    out, placed = insert_at_depths(text, [(0.5, "NEEDLE."), (0.0, "FIRST."), (1.0, "LAST.")])
    assert out.startswith("FIRST. Sentence number 0") and out.endswith("is here. LAST.")
    assert "is here. NEEDLE. Sentence number" in out
    assert abs(placed[0] - 0.5) < 0.02 and placed[1] == 0.0 and placed[2] == 1.0
