"""The report a busy machine cannot fake, in one vocabulary: each run against its own steps at their median pace
(speculative_gpt2/timing.py), the why lines in target passes per round (report.py), and the command line naming the
run that load slowed."""

import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from speculative import Generation, Origin, Round
from speculative_gpt2.random_checkpoint import tiny_pair
from speculative_gpt2.records import Step
from speculative_gpt2.report import acceptance, exact_rows, k_used, run_shape, tree_line, why_slower
from speculative_gpt2.timing import BUSY, Timed, expected_seconds, pace_line, speedup_lines

CPU = torch.device("cpu")


def naive_run(step_ms: list[float], prefill=0.1) -> Generation:
    n = len(step_ms)
    out = Generation(tokens=list(range(n)), origins=[Origin.TARGET] * n, target_calls=n,
                     steps=[Step(0, ms) for ms in step_ms], prefill_seconds=prefill)
    out.seconds = prefill + sum(step_ms) / 1e3
    return out


def speculative_run(rounds: list[Round], step_ms: list[float] | None = None, prefill=0.1) -> Generation:
    """Rounds whose steps took their draft and verification time (or `step_ms`)."""
    step_ms = step_ms or [r.draft_ms + r.verify_ms for r in rounds]
    out = Generation(rounds=rounds, target_calls=len(rounds), prefill_seconds=prefill,
                     steps=[Step(r.lookahead, ms) for r, ms in zip(rounds, step_ms)])
    for r in rounds:
        out.tokens += [1] * (r.kept + 1)
        out.origins += [Origin.DRAFT] * r.kept + [Origin.BONUS if r.kept == r.lookahead else Origin.RESAMPLED]
    out.draft_calls = sum(r.lookahead for r in rounds)
    out.seconds = prefill + sum(step_ms) / 1e3
    return out


# ---------------------------------------------------------------------------------------------------- the timings


def test_a_burst_moves_the_time_but_not_the_median_pace():
    quiet = naive_run([100.0] * 10)
    burst = naive_run([100.0] * 7 + [1000.0] * 3)
    assert expected_seconds(quiet) == expected_seconds(burst) == pytest.approx(1.1)
    assert Timed.of("naive", [quiet]).slowdown == pytest.approx(1.0)
    assert Timed.of("naive", [burst]).slowdown == pytest.approx(3.8 / 1.1)


def test_steps_of_each_width_keep_their_own_median():
    # Rounds of K = 1 cost 150 ms, of K = 7 400 ms: the expected time is each at its own pace, not one median.
    spec = speculative_run([Round(1, 1, 50, 100)] * 3 + [Round(7, 7, 200, 200)] * 4)
    assert expected_seconds(spec) == pytest.approx(spec.seconds)


def test_a_burst_during_plain_decoding_is_named_and_the_median_speedup_trusted():
    spec = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 5)])
    naive = Timed.of("plain decoding", [naive_run([100.0] * 20 + [2000.0] * 5)])
    trusted, lines = speedup_lines(spec, naive, "plain decoding")
    # 25 tokens in 1.1 s (spec) against 25 tokens at 100 ms a step: 2.5 / 1.1 from the medians.
    assert trusted == pytest.approx(2.6 / 1.1)
    assert lines[0].startswith(f"speedup over plain decoding: {trusted:.2f}x from the median steps (timed: ")
    assert "the machine was busy: plain decoding took" in lines[1] and f"trust {trusted:.2f}x" in lines[1]


def test_a_quiet_machine_prints_the_timed_speedup():  # the negative control of the test above
    spec = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 5)])
    naive = Timed.of("plain decoding", [naive_run([100.0] * 25)])
    trusted, lines = speedup_lines(spec, naive, "plain decoding")
    assert trusted == pytest.approx(2.6 / 1.1)
    assert lines == [f"speedup over plain decoding: {trusted:.2f}x (from the median steps: {trusted:.2f}x)",
                     "timing: each run took plain decoding 1.00x, speculative sampling 1.00x of its median pace (a "
                     "quiet machine: the timed figures hold)"]


def test_a_run_timed_alone_is_checked_against_its_own_pace_too():
    quiet = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 5)], [0.95])
    burst = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 5,
                                                              [200.0] * 3 + [2000.0] * 2)], [0.95])
    starved = Timed.of("plain decoding", [naive_run([100.0] * 25)], [0.6])
    assert pace_line(quiet) == ("timing: speculative sampling took 1.00x of its median pace, 95 % of its threads' CPU "
                                "time (a quiet machine: its speed holds)")
    assert pace_line(burst).startswith("timing: the machine was busy: speculative sampling took 4.27x the time its "
                                       "median steps predict, 95 % of its threads' CPU time")
    assert pace_line(starved) == ("timing: plain decoding kept its median pace (1.00x) but got only 60 % of its "
                                  "threads' CPU time: other processes ran throughout; its speed above is low")


def test_load_on_both_runs_alike_keeps_the_ratio_and_says_the_speeds_are_off():
    # A third of each run's steps 2.5x slower: both took 1.5x their median pace.
    spec = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 6, [200.0] * 4 + [500.0] * 2)])
    naive = Timed.of("plain decoding", [naive_run([100.0] * 20 + [250.0] * 10)])
    trusted, lines = speedup_lines(spec, naive, "plain decoding")
    assert trusted == pytest.approx((spec.tokens / spec.seconds) / (naive.tokens / naive.seconds))
    assert "busy throughout; the speedup holds, the speeds above do not" in lines[1]


def test_load_through_every_step_is_seen_in_the_cpu_time_each_run_got():
    # Load that lasts through whole runs moves their medians too: the slowdowns stay 1.0, the CPU share does not.
    def timed(share):
        spec = Timed.of("speculative sampling", [speculative_run([Round(4, 4, 80, 120)] * 5)], [share])
        return spec, Timed.of("plain decoding", [naive_run([100.0] * 25)], [share])

    _, starved = speedup_lines(*timed(0.62), "plain decoding")
    assert starved[1].startswith("timing: each run kept its median pace (plain decoding 1.00x, speculative sampling "
                                 "1.00x) but got only part of its threads' CPU time (plain decoding 62 %, speculative "
                                 "sampling 62 %): other processes ran throughout")
    _, quiet = speedup_lines(*timed(0.97), "plain decoding")  # the negative control
    assert quiet[1].endswith("97 % or more of its threads' CPU time (a quiet machine: the timed figures hold)")


@settings(max_examples=60, deadline=None)
@given(naive_steps=st.integers(4, 40), rounds=st.integers(4, 20), naive_ms=st.floats(5, 500),
       round_ms=st.floats(5, 2000),
       slowed=st.sampled_from(["plain decoding", "speculative sampling"]), burst=st.floats(1.5, 50),
       data=st.data())
def test_bursts_on_fewer_than_half_the_steps_leave_the_trusted_speedup_alone(naive_steps, rounds, naive_ms, round_ms,
                                                                              slowed, burst, data):
    """Whatever burst of load lands on fewer than half of one run's steps, the speedup the report trusts stays within
    BUSY of the quiet runs' one; when the report says the machine was busy, it names the slowed run and trusts
    exactly the quiet figure."""
    quiet_naive, quiet_spec = [naive_ms] * naive_steps, [round_ms] * rounds
    loaded_naive, loaded_spec = list(quiet_naive), list(quiet_spec)
    loaded = loaded_naive if slowed == "plain decoding" else loaded_spec
    hit = data.draw(st.sets(st.integers(0, len(loaded) - 1), max_size=(len(loaded) - 1) // 2))
    for i in hit:
        loaded[i] *= burst

    def runs(naive_ms_list, spec_ms_list):
        spec = speculative_run([Round(3, 1, 0.2 * ms, 0.8 * ms) for ms in spec_ms_list], spec_ms_list)
        return Timed.of("speculative sampling", [spec]), Timed.of("plain decoding", [naive_run(naive_ms_list)])

    quiet, _ = speedup_lines(*runs(quiet_naive, quiet_spec), "plain decoding")
    trusted, lines = speedup_lines(*runs(loaded_naive, loaded_spec), "plain decoding")
    if "busy" in lines[1]:
        assert trusted == pytest.approx(quiet) and f"the machine was busy: {slowed} took" in lines[1]
    else:
        assert quiet / BUSY <= trusted * (1 + 1e-9) and trusted <= quiet * BUSY * (1 + 1e-9)


# ------------------------------------------------------------------------------------------- one vocabulary, why


def test_one_acceptance_figure_defined_where_it_is_printed():
    spec = speculative_run([Round(4, 2, 80, 120), Round(4, 4, 80, 120), Round(4, 0, 80, 120)])
    assert acceptance([spec]) == "acceptance rate: 0.50 (drafts kept / drafts proposed: 6 of 12)"
    assert acceptance([Generation()]).startswith("acceptance rate: n/a")


def test_a_tree_run_says_its_acceptance_is_over_the_trees_depths():
    # Trees of 9 nodes, depth 2: a round keeps at most 2 drafts, one per level, whatever its nodes.
    trees = speculative_run([Round(2, 2, 80, 120, nodes=9), Round(2, 1, 80, 120, nodes=9), Round(2, 0, 80, 120, 9)])
    assert acceptance([trees], trees=True) == ("acceptance rate: 0.50 (drafts kept / tree depth, summed over rounds: "
                                               "3 of 6; a tree keeps at most one draft per level)")
    assert "drafts kept / drafts proposed: 3 of 6" in acceptance([trees])  # a chain's run: drafts proposed


def test_the_token_trees_line_compares_with_a_chain_of_the_trees_own_depth():
    # A lookup that found one continuation (a chain of 4), then two (7 nodes), then nothing.
    lookup = speculative_run([Round(4, 1, 1, 100, nodes=4), Round(3, 0, 1, 100, nodes=7), Round(0, 0, 1, 100)])
    # Over the rounds that drafted, as "per drafting round" is everywhere in the report.
    assert tree_line([lookup]) == ("token trees: 5.5 drafts scored per drafting round, in trees of mean depth 3.50 (a "
                                   "chain of that depth scores 3.50)")
    assert tree_line([Generation()]) is None
    assert tree_line([speculative_run([Round(0, 0, 0, 5.0)])]) is None  # nothing drafted (one token asked): no line


def test_titles_name_the_tree_whatever_k_is():
    assert run_shape("auto", None, 3) == "K=auto, trees of 3 lookup matches"
    assert run_shape(4, None, 1) == "K=4"
    assert run_shape(2, "3x2", 1) == "K=2, a tree 3x2"
    from speculative_gpt2.tree_search import FittedTree
    from speculative_gpt2.trees import TreeShape

    assert run_shape(2, TreeShape((3, 2))) == "K=2, a tree 3x2"
    assert run_shape(4, FittedTree(depth=3)) == "a tree fitted during the run, depth up to 3"


def test_exact_modes_rows_say_why_they_are_a_multiple_of_four():
    from speculative_gpt2.exact import padded_rows

    assert exact_rows(padded_rows(5)).startswith("8 rows: the most a round verifies, its drafts and the pending token, "
                                                  "rounded up to a multiple of 4")


def test_k_used_says_the_k_of_the_rounds():
    fixed = speculative_run([Round(4, 0, 1, 1)] * 3 + [Round(2, 0, 1, 1)])
    assert k_used([fixed], 4).startswith("K=4 (3.50 per drafting round on average")
    assert k_used([speculative_run([Round(4, 0, 1, 1)] * 3)], 4) == "K=4"
    auto = speculative_run([Round(1, 0, 1, 1), Round(3, 0, 1, 1), Round(7, 0, 1, 1), Round(0, 0, 0, 1)])
    assert k_used([auto], "auto") == "K auto: mean 3.67, from 1 to 7"
    assert k_used([auto], "auto", short=True) == "K auto (mean 3.67)"


def why(spec, naive, speedup, lookahead=4, lookup=False):
    return why_slower([spec], [naive], speedup, lookahead=lookahead, lookup=lookup, dtype=torch.float32, device=CPU)


def test_a_useless_draft_is_explained_in_target_passes_per_round():
    # K = 4, nothing kept: rounds of 4 x 20 ms drafts + 130 ms verification, 1 token each, against 100 ms a token.
    spec = speculative_run([Round(4, 0, draft_ms=80, verify_ms=130)] * 5)
    lines = why(spec, naive_run([100.0] * 5), speedup=0.5)
    assert lines[0] == ("why: at K=4 a drafting round cost 2.10 target passes (4.00 draft passes of 0.20 each, and a "
                        "verification of 1.30: medians) and yielded 1.00 tokens: it pays only when it yields more than "
                        "it costs")
    assert lines[1].startswith("try: --lookahead auto") and "a draft model that agrees more" in lines[1]
    assert "kept 0% of the time" in lines[1] and "never" not in lines[1]
    assert "ngram" not in lines[1] and "--draft gpt2" not in lines[1]


@pytest.mark.parametrize("tree, lookahead, offered", [("3x2", 2, "try: --tree auto (a tree fitted to the drafts "
                                                                     "kept during the run)"),
                                                      ("auto", "auto", None), (None, 4, "try: --lookahead auto")])
def test_a_tree_run_is_not_offered_a_lookahead_it_cannot_take(tree, lookahead, offered):
    # --tree sets K by its depth and refuses --lookahead: a fixed shape is offered the fitted one, auto nothing on K.
    spec = speculative_run([Round(2, 0, draft_ms=40, verify_ms=130, nodes=9)] * 5)
    lines = why_slower([spec], [naive_run([100.0] * 5)], 0.5, lookahead=lookahead, lookup=False, dtype=torch.float32,
                       device=CPU, tree=tree)
    hint = lines[1]
    assert (offered is None or hint.startswith(offered)) and ("--lookahead" in hint) == (tree is None)
    assert ("--tree auto" in hint) == (tree == "3x2")


def test_the_parts_of_a_round_add_up_to_its_cost_when_rounds_draft_fewer():
    # Rounds of 3 or 4 drafts (the last tokens of a budget): the cost is the mean drafts times a draft pass plus a
    # verification, each a median, and the line says so; a hint names the acceptance it saw.
    rounds = [Round(4, 1, 84, 225)] * 3 + [Round(3, 0, 63, 225)]
    lines = why(speculative_run(rounds), naive_run([100.0] * 6), speedup=0.5)
    drafts, per_draft, verify = 3.75, 0.21, 2.25
    assert f"a drafting round cost {drafts * per_draft + verify:.2f} target passes ({drafts:.2f} draft passes of " \
           f"{per_draft:.2f} each, and a verification of {verify:.2f}: medians)" in lines[0]
    assert "kept 20% of the time" in lines[1]


def test_a_lookup_that_finds_nothing_gets_hints_for_a_lookup():
    rounds = [Round(0, 0, 0.0, 100)] * 4 + [Round(2, 0, 0.4, 120)] * 2
    lines = why(speculative_run(rounds), naive_run([100.0] * 6), speedup=0.9, lookahead="auto", lookup=True)
    assert "lookups of 0.002 each" in lines[0] and "found nothing to propose in 4 of 6 rounds" in lines[0]
    assert "K auto (mean 2.00)" in lines[0]
    assert "a draft model (--draft gpt2, downloaded once; or a checkpoint folder of a small GPT-2)" in lines[1]
    assert "agrees more" not in lines[1]
    assert "--lookahead auto" not in lines[1]  # already on


def test_rounds_that_pay_but_a_short_run_that_does_not_is_said_so():
    spec = speculative_run([Round(4, 4, 40, 120)] * 2, prefill=2.0)
    lines = why(spec, naive_run([100.0] * 10), speedup=0.8)
    assert lines[0].startswith("why: a round yielded 5.00 tokens for 1.60 target passes, which pays")
    assert "more --max-new-tokens" in lines[1]


def test_a_fast_run_needs_no_explanation():
    spec = speculative_run([Round(4, 4, 40, 120)] * 4)
    assert why(spec, naive_run([100.0] * 20), speedup=3.0) == []
    assert why(Generation(), naive_run([100.0] * 20), speedup=0.5) == []


# --------------------------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    target, draft = tiny_pair()
    folder = tmp_path_factory.mktemp("tiny")
    target.save_pretrained(folder / "target")
    draft.save_pretrained(folder / "draft")
    return folder


def slowed_during(monkeypatch, sampler: str, steps: range, seconds=0.5):
    """Injects a busy phase: the timed run of `sampler` ("autoregressive_sample": 1-row plain decoding, not its
    exact mode; or "speculative_sample") sleeps inside some of its steps (the streaming callback runs in a step)."""
    from speculative_gpt2 import cli

    real = getattr(cli, sampler)

    def slowed(*args, **kwargs):
        inner, count = kwargs.get("on_tokens"), [0]
        if inner is not None and not (sampler == "autoregressive_sample" and kwargs.get("exact")):  # warm-ups: none

            def on_tokens(new):
                count[0] += 1
                if count[0] in steps:
                    time.sleep(seconds)
                inner(new)

            kwargs["on_tokens"] = on_tokens
        return real(*args, **kwargs)

    monkeypatch.setattr(cli, sampler, slowed)


@pytest.mark.parametrize("sampler, name, steps", [("autoregressive_sample", "plain decoding", range(4, 12)),
                                                  ("speculative_sample", "speculative sampling", range(2, 5))])
def test_the_command_line_names_the_run_a_busy_phase_slowed(tiny_checkpoints, run_cli, monkeypatch, sampler, name,
                                                            steps):
    slowed_during(monkeypatch, sampler, steps)
    threads = torch.get_num_threads()
    try:  # one thread: the tiny passes time more steadily on a shared machine
        status, out, err = run_cli("--target", tiny_checkpoints / "target", "--draft", tiny_checkpoints / "draft",
                                   "--max-new-tokens", 40, "--ignore-eos", "--no-stream", "--lookahead", 3,
                                   "--threads", 1)
    finally:
        torch.set_num_threads(threads)
    assert status == 0, err
    speedup = next(line for line in out.splitlines() if line.startswith("speedup over plain decoding"))
    timed = float(speedup.split("timed: ")[1].split("x")[0])
    trusted = float(speedup.split(": ")[1].split("x")[0])
    assert "from the median steps (timed" in speedup
    # Steps of 500 ms more in a run of fast ones, fewer than half of them: the timed figure is skewed well away from
    # the median one, up when plain decoding was slowed, down when speculative sampling was.
    assert (timed > 1.3 * trusted) if name == "plain decoding" else (timed < trusted / 1.3), out
    assert f"the machine was busy: {name} took" in out
    assert "Warming up: plain decoding" in err and "Warming up: speculative sampling" in err


def test_the_command_line_sees_processes_that_compete_for_every_core(tiny_checkpoints, run_cli):
    # A busy loop per core for the whole run: the report must not call the machine quiet. Tiny passes get slowed in
    # bursts (the skew is seen) or alike (the CPU time the runs got is seen), as the scheduler has it.
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        status, out, err = run_cli("--target", tiny_checkpoints / "target", "--draft", tiny_checkpoints / "draft",
                                   "--max-new-tokens", 24, "--ignore-eos", "--no-stream")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert status == 0, err
    assert "a quiet machine" not in out, out
    assert "the machine was busy" in out or "other processes ran throughout" in out, out


def test_repeats_alternate_the_runs_and_state_the_range(tiny_checkpoints, run_cli):
    status, out, err = run_cli("--target", tiny_checkpoints / "target", "--draft", tiny_checkpoints / "draft",
                               "--max-new-tokens", 12, "--ignore-eos", "--no-stream", "--repeats", 3,
                               "--temperature", 0.8)
    assert status == 0, err
    order = [line.split(",")[0] for line in out.splitlines() if ", run " in line]
    assert order == ["Plain decoding", "Speculative sampling"] * 2
    assert "median of 3 alternating runs each; " in out
    assert "K=4" in out and "acceptance rate: " in out and "(drafts kept / drafts proposed: " in out


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "argument --repeats: invalid value '0': must be an integer from 1 to 20"),
    (["--repeats", "21"], "argument --repeats: invalid value '21'"),
    (["--repeats", "3", "--prompts-file", "prompts.txt"], "--repeats times one prompt: leave it out with --prompts-file"),
])
def test_bad_repeats_are_one_line(run_cli, args, message):
    status, out, err = run_cli(*args)
    assert status == 2 and out == "" and message in err and err.count("\n") == 1, err


def test_an_exact_mode_prefill_that_took_the_run_is_named_before_the_rounds():
    # A long prompt: the speculative run in exact mode spent 40 of its 41 s in 8-row prefill passes, plain 3 s.
    spec = speculative_run([Round(4, 0, 80, 140)] * 5, prefill=40.0)
    plain = naive_run([100.0] * 5, prefill=3.0)
    lines = why_slower([spec], [plain], 0.1, lookahead=4, lookup=False, dtype=torch.float32, device=CPU, exact_rows=8)
    assert lines[0] == ("why: the prompt's prefill took 40.0 s of the speculative run's 41.1 s (plain decoding's "
                        "3.0 s): exact mode, which makes the texts compare bit for bit, runs it in passes of 8 rows, "
                        "many for a long prompt; --mode speculative times it without exact mode")
    assert lines[1].startswith("why: at K=4 a drafting round cost")
    assert not any("prefill took" in line for line in why(spec, plain, 0.1))  # not in exact mode: not that
    short = speculative_run([Round(4, 0, 80, 130)] * 5, prefill=0.3)  # a short prompt's prefill: the rounds only
    assert not any("prefill took" in line for line in why_slower(
        [short], [plain], 0.5, lookahead=4, lookup=False, dtype=torch.float32, device=CPU, exact_rows=8))


def test_a_run_timed_alone_that_a_busy_phase_slowed_is_named(tiny_checkpoints, run_cli, monkeypatch):
    slowed_during(monkeypatch, "speculative_sample", range(2, 5))
    status, out, err = run_cli("--target", tiny_checkpoints / "target", "--draft", tiny_checkpoints / "draft",
                               "--max-new-tokens", 40, "--ignore-eos", "--no-stream", "--lookahead", 3,
                               "--mode", "speculative")
    assert status == 0, err
    assert "speedup over" not in out and "timing: the machine was busy: speculative sampling took" in out


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_on_a_cpu_that_emulates_it_is_said_so(tiny_checkpoints, run_cli, monkeypatch, native):
    monkeypatch.setattr("speculative_gpt2.cli.native_bfloat16", lambda: native)
    status, out, err = run_cli("--target", tiny_checkpoints / "target", "--max-new-tokens", 2, "--mode", "plain",
                               "--dtype", "bfloat16", "--device", "cpu", "--no-stream")
    assert status == 0, err
    line = next(line for line in out.splitlines() if line.startswith("dtype: "))
    assert ("emulated on this CPU (no AVX-512 BF16 or AMX; --dtype auto picks float32 here)" in line) != native, line
