"""LongBench (Bai et al. 2023, "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding", arXiv 2308.14508) from local files.

The data is the official ``data.zip`` of the ``THUDM/LongBench`` dataset on the Hugging Face Hub:
one ``<dataset>.jsonl`` per task, each line a JSON object with the fields ``input``, ``context``,
``answers``, ``length``, ``dataset``, ``language``, ``all_classes`` and ``_id``. The 16 English tasks
are supported with LongBench's own prompt templates (``config/dataset2prompt.json``), generation
lengths (``config/dataset2maxlen.json``) and metrics (``eval.py``).

Context / question split: every template is cut right after its ``{context}`` placeholder. The
``context`` of a :class:`Sample` is the template text up to and including the document(s); its
``question`` is the rest (the repeated instruction, ``{input}`` and the final "Answer:" cue), with
leading newlines dropped because :func:`echokv_lab.eval.sample.prompt_ids` joins the two with a blank
line. For most templates this is exactly the official prompt; for ``trec``, ``lcc`` and
``repobench-p`` (no blank line in the original) the join adds one. A compressed KV cache thus holds
the documents, and the question comes after compression, as in the kvpress protocol.

As LongBench's ``pred.py``, over-long prompts are cut in the middle (first and last
``max_prompt_tokens // 2`` tokens kept, chat template not counted), and the few-shot and code tasks
(trec, triviaqa, samsum, lcc, repobench-p) are not wrapped in the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from echokv_lab.eval.sample import Sample

DOWNLOAD_HINT = (
    "download data.zip of the THUDM/LongBench dataset on the Hugging Face Hub "
    "(https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), unzip it and pass the "
    "folder holding the <dataset>.jsonl files with --data"
)

REQUIRED_FIELDS = ("input", "context", "answers", "length", "dataset", "language", "all_classes", "_id")


@dataclass(frozen=True)
class LongBenchTask:
    """Template (with ``{context}`` and optionally ``{input}``), generation length and metric of a task."""

    template: str
    max_new_tokens: int
    metric: str
    chat: bool = True  # False: LongBench feeds the raw prompt even to chat models
    first_line_only: bool = False  # LongBench scores only the first line of the prediction


_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_MULTIHOP = f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:"
_QASPER = (
    "Answer the question as concisely as you can, using a single phrase or sentence if possible. If the "
    "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
    "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation."
)

LONGBENCH_TASKS: dict[str, LongBenchTask] = {
    "narrativeqa": LongBenchTask(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
        "question as concisely as you can, using a single phrase if possible. Do not provide any "
        "explanation.\n\nStory: {context}\n\nNow, answer the question based on the story as concisely as you "
        "can, using a single phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1_score"),
    "qasper": LongBenchTask(
        f"You are given a scientific article and a question. {_QASPER}\n\nArticle: {{context}}\n\n "
        f"{_QASPER.replace('Answer the question as', 'Answer the question based on the above article as')}"
        "\n\nQuestion: {input}\n\nAnswer:",
        128, "qa_f1_score"),
    "multifieldqa_en": LongBenchTask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based "
        "on the above text, only give me the answer and do not output any other words.\n\nQuestion: "
        "{input}\nAnswer:",
        64, "qa_f1_score"),
    "hotpotqa": LongBenchTask(_MULTIHOP, 32, "qa_f1_score"),
    "2wikimqa": LongBenchTask(_MULTIHOP, 32, "qa_f1_score"),
    "musique": LongBenchTask(_MULTIHOP, 32, "qa_f1_score"),
    "gov_report": LongBenchTask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512, "rouge_l_score"),
    "qmsum": LongBenchTask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
        "in one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above "
        "meeting transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512, "rouge_l_score"),
    "multi_news": LongBenchTask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512, "rouge_l_score"),
    "trec": LongBenchTask(
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n"
        "{input}",
        64, "classification_score", chat=False, first_line_only=True),
    "triviaqa": LongBenchTask(
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}",
        32, "qa_f1_score", chat=False, first_line_only=True),
    "samsum": LongBenchTask(
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n"
        "{input}",
        128, "rouge_l_score", chat=False, first_line_only=True),
    "passage_count": LongBenchTask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
        "carefully read these paragraphs and determine how many unique paragraphs there are after removing "
        "duplicates. In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\n"
        "Please enter the final count of unique paragraphs after removing duplicates. The output format should "
        "only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32, "count_score"),
    "passage_retrieval_en": LongBenchTask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        "of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
        "\"Paragraph 2\", etc.\n\nThe answer is: ",
        32, "retrieval_score"),
    "lcc": LongBenchTask(
        "Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim_score", chat=False),
    "repobench-p": LongBenchTask(
        "Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim_score",
        chat=False),
}


def split_template(template: str) -> tuple[str, str]:
    """Cut a template after ``{context}``: (context part, question part without leading newlines)."""
    cut = template.index("{context}") + len("{context}")
    return template[:cut], template[cut:].lstrip("\n")


def _record_problem(record) -> str | None:
    """What is wrong with one parsed line of a LongBench file, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    answers = record["answers"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        return "'answers' must be a list of strings"
    if not isinstance(record["context"], str) or not isinstance(record["input"], str):
        return "'context' and 'input' must be strings"
    return None


def _read_jsonl(path: Path) -> list[dict]:
    """Parse and validate a LongBench file; errors name the file and the line."""
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            problem = _record_problem(record)
            if problem:
                raise ValueError(f"{path}, line {lineno}: {problem}")
            records.append(record)
    if not records:
        raise ValueError(f"{path} holds no samples")
    return records


def truncate_middle(tokenizer, context: str, question: str, max_tokens: int) -> tuple[str, str, bool]:
    """Cut the middle of ``context + question`` to ``max_tokens`` tokens, as LongBench's ``pred.py``.

    The first and last ``max_tokens // 2`` tokens are kept and decoded (special tokens skipped); a part
    that lies wholly in the kept head or tail is returned unchanged. Returns (context, question, cut).
    """
    c = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    q = list(tokenizer(question, add_special_tokens=False)["input_ids"])
    ids, k = c + q, len(c)
    n = len(ids)
    if n <= max_tokens:
        return context, question, False
    half = max_tokens // 2
    head_end, tail_start = half, n - half

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True, clean_up_tokenization_spaces=False) if part else ""

    def kept(lo: int, hi: int, original: str) -> str:
        if hi <= head_end or lo >= tail_start:
            return original
        return decode(ids[lo:min(hi, head_end)]) + decode(ids[max(lo, tail_start):hi])

    return kept(0, k, context), kept(k, n, question), True


def load_longbench(folder, tasks=None, tokenizer=None, max_prompt_tokens: int | None = None,
                   limit: int | None = None) -> list[Sample]:
    """Load LongBench tasks from ``folder`` (``<dataset>.jsonl`` files) as :class:`Sample` objects.

    ``tasks`` defaults to the 16 English tasks of :data:`LONGBENCH_TASKS`; ``limit`` keeps the first
    samples of each task. With ``max_prompt_tokens`` (needs ``tokenizer``) longer prompts are cut in
    the middle. Every file is read and validated here, before any model work: a missing folder raises
    :class:`FileNotFoundError` saying where to get the data, a missing file or a malformed line a
    :class:`ValueError` naming the file and line. ``Sample.context_length`` is the prompt's token
    count (without chat template) when a tokenizer is given, else the dataset's ``length`` field.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"LongBench data folder {folder} not found: {DOWNLOAD_HINT}")
    names = list(LONGBENCH_TASKS) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    unknown = [t for t in names if t not in LONGBENCH_TASKS]
    if unknown:
        raise ValueError(f"unknown LongBench task(s) {', '.join(unknown)}; known: {', '.join(LONGBENCH_TASKS)}")
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError("max_prompt_tokens needs a tokenizer to count tokens")
    paths = {t: folder / f"{t}.jsonl" for t in names}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ValueError(f"LongBench task file(s) missing: {', '.join(missing)}; {DOWNLOAD_HINT}")

    samples = []
    for task in names:
        spec = LONGBENCH_TASKS[task]
        context_part, question_part = split_template(spec.template)
        records = _read_jsonl(paths[task])
        for record in records[:limit] if limit is not None else records:
            context = context_part.replace("{context}", record["context"])
            question = question_part.replace("{input}", record["input"])
            cut = False
            if max_prompt_tokens is not None:
                context, question, cut = truncate_middle(tokenizer, context, question, max_prompt_tokens)
            if tokenizer is not None:
                length = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (context, question))
            else:
                length = int(record["length"])
            samples.append(Sample(
                task=task, context=context, question=question, answers=list(record["answers"]),
                context_length=length, metric=spec.metric, max_new_tokens=spec.max_new_tokens,
                metadata={
                    "_id": record["_id"], "length": record["length"], "language": record["language"],
                    "all_classes": record["all_classes"] or [], "truncated": cut,
                    "use_chat_template": spec.chat, "first_line_only": spec.first_line_only,
                },
            ))
    return samples
