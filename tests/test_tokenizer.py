import hashlib

import pytest

from speculative_gpt2.tokenizer import TOKENIZER_DIR, expected_hashes, load_tokenizer


def tiktoken_pins(monkeypatch) -> dict[str, str]:
    """The SHA-256 that tiktoken pins for its `gpt2` encoding's files, read from the call it makes (no network)."""
    import tiktoken_ext.openai_public as openai_public

    seen = {}

    def record(vocab_bpe_file, encoder_json_file, vocab_bpe_hash=None, encoder_json_hash=None, **kwargs):
        seen.update({"vocab.bpe": vocab_bpe_hash, "encoder.json": encoder_json_hash})
        return {}

    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", record)
    openai_public.gpt2()
    return seen


def test_sha256sums_are_tiktokens_pins(monkeypatch):
    assert expected_hashes() == tiktoken_pins(monkeypatch)


@pytest.mark.parametrize("filename", ["encoder.json", "vocab.bpe"])
def test_committed_files_match_their_hashes(filename):
    assert hashlib.sha256((TOKENIZER_DIR / filename).read_bytes()).hexdigest() == expected_hashes()[filename]


def test_a_changed_file_is_refused(monkeypatch, tmp_path):
    for name in ("encoder.json", "vocab.bpe", "SHA256SUMS"):
        (tmp_path / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    (tmp_path / "vocab.bpe").write_bytes((TOKENIZER_DIR / "vocab.bpe").read_bytes() + b"\n")
    monkeypatch.setattr("speculative_gpt2.tokenizer.TOKENIZER_DIR", tmp_path)
    load_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="vocab.bpe: SHA-256 differs"):
            load_tokenizer()
    finally:
        load_tokenizer.cache_clear()


@pytest.mark.parametrize("missing", ["encoder.json", "vocab.bpe", "SHA256SUMS"])
def test_a_missing_file_is_named_with_its_fix(monkeypatch, tmp_path, missing):
    for name in ("encoder.json", "vocab.bpe", "SHA256SUMS"):
        if name != missing:
            (tmp_path / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    monkeypatch.setattr("speculative_gpt2.tokenizer.TOKENIZER_DIR", tmp_path)
    load_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match=f"{missing} cannot be read .*reinstall the package"):
            load_tokenizer()
    finally:
        load_tokenizer.cache_clear()


def test_known_ids():
    ids = load_tokenizer().encode("Alan Turing theorized that computers would one day become")
    assert ids == [36235, 39141, 18765, 1143, 326, 9061, 561, 530, 1110, 1716]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading and trailing spaces  \n\n\ttabs\r\n",
        "naïve café, Grüße, Ελληνικά, русский, 日本語のテキスト, 한국어 🎉🤖👩‍💻",
        "code: def f(x):\n    return x ** 2  # comment",
        "first<|endoftext|>second",
        "",
    ],
)
def test_round_trip(text):
    enc = load_tokenizer()
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    assert enc.decode(ids) == text
    assert all(0 <= i < 50257 for i in ids)


def test_end_of_text_and_vocabulary():
    enc = load_tokenizer()
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
