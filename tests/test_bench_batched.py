"""benchmarks/batched.py: a run on tiny random checkpoints (every cell, the table's figures from the raw times,
per-row equality, transformers' refusal), and its arithmetic on made-up times."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest

from gpt2_model import GPT2Config
from speculative_gpt2.random_checkpoint import noisy_copy, random_model

pytestmark = pytest.mark.slow  # the benchmark runs whole on tiny models: seconds apiece

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "batched.py")
N = 6  # new tokens per row


def _module():
    spec = importlib.util.spec_from_file_location("bench_batched", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


batched = _module()


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batched")
    target = random_model(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2), seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.08, seed=1).save_pretrained(folder / "draft")
    result = subprocess.run(
        [sys.executable, SCRIPT, "--target", str(folder / "target"), "--draft", str(folder / "draft"),
         "--batch-sizes", "1", "3", "--max-new-tokens", str(N), "--repeats", "2", "--prompt-lengths", "4", "12",
         "--references", "3", "--before", "HEAD",
         "--dtype", "float32", "--out", str(folder / "batched.json")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((folder / "batched.json").read_text())
    # The markdown rows, keyed by (method, batch column).
    table = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in batched.METHODS:
            table[cells[0], cells[1]] = cells
    return data, table, result.stdout


def _column(batch, single):
    return "1 (single-prompt call)" if single else str(batch)


def test_every_cell_ran_or_was_refused(bench):
    data, table, _ = bench
    expected = {(m, b, False) for m in batched.METHODS for b in (1, 3)} | {(m, 1, True) for m in batched.OURS}
    assert {(r["method"], r["batch"], r["single"]) for r in data["runs"].values()} == expected
    assert set(table) == {(m, _column(b, s)) for m, b, s in expected}
    for run in data["runs"].values():
        first = run["repeats"][0]
        if run["method"] == batched.HF_ASSISTED and run["batch"] > 1:
            assert "batch_size = 1" in first["error"]  # transformers' own words, kept for the table
            assert first["error"] in table[run["method"], "3"][2]
            continue
        assert len(run["repeats"]) == 2
        assert [len(t) for t in first["tokens"]] == [N] * run["batch"]  # no EOS: every row its full budget


def test_table_figures_come_from_the_raw_times(bench):
    data, table, _ = bench
    runs = {(r["method"], r["batch"], r["single"]): r["repeats"] for r in data["runs"].values()}

    def tokens_per_s(key):
        return key[1] * N / statistics.median(x["seconds"] for x in runs[key])

    for (method, batch, single), repeats in runs.items():
        if repeats[0]["error"]:
            continue
        cells = table[method, _column(batch, single)]
        decode = statistics.median(x["seconds"] - x["prefill_seconds"] for x in repeats)
        made_after_prefill = batch * (N - 1 if method.startswith("transformers") else N)
        assert cells[2] == f"{statistics.median(x['seconds'] for x in repeats):.2f}"
        assert cells[3] == f"{tokens_per_s((method, batch, single)):.2f}"
        assert cells[4] == f"{made_after_prefill / decode:.2f}"
        if not single:
            assert cells[5] == f"{tokens_per_s((method, batch, False)) / tokens_per_s((method, 1, False)):.2f}"
        if method == batched.PLAIN and not single:
            hf = (batched.HF_GENERATE, batch, False)
            assert cells[6] == f"{tokens_per_s((method, batch, False)) / tokens_per_s(hf):.2f}"


def test_float32_rows_equal_the_single_prompt_calls(bench):
    # At temperature 0 in float32 each batched row must be the single-prompt call's tokens, and transformers'
    # left-padded batch must give the same tokens (else its padding or mask is wrong and the timing compares
    # different work).
    data, table, _ = bench
    prompts = data["prompts"]
    assert len({len(p) for p in prompts}) > 1  # ragged
    for run in data["runs"].values():
        first = run["repeats"][0]
        if first["error"]:
            continue
        expected = data["reference"][batched.PLAIN][: run["batch"]]
        assert first["tokens"] == expected, run["method"]
        assert table[run["method"], _column(run["batch"], run["single"])][9] == f"{run['batch']}/{run['batch']}"


def test_kv_cache_and_targets_are_printed(bench):
    data, _, stdout = bench
    kv = data["kv_cache"]
    assert kv["per_token"] == 2 * 2 * 32 * 4  # 2 x n_layer x n_embd x float32
    assert kv["per_row"] == kv["per_token"] * (12 + N)
    assert f"{kv['per_token']} bytes per token" in stdout
    table = batched.derive(data)
    for line in batched.targets(data, table):
        assert line in stdout


def _made_up(seconds: dict, tokens=None) -> dict:
    """Results of a run with the given seconds per (method, batch, single) and 4 new tokens per row."""
    runs = {}
    for (method, batch, single), times in seconds.items():
        rows = tokens or [[1, 2, 3, 4]] * batch
        repeats = [{"seconds": s, "prefill_seconds": 0.5, "tokens": rows[:batch], "decode_tokens": 4 * batch,
                    "target_calls": [2] * batch, "accepted": 3 * batch, "proposed": 4 * batch, "error": None}
                   for s in times]
        runs[batched.Cell(method, batch, single).name] = {"method": method, "batch": batch, "single": single,
                                                          "repeats": repeats}
    return {"meta": {"tolerance": 0.02}, "runs": runs,
            "reference": {batched.SELF: [[1, 2, 3, 4]] * 8, batched.PLAIN: [[1, 2, 3, 4], [9, 9, 9, 9]]}}


def test_targets_arithmetic_on_made_up_times():
    S, P, HF = batched.SELF, batched.PLAIN, batched.HF_GENERATE
    results = _made_up({(S, 1, False): [4.0, 1.0, 2.0], (S, 8, False): [3.0, 3.0, 5.0], (S, 1, True): [2.1],
                        (P, 1, False): [2.0], (P, 8, False): [3.0], (P, 1, True): [1.9],
                        (HF, 1, False): [2.0], (HF, 8, False): [2.9]})
    table = batched.derive(results)
    row = {(r["method"], r["batch"], r["single"]): r for r in table}
    assert row[S, 8, False]["tokens_per_s"] == 32 / 3.0  # the median of 3, 3, 5
    assert row[S, 8, False]["decode_tokens_per_s"] == 32 / 2.5
    assert row[S, 8, False]["over_batch_1"] == pytest.approx((32 / 3) / (4 / 2))
    assert row[S, 8, False]["tokens_per_target_pass"] == 32 / 2
    assert row[S, 8, False]["acceptance"] == 0.75
    assert row[S, 8, False]["rows_equal"] == 8
    assert row[P, 8, False]["rows_equal"] == 1 and row[P, 8, False]["rows_checked"] == 2  # only 2 references
    lines = batched.targets(results, table)
    assert f"- {S}: batch 8 / batch 1 = 5.33x (target >= 4x): met" in lines
    # 2.9 s against 3.0 s: transformers is faster at batch 8.
    assert any(line.startswith("- plain over transformers") and "batch 8: 0.97x" in line and line.endswith("NOT met")
               for line in lines)
    assert f"- {S}: batch 1 / single-prompt call = 1.05x (target: no slower, within 2% noise): met" in lines
    assert f"- {P}: batch 1 / single-prompt call = 0.95x (target: no slower, within 2% noise): NOT met" in lines


def test_append_refuses_other_settings_and_merges_cells():
    meta = {"target": "t", "dtype": "float32", "device": "cpu", "max_new_tokens": 4, "lookahead": 4,
            "prompt_lengths": [8, 40], "seed": 0, "ngram": [3, 1], "command": "a", "before": "abc"}
    earlier = {"meta": meta, "prompts": [[1]] * 4, "runs": {"x @ batch 4": 1, "y @ batch 4": 2},
               "reference": {batched.PLAIN: [[1]] * 4}}
    new = {"meta": meta | {"command": "b", "before": None}, "prompts": [[1]] * 2,
           "runs": {"x @ batch 4": 3, "x @ batch 2": 4}, "reference": {batched.PLAIN: [[1]] * 2}}
    merged = batched._merged(earlier, new)
    assert merged["runs"] == {"x @ batch 4": 3, "y @ batch 4": 2, "x @ batch 2": 4}
    assert len(merged["prompts"]) == 4 and len(merged["reference"][batched.PLAIN]) == 4
    assert merged["meta"]["before"] == "abc" and merged["meta"]["command"] == "a; b"
    with pytest.raises(SystemExit, match="dtype"):
        batched._merged(earlier, new | {"meta": meta | {"dtype": "bfloat16"}})
