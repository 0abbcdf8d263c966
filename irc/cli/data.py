"""``irc data info CORPUS``: documents and tokens per split."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="corpora: inspect the built-in and user corpora")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    info_p = sub.add_parser(
        "info",
        help="documents and tokens per split",
        description="Documents, characters and tokens per split of a corpus "
        "(wiki, or a .txt/.jsonl file or folder).",
    )
    info_p.add_argument("corpus", help="wiki, or a .txt/.jsonl file or folder")
    info_p.add_argument("--tokenizer", default="smollm2-135m",
                        help="model whose tokenizer counts tokens (default smollm2-135m)")
    info_p.add_argument("--json", action="store_true", help="print one JSON object")
    info_p.set_defaults(run=run_info)
    p.set_defaults(run=lambda args: p.print_help() or 2)


def run_info(args: argparse.Namespace) -> int:
    from irc.cli.common import emit_json, fmt_int, info
    from irc.data import load_corpus, token_stream
    from irc.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    name = args.corpus.rpartition(":")[0] if args.corpus.endswith((":train", ":heldout", ":all")) else args.corpus
    rows = []
    for split in ("train", "heldout"):
        corpus = load_corpus(f"{name}:{split}")
        tokens = token_stream(corpus, tokenizer, "none")
        rows.append({"split": split, "documents": len(corpus.documents),
                     "characters": corpus.characters, "tokens": int(len(tokens))})
    if args.json:
        emit_json({"corpus": name, "tokenizer": args.tokenizer, "splits": rows})
        return 0
    info(f"corpus {name}, tokens by the {args.tokenizer} tokenizer (no BOS)")
    info(f"{'split':<8} {'documents':>10} {'characters':>12} {'tokens':>10}")
    for r in rows:
        info(f"{r['split']:<8} {fmt_int(r['documents']):>10} {fmt_int(r['characters']):>12} "
             f"{fmt_int(r['tokens']):>10}")
    return 0
