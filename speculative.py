"""Speculative sampling for GPT-2: a small draft model proposes, the large target model verifies.

Chen et al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2.
Notation of the paper, kept everywhere below: q is the TARGET model's distribution, p the DRAFT model's.

Each model keeps a KV cache; a model's *pending* tokens are the committed tokens not yet in its cache.
After a prefill of the prompt minus its last token, every round of `speculative_sample` does:

  1. draft     `draft_tokens`       the draft feeds its pending tokens, then proposes x1..xK one at a time,
                                    each sampled from its distribution p;
  2. verify    `target(...)`        the target scores its pending token and x1..xK in ONE pass: q at K+1 places;
  3. accept    `accept_or_resample` keep xi with probability min(1, q(xi)/p(xi)); at the first rejection emit a
                                    sample from norm(max(0, q - p)) instead; if all K are kept, emit a bonus
                                    token sampled from q at position K+1;
  4. roll back `KVCache.crop`       both caches forget the rejected positions: an integer, nothing is copied.

Every round emits between 1 and K+1 tokens, and the output is distributed exactly as sampling from q.
At temperature 0 both distributions are one-hot, so the output is the target's greedy output.
`autoregressive_sample` is the plain one-token-per-pass decoder beside it, for timing and for the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from gpt2_model import GPT2, WEIGHTS_DIR, DownloadError, KVCache, load_tokenizer

@dataclass
class Generation:
    """What a sampling call produced, and how.

    `tokens` are the new tokens (never the prompt); `origins[i]` says where `tokens[i]` came from: "draft" (a
    draft token the target kept), "resampled" (drawn from norm(max(0, q - p)) at a rejection), "bonus" (drawn
    from q after all K drafts were kept) or "target" (plain decoding). `accepted_per_round` holds how many
    drafts each round kept, `lookahead_per_round` how many it proposed (K; fewer when an EOS among the kept
    drafts ended the output). Call counts exclude the prefill; `seconds` includes it.
    """

    tokens: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)
    lookahead_per_round: list[int] = field(default_factory=list)
    target_calls: int = 0
    draft_calls: int = 0
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0

    def commit_round(self, drafts: list[int], n: int, next_token: int, eos_token_id: int | None) -> list[int]:
        """Records a round that kept drafts[:n] and then emitted `next_token`; returns the committed tokens.

        An EOS ends the output: what follows it is dropped and not counted as proposed or accepted.
        """
        K = len(drafts)
        new = drafts[:n] + [next_token]
        # With no drafts (the last token of a call) the round is a plain target step.
        origins = ["draft"] * n + ["target" if K == 0 else "bonus" if n == K else "resampled"]
        proposed = K
        if eos_token_id in new:
            end = new.index(eos_token_id) + 1
            new, origins = new[:end], origins[:end]
            if end <= n:  # the EOS was a kept draft: the drafts after it were never needed
                n = proposed = end
        self.tokens += new
        self.origins += origins
        self.accepted_per_round.append(n)
        self.lookahead_per_round.append(proposed)
        self.accepted += n
        self.proposed += proposed
        return new

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted / proposed draft tokens, or None when nothing was proposed."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_target_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------------------------------------
# One processing of logits for both models: the accept/reject rule is only exact on the same processed p and q.


def logits_to_probs(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> torch.Tensor:
    """Float32 probabilities (..., V) from logits (..., V): temperature, then top-k, then top-p.

    Temperature 0 gives the one-hot distribution of the argmax (no division by a tiny temperature).
    """
    logits = logits.float()  # compare probabilities in float32 whatever the models' dtype
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Subtracting the maximum first keeps a tiny temperature from overflowing to inf - inf = NaN.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: a token stays when the mass
        # strictly before it is below top_p, so the token that crosses the threshold (and the first) is kept.
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `probs` (..., V); rows need not be normalised. A one-hot row gives its token."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def _pick(probs: torch.Tensor, temperature: float, generator) -> torch.Tensor:
    # At temperature 0 the rows are one-hot: take the argmax and leave the generator untouched.
    return probs.argmax(-1) if temperature == 0 else sample(probs, generator)


# ----------------------------------------------------------------------------------------------------------
# The steps of a round


def draft_tokens(draft: GPT2, cache: KVCache, pending: torch.Tensor, lookahead: int, process, temperature,
                 generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: the draft proposes `lookahead` tokens autoregressively from its pending tokens (1, n).

    Returns the drafts x1..xK (K,) and their distributions p (K, V). The last draft is not fed back: it is
    pending for the next round, if it is kept.
    """
    drafts, p = [], []
    x = pending
    for _ in range(lookahead):
        p_i = process(draft(x, cache=cache)[0, -1])  # (V,)
        x_i = _pick(p_i, temperature, generator)
        drafts.append(x_i)
        p.append(p_i)
        x = x_i.view(1, 1)
    return torch.stack(drafts), torch.stack(p)


def accept_or_resample(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor, temperature: float,
                       generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: how many drafts the target keeps, n (0-d), and the token that follows them.

    drafts (K,), p (K, V) draft probabilities, q (K+1, V) target probabilities at the same positions plus one.
    Keep xi with probability min(1, q(xi)/p(xi)); at the first rejection, n, the next token is sampled from
    norm(max(0, q_n - p_n)); if all are kept (n = K) it is the bonus token, sampled from q_K.
    Everything stays on the device: the caller reads n and the token back in one transfer.
    """
    K = drafts.shape[0]
    if temperature == 0:
        keep = drafts == q[:K].argmax(-1)  # one-hot p and q: kept iff it is the target's greedy choice
    else:
        rows = torch.arange(K, device=drafts.device)
        r = torch.rand(K, generator=generator, device=drafts.device)
        keep = r < q[rows, drafts] / p[rows, drafts]  # r < 1, so min(1, .) is implied
    n = keep.int().cumprod(0).sum()  # length of the kept prefix
    # A zero row appended to p makes row K of max(0, q - p) equal to q_K: the bonus needs no branch.
    p_n = torch.cat([p, p.new_zeros(1, p.shape[1])]).index_select(0, n.view(1))[0]
    q_n = q.index_select(0, n.view(1))[0]
    return n, _pick(residual_distribution(q_n, p_n), temperature, generator)


def residual_distribution(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """norm(max(0, q - p)), unnormalised (`sample` does not need it): where a rejected draft is replaced from."""
    residual = (q - p).clamp_min(0)
    # Floating point can round q - p to zero everywhere when q = p; then a rejection had probability ~0
    # and q itself is the right distribution.
    return torch.where(residual.sum() > 0, residual, q)


# ----------------------------------------------------------------------------------------------------------
# Adaptive lookahead


def expected_tokens_per_round(alpha: float, K: int) -> float:
    """E = (1 - alpha^(K+1)) / (1 - alpha): kept drafts plus the one resampled or bonus token (Chen et al.),
    when each draft is kept with probability alpha, independently."""
    return K + 1.0 if alpha >= 1 else (1 - alpha ** (K + 1)) / (1 - alpha)


class AdaptiveLookahead:
    """Chooses K before each round to maximise expected tokens per second: E(alpha, K) / (K t_draft + t_verify(K+1)).

    alpha is estimated from the rounds so far as kept / (kept + rejected), the maximum-likelihood estimate when
    drafts are kept independently (drafts after a rejection were never tested), with counts that decay so that
    it follows the text. t_draft (per pass) and t_verify (per number of rows) are measured as the rounds run.
    A verification size not yet measured costs the linear interpolation between measured sizes, or beyond them
    as much as the nearest one: optimistic, so that a larger K gets tried, and then measured.
    K depends on measured times, so with a sampling temperature the same seed need not give the same tokens;
    each call is still an exact sample from the target.
    """

    def __init__(self, max_lookahead: int = 12, first: int = 4, decay: float = 0.9):
        self.max_lookahead, self.first, self.decay = max_lookahead, min(first, max_lookahead), decay
        self.kept, self.rejected = 1.0, 1.0  # a uniform prior: alpha = 0.5 until rounds say otherwise
        self.draft_ms: float | None = None
        self.verify_ms: dict[int, float] = {}  # rows -> ms

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.rejected)

    def choose(self) -> int:
        if self.draft_ms is None:
            return self.first
        return max(range(1, self.max_lookahead + 1), key=self.tokens_per_ms)

    def tokens_per_ms(self, K: int) -> float:
        return expected_tokens_per_round(self.alpha, K) / (K * self.draft_ms + self._verify_ms(K + 1))

    def update(self, K: int, kept: int, draft_ms: float, verify_ms: float) -> None:
        """Learns from a round that proposed K drafts and kept `kept`, with the measured times of its steps."""
        self.kept = self.decay * self.kept + kept
        self.rejected = self.decay * self.rejected + (kept < K)
        self.draft_ms = _average(self.draft_ms, draft_ms / K)
        self.verify_ms[K + 1] = _average(self.verify_ms.get(K + 1), verify_ms)

    def _verify_ms(self, rows: int) -> float:
        if rows in self.verify_ms:
            return self.verify_ms[rows]
        below = [r for r in self.verify_ms if r < rows]
        above = [r for r in self.verify_ms if r > rows]
        if below and above:  # between two measured sizes: interpolate
            lo, hi = max(below), min(above)
            return self.verify_ms[lo] + (self.verify_ms[hi] - self.verify_ms[lo]) * (rows - lo) / (hi - lo)
        return self.verify_ms[max(below) if below else min(above)]


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


# ----------------------------------------------------------------------------------------------------------
# The two decoders


@torch.inference_mode()
def speculative_sample(target: GPT2, draft: GPT2, prompt, max_new_tokens: int, *, lookahead: int | str = 4,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       eos_token_id: int | None = None, generator: torch.Generator | None = None,
                       on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Samples `max_new_tokens` tokens from `target`, with `draft` proposing `lookahead` tokens per round.

    The output is distributed exactly as `autoregressive_sample(target, ...)` with the same temperature,
    top-k and top-p (token for token at temperature 0). `prompt` is a list of ids or a 1-D LongTensor
    (batch size 1, as in the paper). `lookahead="auto"` chooses K every round (`AdaptiveLookahead`).
    Generation stops after `eos_token_id` if it is produced. `on_tokens` is called with the tokens each
    round commits. Returns a `Generation`; its `seconds` leave out the one-off `GPT2.prepare_for`.
    """
    check_options(max_new_tokens, temperature, top_k, top_p, lookahead)
    prompt = _check_models_and_prompt(prompt, max_new_tokens, generator, [target, draft])
    target.prepare_for(rows=2)  # verification: K + 1 rows
    draft.prepare_for(rows=2)  # 1 row, or 2 after a full acceptance
    start_time = time.perf_counter()
    device = prompt.device
    process = partial(logits_to_probs, temperature=temperature, top_k=top_k, top_p=top_p)
    adaptive = AdaptiveLookahead() if lookahead == "auto" else None
    max_len = len(prompt) + max_new_tokens
    target_cache, draft_cache = target.new_cache(max_len=max_len), draft.new_cache(max_len=max_len)
    # Prefill: the prompt minus its last token, which is then pending for both models.
    if len(prompt) > 1:
        target(prompt[None, :-1], cache=target_cache)
        draft(prompt[None, :-1], cache=draft_cache)
    tokens = prompt.tolist()  # committed: prompt and new tokens
    out = Generation()
    while len(out.tokens) < max_new_tokens:
        # A round emits at most K + 1 tokens: draft no more than are still needed (this also keeps every
        # position inside the context, which _check_models_and_prompt sized for prompt + max_new_tokens).
        K = min(adaptive.choose() if adaptive else lookahead, max_new_tokens - len(out.tokens) - 1)
        pending = torch.tensor([tokens[draft_cache.length:]], device=device)  # (1, 1 or 2)
        started = _clock(device)
        # Step 1, draft: K tokens from p, one draft pass each.
        if K > 0:
            drafts, p = draft_tokens(draft, draft_cache, pending, K, process, temperature, generator)
            out.draft_calls += K
        else:  # the last token: nothing to draft, the round is one plain target step
            drafts, p = prompt.new_empty(0), torch.empty(0, target.config.vocab_size, device=device)
        drafted = _clock(device)
        # Step 2, verify: the target's pending token and the K drafts in one pass give q at K + 1 positions.
        q = process(target(torch.cat([prompt.new_tensor(tokens[-1:]), drafts])[None], cache=target_cache)[0])
        out.target_calls += 1
        verified = _clock(device)
        # Step 3, accept or resample: n drafts kept, then one resampled (or bonus) token.
        n, next_token = accept_or_resample(drafts, p, q, temperature, generator)
        values = torch.cat([drafts, n.view(1), next_token.view(1)]).tolist()  # the round's one host sync
        drafts, n, next_token = values[:-2], values[-2], values[-1]
        if adaptive and K > 0:
            adaptive.update(K, n, _ms(started, drafted), _ms(drafted, verified))
        new = out.commit_round(drafts, n, next_token, eos_token_id)
        tokens += new
        if on_tokens is not None:
            on_tokens(new)
        if new[-1] == eos_token_id:
            break
        # Step 4, roll back: each cache keeps the committed prefix it holds; the last token stays pending
        # (for the draft, also the last kept draft when all were kept: it was never fed).
        committed = len(tokens) - 1
        target_cache.crop(min(target_cache.length, committed))
        draft_cache.crop(min(draft_cache.length, committed))
    out.seconds = _elapsed(start_time, device)
    return out


@torch.inference_mode()
def autoregressive_sample(model: GPT2, prompt, max_new_tokens: int, *, temperature: float = 0.0,
                          top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                          generator: torch.Generator | None = None, use_cache: bool = True,
                          on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
    """Plain decoding: one forward pass of `model` per new token. `use_cache=False` recomputes the whole
    sequence every step (the uncached baseline of the seed blog). Returns a `Generation`; its `seconds` leave
    out the one-off `GPT2.prepare_for`."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    prompt = _check_models_and_prompt(prompt, max_new_tokens, generator, [model])
    model.prepare_for(rows=1 if use_cache else len(prompt))
    start_time = time.perf_counter()
    cache = model.new_cache(max_len=len(prompt) + max_new_tokens) if use_cache else None
    if use_cache and len(prompt) > 1:
        model(prompt[None, :-1], cache=cache)  # prefill, as in speculative_sample
    tokens = prompt.tolist()
    out = Generation()
    while len(out.tokens) < max_new_tokens:
        fed = tokens[-1:] if use_cache else tokens
        logits = model(prompt.new_tensor(fed)[None], cache=cache)[0, -1]
        token = _pick(logits_to_probs(logits, temperature, top_k, top_p), temperature, generator).item()
        out.target_calls += 1
        tokens.append(token)
        out.tokens.append(token)
        out.origins.append("target")
        if on_tokens is not None:
            on_tokens([token])
        if token == eos_token_id:
            break
    out.seconds = _elapsed(start_time, prompt.device)
    return out


def _clock(device: torch.device):
    # CUDA runs kernels asynchronously: a recorded event is read after the round's sync, costing no extra one.
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _ms(start, end) -> float:
    return start.elapsed_time(end) if isinstance(start, torch.cuda.Event) else 1e3 * (end - start)


def _elapsed(start_time: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: stop the clock when they are done
    return time.perf_counter() - start_time


def check_options(max_new_tokens, temperature, top_k, top_p, lookahead=1) -> None:
    """Raises ValueError for sampling options out of range (checked before any model is loaded or run)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if lookahead != "auto" and (isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1):
        raise ValueError(f"lookahead must be an integer >= 1 or \"auto\", got {lookahead!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


def _check_models_and_prompt(prompt, max_new_tokens, generator, models) -> torch.Tensor:
    """Raises ValueError for models or a prompt that do not fit; returns the prompt as a 1-D LongTensor on the
    models' device."""
    devices = {m.wte.weight.device for m in models}
    if len(devices) > 1:
        raise ValueError(f"the models are on different devices ({', '.join(map(str, devices))}): move both to one")
    vocab_sizes = {m.config.vocab_size for m in models}
    if len(vocab_sizes) > 1:
        raise ValueError(f"the models have different vocabulary sizes {sorted(vocab_sizes)}: they must share one")
    device, vocab_size = devices.pop(), vocab_sizes.pop()
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt must be a 1-D tensor of token ids, got shape {list(prompt.shape)}, {prompt.dtype}")
        prompt = prompt.tolist()
    prompt = list(prompt)
    if not prompt:
        raise ValueError("prompt is empty: give at least one token id")
    if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt):
        raise ValueError(f"prompt must hold token ids in [0, {vocab_size})")
    context = min(m.config.n_positions for m in models)
    if len(prompt) + max_new_tokens > context:
        raise ValueError(f"prompt ({len(prompt)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {context} positions: shorten one of them")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the models are on {device}: make it there")
    return torch.tensor(prompt, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------------------------------------
# Command line: naive decoding and speculative sampling side by side, as in the seed blog post.

DEFAULT_PROMPT = "Alan Turing theorized that computers would one day become"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype by name; "auto" is bfloat16 where the hardware runs it natively (CUDA with bf16, CPUs with
    AVX-512 BF16 or AMX), float32 elsewhere (without those, bf16 matrix products are emulated and slower)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else torch.float32


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: assume no native bf16
        return set()


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv=None):
    parser = _ArgumentParser(
        prog="speculative.py",
        description="Speculative sampling (Chen et al. 2023): a small GPT-2 drafts, a large GPT-2 verifies. "
        "Times plain decoding with the target and speculative sampling on the same prompt, and shows both texts.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--target", default="gpt2-xl", help="target model: a preset name or a checkpoint folder")
    parser.add_argument("--draft", default="gpt2", help="draft model: a preset name or a checkpoint folder")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate")
    parser.add_argument("--lookahead", "-K", type=_lookahead, default=4,
                        help="draft tokens proposed per round (K), or auto: chosen every round from the measured "
                        "acceptance rate and pass costs")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; >0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (temperature > 0)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (temperature > 0)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the sampling generator")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="weights and activations; auto: bfloat16 where the hardware runs it natively, else float32")
    parser.add_argument("--mode", default="both", choices=["both", "speculative", "naive"], help="what to run")
    parser.add_argument("--no-cache-baseline", action="store_true",
                        help="also time plain decoding without a KV cache (the seed blog's baseline; slow)")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--no-stream", action="store_true",
                        help="print each text when its run ends, with a progress bar, instead of streaming it")
    parser.add_argument("--show-acceptance", action="store_true",
                        help="print the speculative output coloured by origin: draft kept, resampled, bonus")
    parser.add_argument("--color", default="auto", choices=["auto", "always", "never"],
                        help="colours for --show-acceptance; auto: only on a terminal and when NO_COLOR is unset")
    parser.add_argument("--weights-dir", default=str(WEIGHTS_DIR), help="where preset checkpoints live")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading missing weights")
    return parser.parse_args(argv)


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer from 0 to 2**63 - 1")
    return seed


def _lookahead(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid lookahead {text!r}: give an integer >= 1 or auto") from None


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _run_and_show(title: str, run, prompt: list[int], enc, max_new_tokens: int, stream: bool) -> Generation:
    """Runs one decoder, streaming its text to stdout (or showing a progress bar on stderr), then its timing."""
    from tqdm.auto import tqdm

    from render import TextStream

    print(f"\n=== {title} ===")
    if stream:
        print(f"Generated: {enc.decode(prompt)}", end="", flush=True)
        text = TextStream(enc, file=sys.stdout)  # never splits a character across rounds
        out = run(on_tokens=text)
        text.flush()
        print()
    else:
        with tqdm(total=max_new_tokens, desc=title.split(" (")[0], unit="tok", file=sys.stderr, leave=False) as bar:
            out = run(on_tokens=lambda new: bar.update(len(new)))
        print(f"Generated: {enc.decode(prompt + out.tokens)}")
    print(f"completed in {out.seconds:.2f} s ({out.tokens_per_second:.2f} tokens/s, {len(out.tokens)} tokens)")
    return out


def _use_color(choice: str) -> bool:
    # auto: colour only for a terminal, and never when NO_COLOR is set (no-color.org).
    return choice == "always" or (choice == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))


def main(argv=None) -> int:
    """The command line; returns the exit status (2 for bad input, missing weights or a failed download)."""
    args = _parse_args(argv)
    try:
        check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.lookahead)
        return _run(args)
    except (ValueError, DownloadError, OSError) as e:  # bad input, weights or files: one line, no traceback
        print(f"speculative.py: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    device = _device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    enc = load_tokenizer()
    prompt = enc.encode(args.prompt, allowed_special="all")
    if not prompt:
        raise ValueError("the prompt is empty: pass some text with --prompt")
    load = dict(weights_dir=args.weights_dir, dtype=dtype, device=device, download=not args.no_download)
    print(f"Loading target {args.target} and draft {args.draft} ({_name(dtype)}, {device}) ...", file=sys.stderr)
    target = GPT2.from_pretrained(args.target, **load)
    draft = GPT2.from_pretrained(args.draft, **load) if args.mode != "naive" else None
    _check_models_and_prompt(prompt, args.max_new_tokens, None, [m for m in (target, draft) if m is not None])
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=None if args.ignore_eos else enc.eot_token)
    seeded = lambda: torch.Generator(device).manual_seed(args.seed)  # noqa: E731  every run: the same seed
    n = args.max_new_tokens
    runs = {}  # title: (warm-up or None, function of on_tokens that gives a Generation)
    # Warm-up right before each timed run: the first passes pay for allocations and kernel selection, and
    # GPT2.prepare_for may re-lay out the weights (once per mode); keep all of it out of the timings.
    greedy = options | {"temperature": 0.0}
    if args.mode != "speculative":
        if args.no_cache_baseline:  # recomputing everything, it has no warm-up worth the wait
            runs["Naive decoding without KV cache"] = None, partial(
                autoregressive_sample, target, prompt, n, use_cache=False, generator=seeded(), **options)
        runs["Naive decoding"] = (partial(autoregressive_sample, target, prompt, min(8, n), **greedy),
                                  partial(autoregressive_sample, target, prompt, n, generator=seeded(), **options))
    if args.mode != "naive":
        runs[f"Speculative sampling (K={args.lookahead})"] = (
            partial(speculative_sample, target, draft, prompt, min(8, n), lookahead=args.lookahead, **greedy),
            partial(speculative_sample, target, draft, prompt, n, lookahead=args.lookahead, generator=seeded(),
                    **options))
    results = {}
    for title, (warm_up, run) in runs.items():
        if warm_up is not None:
            warm_up()
        # Every run streams, or none does: writing to the terminal is part of what is timed.
        results[title] = _run_and_show(title, run, prompt, enc, n, stream=not args.no_stream)
    _print_summary(args, results, device, dtype)
    speculative = next((g for title, g in results.items() if title.startswith("Speculative")), None)
    if args.show_acceptance and speculative is not None:
        from render import strip_ansi, to_ansi

        shown = to_ansi(speculative, enc, prompt)
        print("\n=== Where the speculative tokens came from ===")
        print(shown if _use_color(args.color) else strip_ansi(shown))
    return 0


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _print_summary(args, results: dict[str, Generation], device, dtype) -> None:
    naive = results.get("Naive decoding")
    uncached = results.get("Naive decoding without KV cache")
    spec = next((g for title, g in results.items() if title.startswith("Speculative")), None)
    print("\n=== Summary ===")
    if spec is not None:
        for name, base in (("naive decoding", naive), ("naive decoding without KV cache", uncached)):
            if base is not None:  # tokens/s: with sampling, an EOS can end the runs at different lengths
                print(f"speedup over {name}: {spec.tokens_per_second / base.tokens_per_second:.2f}x")
        rate = spec.acceptance_rate
        print(f"acceptance rate: {'n/a' if rate is None else f'{rate:.2f}'} ({spec.accepted} of {spec.proposed} drafts kept)")
        print(f"mean tokens per target pass: {spec.tokens_per_target_call:.2f}")
        print(f"target passes: {spec.target_calls}, draft passes: {spec.draft_calls}")
        chosen = [k for k in spec.lookahead_per_round if k > 0]
        if args.lookahead == "auto" and chosen:
            print(f"mean K chosen per round: {sum(chosen) / len(chosen):.2f}")
    print(f"target: {args.target}, draft: {args.draft}, dtype: {_name(dtype)}, device: {device}")
    if spec is not None and naive is not None:
        if args.temperature == 0 and spec.tokens == naive.tokens:
            print("identical outputs: yes")
        elif args.temperature == 0:
            first = next((i for i, (a, b) in enumerate(zip(spec.tokens, naive.tokens)) if a != b),
                         min(len(spec.tokens), len(naive.tokens)))
            print(f"identical outputs: no, from new token {first} (1-token and (K+1)-token passes round differently "
                  f"below float32, which can flip a near-tie)")
        else:
            print("identical outputs: not expected at temperature > 0 (both are samples from the target)")


if __name__ == "__main__":
    sys.exit(main())
