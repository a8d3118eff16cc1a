"""What one round of prompt lookup costs at a long context: the dict search of PromptLookupDrafter beside a scan
from the end of the token list, at 1,000 committed tokens (GPT-2's vocabulary, K = 4, n-grams 3 down to 1).

    python benchmarks/lookup_cost.py
"""

import random
import sys
import timeit
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from speculative_gpt2.drafters import PromptLookupDrafter, Sampling, one_hot  # noqa: E402

V, K, CONTEXT = 50257, 4, 1000


def scan_from_the_end(history: list[int], max_ngram: int = 3, min_ngram: int = 1) -> int | None:
    """The alternative: look back through the list for the latest earlier match, every round."""
    for n in range(min(max_ngram, len(history) - 1), min_ngram - 1, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == suffix:
                return start + n
    return None


def main() -> None:
    rng = random.Random(0)
    cases = {"no match (random tokens)": [rng.randrange(V) for _ in range(CONTEXT)],
             "match 2 tokens back (a loop)": [rng.randrange(V) for _ in range(CONTEXT - 4)] + [7, 8, 7, 8]}
    for name, tokens in cases.items():
        drafter = PromptLookupDrafter(3, 1)
        drafter.start(torch.tensor(tokens[:-1]), CONTEXT + 8, Sampling(None, None, V))
        committed = torch.tensor(tokens)
        drafter.commit(tokens[-1:])
        repeats = 2000
        propose = timeit.timeit(lambda: drafter.propose(committed, K), number=repeats) / repeats * 1e6
        scan = timeit.timeit(lambda: scan_from_the_end(tokens), number=200) / 200 * 1e6
        fresh = PromptLookupDrafter(3, 1)
        fresh.start(torch.tensor(tokens[:1]), CONTEXT + 8, Sampling(None, None, V))
        commit = timeit.timeit(lambda: fresh.commit(tokens[1:]), number=1) / (CONTEXT - 1) * 1e6
        drafts = drafter.propose(committed, K).tokens
        p = timeit.timeit(lambda: one_hot(drafts, V), number=repeats) / repeats * 1e6
        print(f"{name}: propose {propose:.1f} us, of which building p ({len(drafts)} x {V} one-hot) {p:.1f} us; "
              f"commit {commit:.2f} us per token; a scan from the end instead of the dict: {scan:.1f} us per round")


if __name__ == "__main__":
    main()
