"""LongBench loading (echokv_lab.eval.longbench) from small JSONL fixtures in the official format."""

from __future__ import annotations

import json

import pytest

from echokv_lab.eval.longbench import LONGBENCH_TASKS, load_longbench, split_template
from echokv_lab.eval.sample import SEPARATOR, prompt_ids

ENGLISH = ["narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "gov_report", "qmsum",
           "multi_news", "trec", "triviaqa", "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p"]


def _record(i: int, dataset: str, context: str = "Passage 1: Paris is the capital of France.", **extra) -> dict:
    record = {"input": f"What is the capital of France? ({i})", "context": context, "answers": ["Paris"],
              "length": len(context.split()), "dataset": dataset, "language": "en", "all_classes": None,
              "_id": f"id{i}"}
    record.update(extra)
    return record


def _write(folder, task: str, records: list, raw_lines: list[str] = ()) -> None:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def data(tmp_path):
    _write(tmp_path, "hotpotqa", [_record(i, "hotpotqa") for i in range(3)])
    _write(tmp_path, "trec", [_record(0, "trec", context="Question: Who is he?\nType: Human", input="Where is it?",
                                      answers=["Location"], all_classes=["Human", "Location"])])
    long_context = " ".join(f"w{i}" for i in range(3000))
    _write(tmp_path, "passage_retrieval_en", [_record(0, "passage_retrieval_en", context=long_context,
                                                      input="An abstract.", answers=["Paragraph 7"])])
    return tmp_path


def test_task_table_matches_longbench():
    assert list(LONGBENCH_TASKS) == ENGLISH
    maxlen = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "gov_report": 512,
              "multi_news": 512, "trec": 64, "samsum": 128, "passage_count": 32, "lcc": 64, "repobench-p": 64}
    for task, n in maxlen.items():
        assert LONGBENCH_TASKS[task].max_new_tokens == n
    assert LONGBENCH_TASKS["gov_report"].metric == "rouge_l_score"
    assert LONGBENCH_TASKS["trec"].metric == "classification_score"
    assert LONGBENCH_TASKS["lcc"].metric == "code_sim_score"
    assert {t for t, s in LONGBENCH_TASKS.items() if not s.chat} == {"trec", "triviaqa", "samsum", "lcc",
                                                                      "repobench-p"}
    assert split_template("Intro\n\n{context}\n\nQuestion: {input}\nAnswer:") == ("Intro\n\n{context}",
                                                                                  "Question: {input}\nAnswer:")


def test_template_applied(data):
    samples = load_longbench(data, tasks=["hotpotqa", "trec"])
    assert [s.task for s in samples] == ["hotpotqa"] * 3 + ["trec"]
    s = samples[0]
    official = LONGBENCH_TASKS["hotpotqa"].template.format(context="Passage 1: Paris is the capital of France.",
                                                           input="What is the capital of France? (0)")
    assert s.context + SEPARATOR + s.question == official  # blank line between context and question kept
    assert s.context.startswith("Answer the question based on the given passages.")
    assert s.context.endswith("Paris is the capital of France.")
    assert s.question.endswith("Question: What is the capital of France? (0)\nAnswer:")
    assert (s.answers, s.metric, s.max_new_tokens) == (["Paris"], "qa_f1_score", 32)
    assert s.metadata["_id"] == "id0" and s.metadata["use_chat_template"] and not s.metadata["truncated"]
    trec = samples[-1]
    assert trec.question == "Where is it?" and trec.context.endswith("Type: Human")
    assert trec.metadata["all_classes"] == ["Human", "Location"]
    assert not trec.metadata["use_chat_template"] and trec.metadata["first_line_only"]


def test_limit_and_single_task_name(data):
    assert len(load_longbench(data, tasks="hotpotqa", limit=2)) == 2


def test_middle_truncation(data, smollm2_tokenizer):
    tok = smollm2_tokenizer
    (full,) = load_longbench(data, tasks=["passage_retrieval_en"], tokenizer=tok)
    assert full.context_length > 3000 and not full.metadata["truncated"]
    (s,) = load_longbench(data, tasks=["passage_retrieval_en"], tokenizer=tok, max_prompt_tokens=200)
    assert s.metadata["truncated"]
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (s.context, s.question))
    assert 190 <= n_tokens <= 202 and s.context_length == n_tokens
    assert s.question == full.question  # the question sits in the kept last half
    assert s.context.startswith("Here are 30 paragraphs from Wikipedia")  # first half kept
    assert s.context.endswith(" w2999") and "w1500" not in s.context  # last half kept, middle gone
    # The model sees the truncated prompt through the chat template.
    context_ids, question_ids = prompt_ids(tok, s)
    assert len(context_ids) + len(question_ids) < 260


def test_missing_folder_says_where_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_longbench(tmp_path / "nowhere")
    message = str(err.value)
    assert "nowhere" in message and "THUDM/LongBench" in message and "data.zip" in message
    assert "--data" in message


def test_missing_task_file(data):
    with pytest.raises(ValueError, match=r"missing: .*qasper\.jsonl"):
        load_longbench(data, tasks=["hotpotqa", "qasper"])
    with pytest.raises(ValueError, match="narrativeqa.jsonl"):
        load_longbench(data)  # all 16 English tasks by default


def test_unknown_task(data):
    with pytest.raises(ValueError, match="unknown LongBench task.*dureader_en.*known: narrativeqa"):
        load_longbench(data, tasks=["dureader_en"])


def test_malformed_json_line(tmp_path):
    _write(tmp_path, "hotpotqa", [_record(0, "hotpotqa")], raw_lines=['{"input": "broken'])
    with pytest.raises(ValueError, match=r"hotpotqa\.jsonl, line 2: not valid JSON"):
        load_longbench(tmp_path, tasks=["hotpotqa"])


def test_missing_field(tmp_path):
    bad = _record(2, "qasper")
    del bad["answers"], bad["_id"]
    _write(tmp_path, "qasper", [_record(0, "qasper"), _record(1, "qasper"), bad])
    with pytest.raises(ValueError, match=r"qasper\.jsonl, line 3: missing field\(s\) answers, _id"):
        load_longbench(tmp_path, tasks=["qasper"])


def test_wrong_types_and_empty_file(tmp_path):
    _write(tmp_path, "musique", [_record(0, "musique", answers="Paris")])
    with pytest.raises(ValueError, match=r"musique\.jsonl, line 1: 'answers' must be a list"):
        load_longbench(tmp_path, tasks=["musique"])
    (tmp_path / "lcc.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no samples"):
        load_longbench(tmp_path, tasks=["lcc"])


def test_truncation_needs_tokenizer(data):
    with pytest.raises(ValueError, match="tokenizer"):
        load_longbench(data, tasks=["hotpotqa"], max_prompt_tokens=100)
