import hashlib

import pytest

from gpt2_model import WEIGHTS_DIR, load_tokenizer

# tiktoken pins these for its `gpt2` encoding (tiktoken_ext/openai_public.py).
TIKTOKEN_PINS = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.mark.parametrize("filename", sorted(TIKTOKEN_PINS))
def test_committed_files_match_tiktoken_pins(filename):
    assert hashlib.sha256((WEIGHTS_DIR / filename).read_bytes()).hexdigest() == TIKTOKEN_PINS[filename]


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
