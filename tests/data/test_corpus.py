import json

import pytest

from irc.data import load_corpus
from irc.errors import UserError


def test_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("Document one.\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "Doc two."}) + "\n\n" + json.dumps({"text": "Doc three.", "id": 3}) + "\n"
    )
    assert load_corpus(str(tmp_path / "a.txt")).documents == ("Document one.",)
    assert load_corpus(str(tmp_path / "b.jsonl")).documents == ("Doc two.", "Doc three.")
    folder = load_corpus(str(tmp_path))
    assert folder.documents == ("Document one.", "Doc two.", "Doc three.")
    assert folder.split == "all"


def test_splits_hold_out_every_tenth(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(25)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    held = load_corpus(f"{tmp_path / 'c.jsonl'}:heldout")
    train = load_corpus(f"{tmp_path / 'c.jsonl'}:train")
    assert held.documents == ("doc 9", "doc 19")
    assert len(train.documents) == 23 and "doc 9" not in train.documents


def test_fingerprint_changes_with_text(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    a = load_corpus(str(f)).fingerprint
    f.write_text("two")
    assert load_corpus(str(f)).fingerprint != a


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\nnot json\n', r"b.jsonl:2: not valid JSON"),
        ('{"body": "x"}\n', r"b.jsonl:1: expected an object with a string 'text' field"),
        ("\n\n", r"holds no documents"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        load_corpus(str(tmp_path / "b.jsonl"))


def test_errors(tmp_path):
    with pytest.raises(UserError, match="no such corpus"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_corpus("wiki:dev")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="expected a .txt or .jsonl"):
        load_corpus(str(tmp_path / "x.csv"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        load_corpus(str(tmp_path / "bin.txt"))
