"""The built-in ``wiki`` corpus: ~106 English Wikipedia articles, offline.

The articles ship inside the gensim 4.4.0 wheel on PyPI as test data (a
shortened 2016 enwiki dump). irc downloads the wheel once with
``pip download --no-deps`` (PyPI is reachable where hubs are not), reads the one
bz2 member without installing gensim, cleans each article to prose, and splits
by article: every 10th article (index 9, 19, ...) is held out. The result is
cached as two JSON-lines files; the split is deterministic.
"""

from __future__ import annotations

import bz2
import glob
import io
import json
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from irc.cache import atomic_dir, cache_dir
from irc.data.wikitext import clean_wikitext
from irc.errors import UserError

GENSIM_VERSION = "4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_EVERY = 10
# Bump when the cleaning or the split changes: the cache key follows it.
WIKI_VERSION = 1
SPLITS = ("train", "heldout")


def wiki_dir() -> Path:
    """The cached corpus directory (``train.jsonl``, ``heldout.jsonl``), built on first use."""
    final = cache_dir("data") / f"wiki-v{WIKI_VERSION}"
    if (final / "meta.json").is_file():
        return final
    articles = parse_dump(bz2.decompress(_read_member(gensim_wheel())))
    with atomic_dir(final) as tmp:
        splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
        kept = 0
        for title, wikitext in articles:
            text = clean_wikitext(wikitext)
            if not text:
                continue
            split = "heldout" if kept % HELDOUT_EVERY == HELDOUT_EVERY - 1 else "train"
            splits[split].append({"title": title, "text": text})
            kept += 1
        for split, docs in splits.items():
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        meta = {
            "source": f"PyPI gensim=={GENSIM_VERSION}: {MEMBER}",
            "wiki_version": WIKI_VERSION,
            "heldout_every": HELDOUT_EVERY,
            "documents": {s: len(d) for s, d in splits.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return final


def wiki_documents(split: str) -> list[dict]:
    if split not in SPLITS:
        raise UserError(f"the wiki corpus has splits {', '.join(SPLITS)} (or all), got {split!r}")
    path = wiki_dir() / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def parse_dump(xml_bytes: bytes) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace, non-redirect page, in dump order."""
    pages = []
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if not el.tag.endswith("}page"):
            continue
        ns = el.findtext("{*}ns")
        if ns == "0" and el.find("{*}redirect") is None:
            pages.append((el.findtext("{*}title") or "", el.findtext("{*}revision/{*}text") or ""))
        el.clear()
    return pages


def gensim_wheel() -> Path:
    """A gensim wheel in the download cache, fetched from PyPI once."""
    downloads = cache_dir("downloads")
    found = sorted(glob.glob(str(downloads / f"gensim-{GENSIM_VERSION}-*.whl")))
    if found:
        return Path(found[0])
    print(f"irc: downloading the gensim {GENSIM_VERSION} wheel (28 MB) for the wiki corpus",
          file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=downloads) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", f"gensim=={GENSIM_VERSION}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(str(Path(tmp) / "gensim-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download gensim=={GENSIM_VERSION} from PyPI for the wiki corpus "
                f"(pip said: {last}); put any gensim-{GENSIM_VERSION} wheel into {downloads} "
                "and retry"
            )
        final = downloads / Path(wheels[0]).name
        shutil.move(wheels[0], final)  # same filesystem: a rename
    return final


def _read_member(wheel: Path) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} is not a usable gensim {GENSIM_VERSION} wheel ({e}); "
                        "delete it and retry") from None
