"""Corpora: the built-in ``wiki`` corpus and the user's own text.

A corpus spec is ``NAME[:SPLIT]``:

- ``wiki:train``, ``wiki:heldout`` (``wiki`` alone takes the caller's default split);
- a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, in
  its ``text`` field), or a folder of such files (sorted, recursive). A user
  corpus is used whole unless a split is named, in which case the same rule as
  for wiki applies: every 10th document is held out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from irc.errors import UserError

SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 10


@dataclass(frozen=True)
class Corpus:
    name: str
    split: str
    documents: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.split}"

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    @property
    def characters(self) -> int:
        return sum(len(d) for d in self.documents)


def load_corpus(spec: str, default_split: str = "heldout") -> Corpus:
    """Documents of a corpus spec (see the module docstring)."""
    name, split = _parse_spec(spec)
    if name == "wiki":
        from irc.data.wiki import wiki_documents

        split = split or default_split
        if split == "all":
            docs = [d["text"] for s in ("train", "heldout") for d in wiki_documents(s)]
        else:
            docs = [d["text"] for d in wiki_documents(split)]
        return Corpus("wiki", split, tuple(docs))
    docs = read_user_documents(Path(name))
    split = split or "all"
    if split != "all":
        docs = [d for i, d in enumerate(docs) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == (split == "heldout")]
    if not docs:
        raise UserError(f"the corpus {name}:{split} holds no documents")
    return Corpus(name, split, tuple(docs))


def _parse_spec(spec: str) -> tuple[str, str | None]:
    if spec == "wiki" or Path(spec).exists():
        return spec, None
    name, sep, split = spec.rpartition(":")
    if sep and (name == "wiki" or Path(name).exists()):
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r} in {spec!r}; expected one of {', '.join(SPLITS)}")
        return name, split
    raise UserError(
        f"no such corpus: {spec!r} (expected wiki[:train|heldout], or a .txt file, a .jsonl "
        "file with a 'text' field, or a folder of them, optionally followed by :SPLIT)"
    )


def read_user_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise UserError(f"the folder {path} holds no .txt or .jsonl files")
        return [doc for f in files for doc in read_user_documents(f)]
    if path.suffix == ".txt":
        return [t] if (t := _read_text(path).strip()) else []
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    raise UserError(f"{path}: expected a .txt or .jsonl file (or a folder of them)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f"{path}:{lineno}: expected an object with a string 'text' field")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs
