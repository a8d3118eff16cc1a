"""Write your own drafter: three methods; a deterministic proposer's p is one-hot. Runs on tiny random models."""
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.drafters import Proposal, one_hot
from speculative_gpt2.random_checkpoint import tiny_pair


class RepeatLast:
    """Guesses that the last token comes again, K times."""

    def start(self, prompt, max_len, sampling):  # once per call
        self.vocab_size = sampling.vocab_size

    def propose(self, tokens, lookahead):  # tokens: everything committed so far, (n,)
        drafts = tokens[-1:].repeat(lookahead)  # (K,)
        return Proposal(drafts, one_hot(drafts, self.vocab_size))

    def commit(self, new):  # the tokens this round committed; nothing to roll back here
        pass


target, _ = tiny_pair()
out = speculative_sample(target, RepeatLast(), [464, 3290, 318], 40, lookahead=4)
assert out.tokens == autoregressive_sample(target, [464, 3290, 318], 40).tokens  # exact, whatever the drafter
print(f"acceptance {out.acceptance_rate:.2f}, {out.tokens_per_target_call:.2f} tokens per target pass")
