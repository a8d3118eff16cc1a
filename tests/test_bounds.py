"""Upper bounds on the command line (--lookahead at most 64, and K + 1 within the target's context; n-gram sizes at
most 64), an allocator's refusal named as out of memory, and prompt lookup whose memory grows linearly with the
context."""

import random
import time
import tracemalloc

import pytest
import torch

from gpt2_model import GPT2Config
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2 import cli
from speculative_gpt2.drafters import PromptLookupDrafter, Sampling
from speculative_gpt2.random_checkpoint import random_model


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    random_model(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2), seed=0).save_pretrained(folder)
    return folder




# The command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--lookahead", "1000000000", "argument --lookahead/-K: invalid value '1000000000': give an integer from 1 to 64, "
                                  "or auto"),
    ("--lookahead", "20000", "give an integer from 1 to 64, or auto"),
    ("--lookahead", "65", "give an integer from 1 to 64, or auto"),
    ("--ngram-max", "1000000", "argument --ngram-max: invalid value '1000000': must be an integer from 1 to 64"),
    ("--ngram-max", "65", "must be an integer from 1 to 64"),
    ("--ngram-min", "65", "argument --ngram-min: invalid value '65': must be an integer from 1 to 64"),
])
def test_values_past_the_bounds_are_refused_by_the_parser(target, flag, value, message, refused_before_loading):
    started = time.monotonic()
    err = refused_before_loading("--target", target, "--draft", "ngram", "--device", "cpu", "--max-new-tokens", 4,
                  flag, value)
    assert message in err and time.monotonic() - started < 5


def test_k_plus_one_must_fit_the_targets_context(target, refused_before_loading):
    err = refused_before_loading("--target", target, "--draft", "ngram", "--device", "cpu", "--lookahead", 64,
                  "--max-new-tokens", 4)
    assert ("--lookahead 64: a round verifies K + 1 = 65 tokens in one pass of the target, whose context holds 64: "
            "give at most 63") in err


def test_the_bounds_themselves_run(target, run_cli):
    status, out, err = run_cli("--target", target, "--draft", "ngram", "--device", "cpu", "--lookahead", 63,
                           "--ngram-max", 64, "--ngram-min", 64, "--max-new-tokens", 4, "--ignore-eos")
    assert status == 0, err
    assert "identical outputs: yes" in out


def test_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "from 1 to 64 (and K + 1 within the target's context" in out and "(at most 64)" in out


@pytest.mark.parametrize("text", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes",
                                  "CUDA out of memory. Tried to allocate 2.00 GiB",
                                  "not enough memory: you tried to allocate 9 GB"])
def test_an_allocators_refusal_is_named_as_out_of_memory(target, monkeypatch, text, run_cli):
    def refuse(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(cli, "autoregressive_sample", refuse)
    status, _, err = run_cli("--target", target, "--mode", "plain", "--device", "cpu", "--max-new-tokens", 4, "--dtype",
                             "float32")
    assert status == 2 and "Traceback" not in err
    asked = {"DefaultCPUAllocator": " (asked for 8 bytes)", "CUDA": " (asked for 2.00 GiB)",
             "not enough": " (asked for 9 GB)"}
    said = next(v for k, v in asked.items() if k in text)
    assert err.splitlines()[-1] == (f"speculative-gpt2: error: out of memory{said}: use a smaller model, --dtype "
                                    f"bfloat16, fewer --max-new-tokens or a smaller --lookahead")


def test_out_of_memory_advice_names_only_what_would_change_this_run(target, monkeypatch, tmp_path, run_cli):
    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")

    monkeypatch.setattr(cli, "autoregressive_sample", refuse)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    status, _, err = run_cli("--target", target, "--mode", "plain", "--device", "cpu", "--max-new-tokens", 4, "--dtype",
                             "bfloat16", "--prompts-file", prompts, "--batch-size", 3000)
    assert status == 2 and err.splitlines()[-1] == (
        "speculative-gpt2: error: out of memory (asked for 8 bytes): use a smaller --batch-size (this run: 3000 "
        "prompts per batch), a smaller model, fewer --max-new-tokens or a smaller --lookahead")  # bfloat16 already


@pytest.mark.parametrize("kwargs,message", [
    (dict(exact=10**9), r"exact \(rows per target pass\) must be an integer from 1 to 64"),
    (dict(exact=200), r"exact \(rows per target pass\) must be an integer from 1 to 64"),
    (dict(exact=True, lookahead=10**9), "exact=True pads every target pass to K \\+ 1 = 1000000001 rows, more than the "
                                        "model's context of 64 positions"),
])
def test_exact_mode_rows_past_the_context_are_refused_before_any_memory(kwargs, message):
    model = random_model(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=2), seed=0)
    with pytest.raises(ValueError, match=message):
        speculative_sample(model, PromptLookupDrafter(), [1, 2, 3], 4, **kwargs)
    if "lookahead" not in kwargs:
        with pytest.raises(ValueError, match=message):
            autoregressive_sample(model, [1, 2, 3], 4, **kwargs)


def test_a_real_allocation_failure_is_named_as_out_of_memory(target, monkeypatch, run_cli):
    def allocate_too_much(*args, **kwargs):  # torch's own refusal, as a lookahead of 10^9 met it
        return torch.empty(2**62, dtype=torch.uint8)

    monkeypatch.setattr(cli, "autoregressive_sample", allocate_too_much)
    status, _, err = run_cli("--target", target, "--mode", "plain", "--device", "cpu", "--max-new-tokens", 4)
    assert status == 2 and "error: out of memory (asked for 4.61e+18 bytes)" in err and "Traceback" not in err


def test_other_runtime_errors_are_not_taken_for_memory(target, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "autoregressive_sample", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug keeps its traceback
        cli.main(["--target", str(target), "--mode", "plain", "--device", "cpu", "--max-new-tokens", "4"])


# PromptLookupDrafter -------------------------------------------------------------------------------------------


def test_the_drafter_bounds_its_ngram_sizes():
    for sizes, message in (((10**6,), "max_ngram must be an integer from 1 to 64, got 1000000"),
                           ((65, 65), "max_ngram must be an integer from 1 to 64"),
                           ((True,), "max_ngram must be an integer"), ((3.0,), "max_ngram must be an integer"),
                           ((3, 0), "min_ngram must be an integer from 1 to 3, got 0")):
        with pytest.raises(ValueError, match=message):
            PromptLookupDrafter(*sizes)
    assert PromptLookupDrafter(64, 64).max_ngram == 64


def started(drafter, prompt):
    drafter.start(torch.tensor(prompt), len(prompt) + 64, Sampling(None, None, vocab_size=50257))
    return drafter


def peak_bytes(prompt, max_ngram=64) -> tuple[int, float]:
    """What starting a drafter on `prompt` costs: peak bytes allocated (tracemalloc), and seconds."""
    tracemalloc.start()
    began = time.perf_counter()
    drafter = started(PromptLookupDrafter(max_ngram), prompt)
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del drafter
    return peak, seconds


def test_a_1000_token_prompt_at_the_largest_ngram_is_cheap():
    # Distinct tokens: every n-gram is new, the worst case for the lookup's memory.
    peak, seconds = peak_bytes(random.Random(0).sample(range(50257), 1000))
    assert peak < 16 * 2**20 and seconds < 2, (peak, seconds)


def test_memory_grows_linearly_with_the_context():
    prompts = {n: random.Random(n).sample(range(50257), n) for n in (500, 1000, 2000)}
    peaks = {n: peak_bytes(prompt)[0] for n, prompt in prompts.items()}
    assert peaks[2000] < 2.6 * peaks[1000] and peaks[1000] < 2.6 * peaks[500], peaks


class TupleLookup:
    """The lookup as first written, a dict from each n-gram's tuple to its latest follower: the reference the trie
    must agree with on every proposal."""

    def __init__(self, max_ngram, min_ngram):
        self.max_ngram, self.min_ngram, self.history, self.follower = max_ngram, min_ngram, [], {}

    def commit(self, new):
        for token in new:
            for n in range(self.min_ngram, min(self.max_ngram, len(self.history)) + 1):
                self.follower[tuple(self.history[-n:])] = len(self.history)
            self.history.append(token)

    def propose(self, lookahead):
        history = self.history
        for n in range(min(self.max_ngram, len(history) - 1), self.min_ngram - 1, -1):
            start = self.follower.get(tuple(history[-n:]))
            if start is not None:
                drafts = []
                for i in range(lookahead):
                    j = start + i
                    drafts.append(history[j] if j < len(history) else drafts[j - len(history)])
                return drafts, f"lookup: copied from position {start} of prompt + output ({n}-gram match)"
        return [], "lookup: no match, nothing drafted"


@pytest.mark.parametrize("seed", range(6))
def test_proposals_equal_the_tuple_lookups(seed):
    rng = random.Random(seed)
    max_ngram = rng.choice([1, 2, 3, 5, 8, 64])
    min_ngram = rng.randint(1, max_ngram)
    vocabulary = rng.choice([2, 3, 5, 20])  # small vocabularies repeat often: long matches, loops
    prompt = [rng.randrange(vocabulary) for _ in range(rng.randint(1, 40))]
    drafter, reference = started(PromptLookupDrafter(max_ngram, min_ngram), prompt), TupleLookup(max_ngram, min_ngram)
    reference.commit(prompt)
    for _ in range(60):
        lookahead = rng.randint(1, 8)
        proposal = drafter.propose(torch.tensor(drafter.history), lookahead)
        assert (proposal.tokens.tolist(), proposal.source) == reference.propose(lookahead)
        new = proposal.tokens.tolist()[:rng.randint(0, len(proposal.tokens))] + [rng.randrange(vocabulary)]
        drafter.commit(new)
        reference.commit(new)
