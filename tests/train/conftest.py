import json
import random

import pytest

WORDS = ("the cat dog sat ran over under a an red blue big small house tree river city "
         "walked quickly slowly near far old new and then because while Paris France Ada "
         "Alan wrote numbers 12 345 6789 capital Germany Berlin quick brown fox lazy").split()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A train and a held-out .jsonl corpus of simple random sentences (deterministic)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)

    def docs(n):
        out = []
        for _ in range(n):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                         for _ in range(rng.randint(8, 16))]
            out.append(json.dumps({"text": " ".join(sentences)}))
        return "\n".join(out) + "\n"

    (root / "train.jsonl").write_text(docs(120))
    (root / "heldout.jsonl").write_text(docs(20))
    return root
