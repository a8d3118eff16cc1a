"""The GPT-2 BPE tokenizer (equal to tiktoken's `gpt2` encoding), built offline from files shipped in the package.

The files (`tokenizer_files/`: OpenAI's `encoder.json` and `vocab.bpe`) travel with the package, and their SHA-256
live beside them in `SHA256SUMS` (the hashes tiktoken pins for its `gpt2` encoding; a test checks that they still
agree). They are checked before the tokenizer is built: no network is used.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path

TOKENIZER_DIR = Path(str(resources.files(__package__) / "tokenizer_files"))
_FIX = "reinstall the package (pip install --force-reinstall speculative-gpt2) or, in a checkout, restore it from git"


def _read(filename: str) -> bytes:
    path = TOKENIZER_DIR / filename
    try:
        return path.read_bytes()
    except OSError as e:  # a bare "[Errno 2]" would not say that a packaged file is missing, or what to do
        raise ValueError(f"tokenizer file {path} cannot be read ({e.strerror or e}): {_FIX}") from None


def expected_hashes() -> dict[str, str]:
    """{file name: SHA-256} from tokenizer_files/SHA256SUMS (`sha256sum` format)."""
    lines = _read("SHA256SUMS").decode().splitlines()
    return {name.lstrip("*"): digest for digest, name in (line.split() for line in lines if line.strip())}


@lru_cache(maxsize=1)
def load_tokenizer():
    """The GPT-2 tokenizer, a `tiktoken.Encoding` (50257 tokens, `<|endoftext|>` = 50256)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    for filename, expected in expected_hashes().items():
        if hashlib.sha256(_read(filename)).hexdigest() != expected:
            raise ValueError(f"tokenizer file {TOKENIZER_DIR / filename}: SHA-256 differs from tiktoken's: {_FIX}")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(TOKENIZER_DIR / "vocab.bpe"), encoder_json_file=str(TOKENIZER_DIR / "encoder.json")
    )
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256},
        explicit_n_vocab=50257,
    )
