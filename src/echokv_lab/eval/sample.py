"""One evaluation example and how it becomes model input.

A :class:`Sample` keeps the long *context* apart from the *question*: KV-cache compression methods
(EchoKV, arXiv 2603.22910, and the baselines it is compared with) compress the cache of the context
and then answer a question they did not see while compressing, as in the kvpress protocol.
:func:`prompt_ids` turns a sample into the token ids of exactly one prompt string, split in two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Between the context and the question in the user message.
SEPARATOR = "\n\n"


@dataclass
class Sample:
    """One example of a task (RULER, LongBench, ...).

    ``context_length`` is the requested prompt length in tokens (RULER) or the dataset's own length
    field (LongBench); ``depth`` is the needle depth in [0, 1] for needle-in-a-haystack tasks;
    ``metric`` names a function of :data:`echokv_lab.eval.metrics.METRICS`. ``metadata`` holds
    task-specific extras; two keys change behaviour: ``use_chat_template`` (False: never wrap in the
    chat template, as LongBench does for its few-shot and code tasks) and ``first_line_only``
    (score only the first line of the prediction, as LongBench does for trec/triviaqa/samsum).
    """

    task: str
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    context_length: int = 0
    depth: float | None = None
    metric: str = "string_match_all"
    max_new_tokens: int = 32
    metadata: dict = field(default_factory=dict)


def _uses_chat_template(tokenizer, sample: Sample) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and sample.metadata.get("use_chat_template", True)


def format_prompt(tokenizer, sample: Sample) -> tuple[str, int]:
    """Return ``(prompt_text, split)``: the whole prompt and the character where the question starts.

    With a chat template the user message is ``context + "\\n\\n" + question``, rendered with
    ``add_generation_prompt=True``, then ``answer_prefix`` is appended after the assistant header.
    Without one the prompt is ``context\\n\\nquestion answer_prefix``.
    """
    user = sample.context + SEPARATOR + sample.question
    if _uses_chat_template(tokenizer, sample):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        text += sample.answer_prefix
    else:
        text = user + (" " + sample.answer_prefix if sample.answer_prefix else "")
    return text, _question_start(text, sample)


def _question_start(text: str, sample: Sample) -> int:
    # rfind: the question follows the context, which may itself quote the question's words.
    # Templates may trim the message, so search stripped strings.
    question = sample.question.strip()
    if question:
        start = text.rfind(question)
        if start >= 0:
            return start
    context = sample.context.strip()
    start = text.find(context) if context else -1
    if start < 0:
        raise ValueError(f"cannot locate the question of a {sample.task!r} sample in its rendered prompt")
    return start + len(context)


def _bos_prefix(tokenizer, text: str) -> list[int]:
    """The BOS id if the tokenizer adds one itself and the text does not already start with it."""
    bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos_id is None or (bos and text.startswith(bos)):
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos_id] if probe and probe[0] == bos_id else []


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a whole prompt string: no special tokens added except a leading BOS."""
    return _bos_prefix(tokenizer, text) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_length(tokenizer, sample: Sample) -> int:
    """Number of prompt tokens of ``sample`` (``len(context_ids) + len(question_ids)``)."""
    return len(encode(tokenizer, format_prompt(tokenizer, sample)[0]))


def prompt_ids(tokenizer, sample: Sample) -> tuple[list[int], list[int]]:
    """Return ``(context_ids, question_ids)`` with ``context_ids + question_ids == encode(prompt)``.

    The prompt text is split at the character where the question starts; the context part
    (with the chat template's header and a BOS the tokenizer adds) is tokenized on its own, and the
    split point is its longest common prefix with the ids of the whole prompt, so that a token that
    merges across the boundary goes to the question part and the concatenation is exact.
    The question part also holds the chat template's assistant header and the answer prefix.
    """
    text, split = format_prompt(tokenizer, sample)
    full = encode(tokenizer, text)
    head = encode(tokenizer, text[:split])
    k = 0
    for a, b in zip(head, full):
        if a != b:
            break
        k += 1
    return full[:k], full[k:]
