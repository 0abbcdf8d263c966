"""MediaWiki markup to plain prose.

The rules follow gensim's ``filter_wiki`` in spirit, written anew: drop
comments, references, templates, tables, files and categories; keep the
visible text of links; drop headings, list and table lines; stop at the
trailing reference sections ("References", "See also", ...). What is left is
the running prose of the article, paragraphs separated by a blank line.
"""

from __future__ import annotations

import html
import re

# Sections after which an article holds no more prose.
TAIL_SECTIONS = {
    "references",
    "see also",
    "external links",
    "notes",
    "footnotes",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "notes and references",
    "references and notes",
    "works cited",
}

# Link namespaces whose target is not running text.
_DROP_LINK_PREFIX = re.compile(
    r"\[\[\s*(?:file|image|category|media|wikipedia|wp|template|help|portal|special|"
    r"[a-z]{2,3}(?:-[a-z]+)?)\s*:",
    re.IGNORECASE,
)
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.DOTALL)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?(?:</ref\s*>|$)", re.DOTALL | re.IGNORECASE)
_BLOCK_TAGS = re.compile(
    r"<(math|gallery|timeline|source|syntaxhighlight|score|imagemap|table|chem|hiero)\b[^>]*>"
    r".*?(?:</\1\s*>|$)",
    re.DOTALL | re.IGNORECASE,
)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t]+")
_MIN_PARAGRAPH_WORDS = 4


def remove_balanced(text: str, opener: str, closer: str) -> str:
    """Remove every ``opener … closer`` span, nesting included; an unclosed span runs to the end."""
    out: list[str] = []
    depth = 0
    i = 0
    start_plain = 0
    n = len(text)
    while i < n:
        if text.startswith(opener, i):
            if depth == 0:
                out.append(text[start_plain:i])
            depth += 1
            i += len(opener)
        elif depth and text.startswith(closer, i):
            depth -= 1
            i += len(closer)
            if depth == 0:
                start_plain = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start_plain:])
    return "".join(out)


def remove_links_with_prefix(text: str) -> str:
    """Remove ``[[File:…]]``, ``[[Category:…]]`` and interlanguage links, nested links included."""
    while True:
        m = _DROP_LINK_PREFIX.search(text)
        if not m:
            return text
        depth = 0
        i = m.start()
        while i < len(text):
            if text.startswith("[[", i):
                depth += 1
                i += 2
            elif text.startswith("]]", i):
                depth -= 1
                i += 2
                if depth == 0:
                    break
            else:
                i += 1
        text = text[: m.start()] + text[i:]


def _replace_links(text: str) -> str:
    def visible(m: re.Match) -> str:
        target, label = m.group(1), m.group(2)
        return label if label is not None else target.split("#")[-1] if target.startswith("#") else target

    for _ in range(5):  # nested links resolve from the inside out
        text, n = _LINK.subn(visible, text)
        if not n:
            break
    return text


def strip_markup(text: str) -> str:
    """Inline markup removal; line structure (headings, lists) is kept for ``clean_wikitext``."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = remove_balanced(text, "{{", "}}")
    text = remove_balanced(text, "{|", "|}")
    text = remove_links_with_prefix(text)
    text = _replace_links(text)
    text = _EXT_LINK.sub(lambda m: m.group(1), text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = _QUOTES.sub("", text)
    return text


def clean_wikitext(text: str) -> str:
    """An article's wikitext as plain prose paragraphs separated by blank lines."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = _tidy(" ".join(current))
            if len(para.split()) >= _MIN_PARAGRAPH_WORDS:
                paragraphs.append(para)
            current.clear()

    for raw in strip_markup(text).splitlines():
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            flush()
            if heading.group(2).strip().lower() in TAIL_SECTIONS:
                break
            continue
        if not line or line.startswith(("*", "#", ":", ";", "|", "!", "{", "}", "__")):
            flush()
            continue
        current.append(line)
    flush()
    return "\n\n".join(paragraphs)


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip()
