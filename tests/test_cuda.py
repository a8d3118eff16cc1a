"""The decoders on CUDA (skipped without a GPU; CI has none): greedy equivalence in float32, static-shape passes
equal to a full pass, and bfloat16 runs. benchmarks/gpu_check.sh runs these and the CUDA benchmark on a lent GPU."""

import pytest
import torch
import torch.nn.functional as F

from speculative_gpt2.random_checkpoint import noisy_copy, random_model
from gpt2_model import GPT2Config
from speculative_gpt2.lookahead import AdaptiveLookahead
from speculative import autoregressive_sample, speculative_sample
from speculative_gpt2.cuda_graphs import CUDAGraphRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = GPT2Config(vocab_size=1000, n_positions=160, n_embd=64, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def pair():
    target = random_model(CONFIG, seed=0, scale=5)
    return target.cuda(), noisy_copy(target, noise=0.08, seed=2).cuda()


@pytest.mark.parametrize("lookahead", [1, 4, 8, "auto"])
def test_greedy_output_is_the_targets_on_cuda(pair, lookahead):
    target, draft = pair
    policy = AdaptiveLookahead() if lookahead == "auto" else lookahead
    for prompt, n in (([1, 2, 3], 60), (list(range(10, 40)), 100)):
        assert speculative_sample(target, draft, prompt, n, lookahead=policy).tokens == \
            autoregressive_sample(target, prompt, n).tokens


@pytest.mark.parametrize("rows", [1, 5])
def test_static_passes_match_a_full_pass_on_cuda(pair, rows):
    target, _ = pair
    idx = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        full = target(idx)
        cache = target.new_cache(max_len=48)
        target(idx[:, :5], cache=cache)
        for start in range(5, 40 - rows + 1, rows):
            target(idx[:, start : start + rows].flip(1), cache=cache)  # rejected rows, cropped away
            cache.crop(start)
            torch.testing.assert_close(target(idx[:, start : start + rows], cache=cache), full[:, start : start + rows],
                                       atol=1e-4, rtol=0)


def test_sampling_with_a_cuda_generator_reproduces(pair):
    target, draft = pair

    def run(seed):
        return speculative_sample(target, draft, [1, 2, 3], 50, temperature=1.0, top_p=0.9,
                                  generator=torch.Generator("cuda").manual_seed(seed)).tokens

    assert run(1) == run(1) != run(2)


def test_bfloat16_runs(pair):
    target, draft = (m.to(torch.bfloat16) for m in (random_model(CONFIG, 0, 5).cuda(), pair[1]))
    out = speculative_sample(target, draft.to(torch.bfloat16), [1, 2, 3], 40, lookahead=4)
    assert len(out.tokens) == 40 and all(0 <= t < 1000 for t in out.tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_give_the_eager_tokens(dtype):
    target = random_model(CONFIG, seed=0, scale=5).to("cuda", dtype)
    draft = noisy_copy(random_model(CONFIG, seed=0, scale=5), noise=0.08, seed=2).to("cuda", dtype)
    runs = {}
    for graphs in (False, True):
        target, draft = (CUDAGraphRunner(m) if graphs else getattr(m, "model", m) for m in (target, draft))
        runs[graphs] = [(speculative_sample(target, draft, [1, 2, 3], 80, lookahead=K).tokens,
                         autoregressive_sample(target, [1, 2, 3], 80).tokens) for K in (1, 4, 8)]
    assert runs[True] == runs[False]


def test_cuda_graphs_are_reused_by_the_next_call():
    target = random_model(CONFIG, seed=0, scale=5).cuda()
    draft = noisy_copy(random_model(CONFIG, seed=0, scale=5), noise=0.08, seed=2).cuda()
    target, draft = CUDAGraphRunner(target), CUDAGraphRunner(draft)
    speculative_sample(target, draft, [1, 2, 3], 40, lookahead=4)
    captured = (len(target.graphs.graphs), len(draft.graphs.graphs))
    speculative_sample(target, draft, [4, 5, 6], 40, lookahead=4)  # same lengths: the same buffers and graphs
    assert (len(target.graphs.graphs), len(draft.graphs.graphs)) == captured


def test_graphed_models_work_outside_inference_mode_after_a_sampler_call():
    model = CUDAGraphRunner(random_model(CONFIG, seed=0, scale=5).cuda())
    expected = autoregressive_sample(model, [1, 2, 3], 20).tokens  # the buffers are made under inference_mode
    with torch.no_grad():
        cache = model.new_cache(max_len=30)  # recycled buffers: must be writable here too
        model(torch.tensor([[1, 2]], device="cuda"), cache=cache)
        assert model(torch.tensor([[3]], device="cuda"), cache=cache)[0, -1].argmax().item() == expected[0]


def test_a_runner_needs_a_model_on_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        CUDAGraphRunner(random_model(CONFIG, seed=0))


# Exact mode on CUDA, with and without CUDA graphs: real inner width, bfloat16 and float16.
WIDE = GPT2Config(vocab_size=1000, n_positions=320, n_embd=1600, n_layer=2, n_head=25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("graphs", [False, True])
def test_exact_mode_gives_plain_decodings_tokens_on_cuda(dtype, graphs):
    target = random_model(WIDE, seed=0).to("cuda", dtype)
    draft = random_model(GPT2Config(vocab_size=1000, n_positions=320, n_embd=64, n_layer=1, n_head=4), seed=1)
    draft = draft.to("cuda", dtype)
    target = CUDAGraphRunner(target) if graphs else target
    gen = torch.Generator().manual_seed(0)
    for lookahead in (1, 4, 8, "auto"):
        prompt = torch.randint(0, 1000, (int(torch.randint(1, 200, (1,), generator=gen)),), generator=gen).tolist()
        policy = AdaptiveLookahead(max_lookahead=8) if lookahead == "auto" else lookahead
        assert speculative_sample(target, draft, prompt, 48, lookahead=policy, exact=9).tokens == \
            autoregressive_sample(target, prompt, 48, exact=9).tokens
    if graphs:  # every cached pass of up to 12 tokens has the fixed shape (a prefill of 13 to 16 tokens has its own)
        assert {rows for _, _, rows in target.graphs.graphs if rows <= 12} == {12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_platform_linear_row_does_not_depend_on_its_place_or_neighbours_on_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for out_features, in_features in [(4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400), (50257, 1600)]:
        w = (torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02).to(dtype)
        for rows in (4, 8, 12, 16):
            x = torch.randn(1, rows, in_features, device="cuda", generator=gen).to(dtype)
            assert torch.equal(F.linear(x.flip(1), w).flip(1), F.linear(x, w)), (
                f"F.linear {dtype} [{out_features}, {in_features}] on CUDA: a row gives another result at another "
                f"place among {rows} rows: exact mode cannot make decoding exact on this GPU")
