"""Write your own acceptance rule: one function of the drafts (a tree; here a chain), q and the call's chance that
returns a Verdict. This one tests only the first draft, by Chen's rule: exact, and a round keeps at most one draft.
Runs on tiny random models."""
import torch

from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.random_checkpoint import tiny_pair
from speculative_gpt2.rules import Verdict, residual


def first_draft_only(tree, q, chance):
    """Keep the first draft x with probability min(1, q(x)/p(x)); then a bonus token from q after it, or on rejection
    one from norm(max(0, q - p)). tree.tokens (B, K), tree.p (B, K, V), q (B, K + 1, V)."""
    B, K = tree.tokens.shape
    rows = torch.arange(B)
    x = tree.tokens[:, 0] if K else torch.zeros(B, dtype=torch.long)
    p = tree.p[:, 0] if K else torch.zeros_like(q[:, 0])  # nothing drafted: nothing is kept, q is what is left
    ratio = q[rows, 0, x] / p[rows, x]
    r = chance.uniform(B, device=q.device)  # None at temperature 0: q and p are one-hot, no draw is needed
    keep = (tree.counts > 0) & (ratio >= 1 if r is None else r < ratio)
    following = torch.where(keep[:, None], q[:, min(1, K)], residual(q[:, 0], p))
    path = torch.where(keep[:, None] & (torch.arange(K) == 0), 0, -1)  # (B, K): the node kept at each depth
    return Verdict(keep.long(), path, chance.token(following), following)


target, draft = tiny_pair()
prompt = [464, 3290, 318]
out = speculative_sample(target, draft, prompt, 40, lookahead=4, rule=first_draft_only)
assert out.tokens == autoregressive_sample(target, prompt, 40).tokens  # exact at temperature 0
assert max(out.accepted_per_round) <= 1
sampled = speculative_sample(target, draft, prompt, 40, temperature=1.0, rule=first_draft_only,
                             generator=torch.Generator().manual_seed(0))
print(f"acceptance {out.acceptance_rate:.2f}; sampled: {len(sampled.tokens)} tokens")
