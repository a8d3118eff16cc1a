"""Smoke test of benchmarks/bench.py on tiny random checkpoints: every row, derived figures, the plot."""

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


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    target = random_model(GPT2Config(n_positions=128, n_embd=32, n_layer=2, n_head=2), seed=0, scale=5)
    target.save_pretrained(folder / "target")
    noisy_copy(target, noise=0.08, seed=1).save_pretrained(folder / "draft")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--target", str(folder / "target"),
         "--draft", str(folder / "draft"), "--max-new-tokens", "12", "--lookahead", "2", "4", "--repeats", "2",
         "--dtype", "float32", "--out", str(folder / "out")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    data = json.loads((folder / "out" / "bench.json").read_text())
    # The table's rows, by run name: the markdown lines that start with a run's name.
    table = {name: [c.strip() for c in line.strip().strip("|").split("|")]
             for line in result.stdout.splitlines() for name in data["runs"] if line.startswith(f"| {name} |")}
    return data, table, folder / "out", result.stdout


def test_every_row_is_there(bench):
    data, table, _, _ = bench
    expected = {"naive (KV cache)", "naive (no cache)", "speculative, small, K=2", "speculative, small, K=4",
                "speculative, small, K=auto", "speculative, ngram, K=2", "speculative, ngram, K=4",
                "speculative, ngram, K=auto", "transformers generate", "transformers assisted, small, K=2",
                "transformers assisted, small, K=4", "transformers assisted, small, defaults",
                "transformers prompt lookup, ngram, K=2", "transformers prompt lookup, ngram, K=4"}
    assert set(data["runs"]) == expected == set(table)
    for name, run in data["runs"].items():
        assert len(run["seconds"]) == (1 if name == "naive (no cache)" else 2)
        assert len(run["tokens"]) == 12
        assert run["identical"], name  # fp32 greedy: every method gives the target's tokens


def test_derived_figures_match_the_raw_times(bench):
    data, table, _, _ = bench
    costs, runs = data["costs"], data["runs"]
    naive = statistics.median(runs["naive (KV cache)"]["seconds"])
    for name, run in runs.items():
        seconds = statistics.median(run["seconds"])
        assert table[name][1] == f"{seconds:.2f}"
        assert table[name][3] == f"{naive / seconds:.2f}"
        if run["method"] == "speculative":
            assert table[name][4] == (f"{run['accepted'] / run['proposed']:.2f}" if run["proposed"] else "")
            alpha = run["accepted"] / (run["accepted"] + run["rejections"]) if run["accepted"] else 0.0
            assert table[name][5] == f"{alpha:.2f}"
            assert table[name][7] == f"{len(run['tokens']) / len(run['lookahead_per_round']):.2f}"
            K = run["lookahead"]
            if K is None or run["draft"] == "ngram":  # adaptive, or a lookup that may propose nothing: no prediction
                continue

            def speedup(a):
                E = K + 1 if a == 1 else (1 - a ** (K + 1)) / (1 - a)
                # The target as its own draft: its 1-row pass in its verification's layout (packing.lay_out).
                draft_ms = costs["own_draft_ms"][str(K)] if run["draft"] == "target itself" else costs["draft_ms"]
                return E * costs["target_ms"] / (K * draft_ms + costs["verify_ms"][str(K)])

            assert table[name][8] == f"{speedup(alpha):.2f}"
            assert table[name][9] == f"{naive / seconds / speedup(alpha):.2f}"
            # Break-even: the predicted speedup crosses 1 there (or never does: "none"; or is above 1 at 0).
            if table[name][6] == "none":
                assert speedup(1) < 1
            elif table[name][6] == "0.00":
                assert speedup(0) >= 1 - 1e-9 or speedup(0.005) >= 1
            else:
                b = float(table[name][6])
                assert speedup(b - 0.005) <= 1 <= speedup(min(b + 0.005, 1))


def test_projection_and_costs_are_printed(bench):
    data, _, _, stdout = bench
    costs = data["costs"]
    round_ms = 4 * costs["draft_ms"] + costs["verify_ms"]["4"]
    assert f"give {costs['target_ms'] / (round_ms / 4.06):.2f}x over naive decoding with KV cache" in stdout
    assert f"target {costs['target_ms']:.1f} ms/token" in stdout
    assert costs["bandwidth_gbs"] > 0 and costs["target_bytes"] > 0


def test_plot_is_a_png(bench):
    _, _, out, _ = bench
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_looping_target_is_the_presets_random_checkpoint_with_scaled_residuals(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_script", os.path.join(ROOT, "benchmarks", "bench.py"))
    bench_module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_script", bench_module)  # its dataclasses look themselves up there
    spec.loader.exec_module(bench_module)

    written = []
    monkeypatch.setattr(bench_module, "write_random_checkpoint",
                        lambda name, folder, seed, scaled_residuals: written.append((name, folder.name, scaled_residuals)))
    args = bench_module.parse_args(["--random-weights", "--looping-target", "--weights-dir", str(tmp_path)])
    target, draft = bench_module.checkpoint_folders(args)
    assert written == [("gpt2-xl", "random-gpt2-xl-looping", True), ("gpt2", "random-gpt2", False)]
    assert (target.name, draft.name) == ("random-gpt2-xl-looping", "random-gpt2")
    with pytest.raises(SystemExit) as exit_info:
        bench_module.parse_args(["--looping-target"])
    assert exit_info.value.code == 2
