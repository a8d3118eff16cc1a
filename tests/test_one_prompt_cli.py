"""One prompt, one text on the command line: a prompts file gives each line the same tokens at every --batch-size
and as --prompt alone; with --coupled, sampled texts compare equal ("identical outputs: yes"). The checkpoints meet
near-ties at every step (tests/near_ties.py), with GPT-2's vocabulary so that real text encodes."""

import json

import pytest

from near_ties import near_tie_model
from speculative_gpt2.text import printable
from speculative_gpt2.tokenizer import load_tokenizer

PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time " * 70, "  two leading spaces",
           "日本語 🎉", "A", "It was the best of times, it was the worst of times " * 12, "Speculative sampling"]


@pytest.fixture(scope="module")
def near_tie_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("near_ties")
    for name, n_layer, seed in (("target", 2, 0), ("draft", 1, 1)):
        near_tie_model("float32", n_layer, seed, vocab_size=50257, pack=False).save_pretrained(folder / name)
    return folder


def models(folder) -> list[str]:
    return ["--target", str(folder / "target"), "--draft", str(folder / "draft")]


@pytest.mark.slow
def test_a_prompts_file_gives_each_line_the_same_tokens_at_every_batch_size_and_alone(near_tie_checkpoints,
                                                                                       tmp_path, run_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    tokens = {}
    for size in (1, 2, 8):
        output = tmp_path / f"out{size}.jsonl"
        status, out, err = run_cli(*models(near_tie_checkpoints), "--prompts-file", prompts, "--batch-size", size,
                                   "--max-new-tokens", 20, "--ignore-eos", "--dtype", "float32", "--output", output)
        assert status == 0, err
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        assert all(r["identical"] for r in rows) and f"identical outputs: {len(PROMPTS)} of {len(PROMPTS)}" in err
        tokens[size] = {r["line"]: r["tokens"] for r in rows}
    assert tokens[1] == tokens[2] == tokens[8]
    enc = load_tokenizer()
    for line in (1, 3, 6):  # each as --prompt alone: the same text
        prompt = PROMPTS[line - 1]
        status, out, err = run_cli(*models(near_tie_checkpoints), "--prompt", prompt, "--max-new-tokens", 20,
                                   "--ignore-eos", "--dtype", "float32", "--no-stream")
        assert status == 0, err
        # Exact mode's plain decoding and speculative sampling print it (1-row plain decoding may part at a
        # near-tie: the summary says so).
        exact, speculative = out.split("=== Plain decoding, exact mode")[1].split("=== Speculative sampling")
        text = f"Generated: {printable(enc.decode(enc.encode(prompt) + tokens[1][line]))}\n"
        assert text in exact and text in speculative and "identical outputs: yes" in out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lookahead", ["1", "4", "auto"])
@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_coupled_sampling_on_the_command_line_gives_identical_outputs(near_tie_checkpoints, run_cli, dtype,
                                                                      lookahead, draft):
    args = models(near_tie_checkpoints)[:2] + (["--draft", "ngram"] if draft == "ngram" else
                                               models(near_tie_checkpoints)[2:])
    status, out, err = run_cli(*args, "--prompt", "The capital of France is", "--max-new-tokens", 16, "--ignore-eos",
                               "--temperature", 0.9, "--seed", 5, "--coupled", "--lookahead", lookahead,
                               "--dtype", dtype, "--no-stream")
    assert status == 0, err
    assert "identical outputs: yes" in out


def test_a_seed_per_line_is_that_lines_seed_alone(near_tie_checkpoints, tmp_path, run_cli, refused_before_loading):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": "Hello", "seed": s}) for s in (3, 4, 3)) + "\n"
                       + json.dumps({"prompt": "Hello"}) + "\n", encoding="utf-8")
    status, out, err = run_cli(*models(near_tie_checkpoints), "--prompts-file", prompts, "--batch-size", 4,
                               "--max-new-tokens", 10, "--ignore-eos", "--temperature", 1.0, "--coupled",
                               "--seed", 4, "--dtype", "float32")
    assert status == 0, err
    rows = {r["line"]: r for r in map(json.loads, out.splitlines())}
    assert rows[1]["tokens"] == rows[3]["tokens"] != rows[2]["tokens"] == rows[4]["tokens"]  # --seed 4 for line 4
    assert all(r["identical"] for r in rows.values()) and "identical outputs: 4 of 4 prompts" in err
    alone = tmp_path / "alone.jsonl"
    alone.write_text(json.dumps({"prompt": "Hello"}) + "\n", encoding="utf-8")
    status, out, err = run_cli(*models(near_tie_checkpoints), "--prompts-file", alone, "--max-new-tokens", 10,
                               "--ignore-eos", "--temperature", 1.0, "--coupled", "--seed", 3, "--dtype", "float32")
    assert json.loads(out)["tokens"] == rows[1]["tokens"]
    err = refused_before_loading(*models(near_tie_checkpoints), "--prompts-file", prompts, "--temperature", 1.0)
    assert 'line 1 has a "seed"' in err and "add --coupled" in err
    err = refused_before_loading(*models(near_tie_checkpoints), "--prompts-file", prompts)  # greedy: both are needed
    assert 'line 1 has a "seed"' in err and "add --temperature 0.8 --coupled (a temperature above 0)" in err
    prompts.write_text(json.dumps({"prompt": "Hello", "seed": -2}) + "\n", encoding="utf-8")
    err = refused_before_loading(*models(near_tie_checkpoints), "--prompts-file", prompts, "--coupled",
                                 "--temperature", 1)
    assert 'line 1: "seed" must be an integer from 0' in err
