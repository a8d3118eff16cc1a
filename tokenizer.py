"""The GPT-2 BPE tokenizer (equal to tiktoken's `gpt2` encoding), built offline from the files in weights/.

The files' SHA-256 live in `weights/SHA256SUMS` (the hashes tiktoken pins for its `gpt2` encoding; a test checks
that they still agree) and are checked before the tokenizer is built: no network is used.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def expected_hashes() -> dict[str, str]:
    """{file name: SHA-256} from weights/SHA256SUMS (`sha256sum` format)."""
    lines = (WEIGHTS_DIR / "SHA256SUMS").read_text().splitlines()
    return {name.lstrip("*"): digest for digest, name in (line.split() for line in lines if line.strip())}


@lru_cache(maxsize=1)
def load_tokenizer():
    """The GPT-2 tokenizer, a `tiktoken.Encoding` (50257 tokens, `<|endoftext|>` = 50256)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    for filename, expected in expected_hashes().items():
        if hashlib.sha256((WEIGHTS_DIR / filename).read_bytes()).hexdigest() != expected:
            raise ValueError(f"{WEIGHTS_DIR / filename}: SHA-256 differs from tiktoken's; restore it from git")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(WEIGHTS_DIR / "vocab.bpe"), encoder_json_file=str(WEIGHTS_DIR / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
