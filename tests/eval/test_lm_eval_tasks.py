"""irc's offline lm-eval tasks: passages, the checked multiple-choice file, YAMLs with absolute paths."""

from __future__ import annotations

import json

import pytest

from irc.errors import UserError
from irc.eval.lm_eval_tasks import MAX_WORDS, MIN_WORDS, build_tasks, lastword_passages

SENTENCE = "Ada wrote the first program for the engine that Babbage designed in London."  # 13 words


def test_lastword_passages_are_whole_sentences_ending_in_a_word():
    text = " ".join([SENTENCE] * 3) + " It ended in 1843.\n" + " ".join([SENTENCE] * 4)
    passages = lastword_passages(text)
    # the first paragraph's 43 words end in a number (no target); the second's fourth sentence ends it
    assert passages == [" ".join([SENTENCE] * 4)[:-1]]
    for p in passages:
        assert MIN_WORDS <= len(p.split()) <= MAX_WORDS
        assert p.split(" ")[-1].isalpha()  # the target: a word without its full stop
        assert "  " not in p and "\n" not in p


def test_no_passage_from_short_paragraphs():
    assert lastword_passages(SENTENCE + "\n" + SENTENCE) == []


def test_build_writes_absolute_data_files(tmp_path, monkeypatch):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": " ".join([SENTENCE] * 5)}) + "\n")
    include = tmp_path / "include"
    include.mkdir()
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # restored after the test
        monkeypatch.delenv(name, raising=False)
    built = build_tasks(["irc_wiki_rolling", "irc_lastword", "hellaswag"], include, corpus=str(corpus))
    import os

    assert "HF_DATASETS_OFFLINE" not in os.environ  # hellaswag may need a download
    assert built.names == ["irc_wiki_rolling", "irc_lastword", "hellaswag"]  # others pass through
    assert built.own == ["irc_wiki_rolling", "irc_lastword"]
    for name in built.own:
        yaml = (include / f"{name}.yaml").read_text()
        assert "@" not in yaml.split("dataset_kwargs")[1].split("output_type")[0]
        assert json.dumps(built.files[name]) in yaml and built.files[name].startswith("/")
    rows = [json.loads(line) for line in open(built.files["irc_lastword"])]
    assert len(rows) == 1 and rows[0]["text"].endswith("London")
    # built once: the cached file is reused; irc's own tasks alone go offline
    again = build_tasks(["irc_lastword"], include, corpus=str(corpus))
    assert again.files == {"irc_lastword": built.files["irc_lastword"]}
    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "label": 2}', "label must be the index"),
    ('{"question": "q", "choices": ["a"], "label": 0}', "expected {"),
    ('{"question": "q", "choices": ["a", "b"], "label": true}', "label must be the index"),
    ("not json", "is not JSON"),
])
def test_mc_file_is_checked_line_by_line(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "label": 1}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as e:
        build_tasks([f"mc:{path}"], tmp_path)
    assert f"{path}:2" in str(e.value)


def test_mc_task_name_and_copy(tmp_path):
    path = tmp_path / "my-quiz.v2.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "label": 1, "extra": 3}\n')
    built = build_tasks([f"mc:{path}"], tmp_path)
    assert built.names == ["irc_mc_my_quiz_v2"]
    assert json.loads(open(built.files["irc_mc_my_quiz_v2"]).readline()) == {"question": "q", "choices": ["a", "b"],
                                                                            "label": 1}
