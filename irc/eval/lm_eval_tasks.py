"""Offline lm-eval tasks built from irc's own corpora: no download, no hub.

- ``irc_wiki_rolling``: rolling word/byte perplexity over whole documents of a
  corpus (default ``wiki:heldout``), the harness's ``wikitext`` protocol;
- ``irc_lastword``: last-word prediction on passages of the same documents, the
  LAMBADA protocol (``lambada_openai``'s prompt and metrics);
- ``mc:/path/file.jsonl``: the user's multiple choice (``question``, ``choices``,
  ``label``), task name ``irc_mc_<file stem>``.

The YAMLs live beside this module (``tasks/``). At run time irc writes the data
as JSONL under its cache (``lm-eval/``, atomically, keyed by the corpus's
fingerprint) and the YAMLs, with absolute ``data_files`` (the harness resolves
relative ones against the working directory), into a temporary include
directory for lm-eval's ``TaskManager``. Any other task name passes through to
lm-eval. When every task is irc's own, ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE`` are set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from irc.cache import atomic_file, cache_dir
from irc.errors import UserError

TEMPLATES = Path(__file__).parent / "tasks"
OWN_TASKS = ("irc_wiki_rolling", "irc_lastword")
MC_PREFIX = "mc:"
# Bump when passages or files change: the cache key follows it.
TASKS_VERSION = 1
# LAMBADA passages are a few sentences (~80 words on average): a passage here is whole
# sentences of one paragraph, at least MIN_WORDS, at most MAX_WORDS, ending in a word of letters.
MIN_WORDS = 40
MAX_WORDS = 150
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@dataclass(frozen=True)
class BuiltTasks:
    names: list[str]  # the names to pass to lm-eval, in the order asked
    own: list[str]  # those built here (the rest pass through)
    files: dict[str, str]  # task name → data file
    corpus: str  # the corpus spec irc's own tasks were built from


def is_own(task: str) -> bool:
    return task in OWN_TASKS or task.startswith(MC_PREFIX)


def build_tasks(tasks: list[str], include_dir: Path, *, corpus: str = "wiki:heldout") -> BuiltTasks:
    """Write the YAMLs of irc's own tasks among ``tasks`` into ``include_dir`` (their data into the cache)."""
    names, own, files = [], [], {}
    documents = None
    for task in tasks:
        if task.startswith(MC_PREFIX):
            name, data = _mc_file(Path(task[len(MC_PREFIX):]).expanduser())
            template = "irc_mc"
        elif task in OWN_TASKS:
            if documents is None:
                from irc.data import load_corpus

                documents = load_corpus(corpus, default_split="heldout")
            name, template = task, task
            data = _rolling_file(documents) if task == "irc_wiki_rolling" else _lastword_file(documents)
        else:
            names.append(task)
            continue
        if name in files:
            raise UserError(f"the task {name} is asked twice; give each task once")
        text = (TEMPLATES / f"{template}.yaml").read_text()
        for key, value in (("@TASK@", name), ("@DATA_FILE@", json.dumps(str(data))),
                           ("@CACHE_DIR@", json.dumps(str(cache_dir("lm-eval", "datasets"))))):
            text = text.replace(key, value)
        (include_dir / f"{name}.yaml").write_text(text)
        names.append(name)
        own.append(name)
        files[name] = str(data)
    if own and len(own) == len(names):
        # the json builder reads local files: irc's own tasks need no network. A task passed
        # through to lm-eval may need a download, so with one of those the variables are left alone.
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    return BuiltTasks(names=names, own=own, files=files, corpus=corpus if documents is not None else "")


def lastword_passages(text: str) -> list[str]:
    """LAMBADA-style passages of one document: whole sentences of a paragraph, whitespace made single
    spaces, the final punctuation dropped so that the last word is the target."""
    passages = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        words: list[str] = []
        for word in paragraph.split():
            words.append(word)
            if len(words) > MAX_WORDS:
                words = []  # a run-on without a usable end: start again at the next word
                continue
            if not _SENTENCE_END.search(word) or len(words) < MIN_WORDS:
                continue
            last = _SENTENCE_END.sub("", word)
            if len(last) >= 2 and last.isalpha():
                passages.append(" ".join([*words[:-1], last]))
            words = []
    return passages


def _rolling_file(corpus) -> Path:
    return _write_jsonl(f"rolling-v{TASKS_VERSION}-{corpus.fingerprint[:16]}",
                        ({"text": doc} for doc in corpus.documents))


def _lastword_file(corpus) -> Path:
    rows = [{"text": p} for doc in corpus.documents for p in lastword_passages(doc)]
    if not rows:
        raise UserError(f"{corpus.spec} has no passage of {MIN_WORDS}-{MAX_WORDS} words ending a sentence; "
                        "irc_lastword needs prose")
    return _write_jsonl(f"lastword-v{TASKS_VERSION}-{corpus.fingerprint[:16]}", rows)


def _mc_file(path: Path) -> tuple[str, Path]:
    """Check a user's multiple-choice JSONL (every line, before any model runs) and cache a copy."""
    if not path.is_file():
        raise UserError(f"no such multiple-choice file: {path} (expected --tasks mc:/path/file.jsonl)")
    raw = path.read_bytes()
    rows = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where} is not JSON ({e})") from None
        ok = (isinstance(row, dict) and isinstance(row.get("question"), str)
              and isinstance(row.get("choices"), list) and len(row["choices"]) >= 2
              and all(isinstance(c, str) for c in row["choices"]))
        if not ok:
            raise UserError(f"{where}: expected {{\"question\": str, \"choices\": [str, str, ...], \"label\": int}}")
        label = row.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(row["choices"]):
            raise UserError(f"{where}: label must be the index of the right choice (0 to "
                            f"{len(row['choices']) - 1}), got {label!r}")
        rows.append({"question": row["question"], "choices": row["choices"], "label": label})
    if not rows:
        raise UserError(f"{path} holds no questions")
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", path.stem).strip("_") or "file"
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f"irc_mc_{stem}", _write_jsonl(f"mc-v{TASKS_VERSION}-{digest}", rows)


def _write_jsonl(key: str, rows) -> Path:
    path = cache_dir("lm-eval") / f"{key}.jsonl"
    if not path.is_file():
        with atomic_file(path, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
