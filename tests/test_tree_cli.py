"""Token trees from the command line: `--tree WIDTHS` (the draft model's tree) and `--draft ngram --matches M`
(prompt lookup's), end to end in a subprocess on tiny random checkpoints; refusals in this process."""

import re

import pytest

from test_cli import checkpoints, run_cli  # noqa: F401


@pytest.mark.parametrize("args, title, most", [
    (["--tree", "3x2"], "=== Speculative sampling (K=2, a tree 3x2), exact mode ===", 9),
    (["--draft", "ngram", "--matches", "3", "-K", "3"],
     "=== Speculative sampling (K=3, trees of 3 lookup matches), exact mode ===", 9),
    (["--tree", "depth=3,width=2,expand=2"],
     "=== Speculative sampling (K=3, a tree depth=3,width=2,expand=2), exact mode ===", 10),
    (["--tree", "parents=-1,-1,-1,0,0,0,1,3,3,6,7"],
     "=== Speculative sampling (K=4, a tree parents=-1,-1,-1,0,0,0,1,3,3,6,7), exact mode ===", 11),
])
def test_a_tree_run_reports_its_drafts_per_pass_and_compares_the_texts(checkpoints, args, title, most):
    options = ["--draft", str(checkpoints / "draft")] if "ngram" not in args else []
    result = run_cli("--target", str(checkpoints / "target"), *options, *args, "--max-new-tokens", "20",
                     "--prompt", "one two one three one two one", "--ignore-eos", "--device", "cpu", "--no-stream")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert title in out
    scored = float(re.search(r"token trees: ([\d.]+) drafts scored per drafting round", out).group(1))
    assert 1 <= scored <= most  # a 3x2 tree has 9 nodes, 3 matches of 3 at most 9, the expanding tree 2 + 2 x 4
    # The trees' mean depth is the K the line above it says the rounds drafted: one figure, said twice alike.
    k = re.search(r"mean tokens per target pass: [\d.]+; (?:K=|tree depth )(\d+)(?: \(([\d.]+) per drafting round)?",
                  out)
    depth = float(re.search(r"in trees of mean depth ([\d.]+)", out).group(1))
    assert depth == pytest.approx(float(k.group(2) or k.group(1)), abs=0.005)
    # 9 to 11 nodes and the root: every target pass, plain decoding's too, runs as 12 rows.
    assert ("identical outputs: yes (speculative sampling's text against plain decoding's in exact mode, both in "
            "12-row passes)") in out


def test_lookup_trees_with_k_auto_keep_their_trees_in_the_title(checkpoints):
    result = run_cli("--target", str(checkpoints / "target"), "--draft", "ngram", "--matches", "3", "-K", "auto",
                     "--max-new-tokens", "12", "--prompt", "one two one three one two one", "--ignore-eos",
                     "--device", "cpu", "--no-stream", "--mode", "speculative")
    assert result.returncode == 0, result.stderr
    assert "=== Speculative sampling (K=auto, trees of 3 lookup matches) ===" in result.stdout
    assert re.search(r"token trees: [\d.]+ drafts scored per drafting round, in trees of mean depth [\d.]+ \(a chain of "
                     r"that depth scores [\d.]+\)", result.stdout), result.stdout


@pytest.mark.parametrize("args, message", [
    (["--tree", "3x2", "--lookahead", "3"], "--tree drafts a token tree with the draft model and goes without "
     "--lookahead: the tree sets its depth itself (3x2: 2; auto: up to 4)"),
    (["--tree", "3x2", "--draft", "ngram"], "goes without --draft ngram: for prompt lookup's trees, use --draft ngram "
     "--matches M instead"),
    (["--tree", "2x2", "--coupled"], "goes without --coupled: coupled sampling verifies chains only"),
    (["--tree", "0x2"], "argument --tree: invalid tree '0x2': widths from 1 to 64"),
    (["--tree", "8x8x8"], "argument --tree: invalid tree '8x8x8': the tree 8x8x8 has 584 nodes, more than 64"),
    (["--tree", "three"], "invalid tree 'three': give the widths per depth joined by x"),
    (["--tree", "3,2"], "or parents=P1,P2,..., depth=D,width=W[,expand=E], or auto"),
    (["--tree", "parents=" + ",".join(["-1"] * 65)], "65 nodes, more than 64: list fewer parents"),
    (["--tree", "depth=4,width=2,expand=3"], "invalid tree 'depth=4,width=2,expand=3': expand (the nodes given "
     "children at each depth) must be an integer from 1 to 2"),
    (["--tree", "depth=4,size=2"], "invalid tree 'depth=4,size=2': give depth=D,width=W and optionally expand=E"),
    (["--tree", "parents=-1,0,-1"], "invalid tree 'parents=-1,0,-1': give each node's parent, breadth-first, -1 for "
     "the root's children, each an earlier node and never smaller than the one before"),
    (["--tree", "parents=-1,x"], "invalid tree 'parents=-1,x': give each node's parent, breadth-first"),
    (["--tree", "parent=-1,0"], "give depth=D,width=W and optionally expand=E (e.g. depth=4,width=4,expand=2: 4 "
     "drafts, then 4 below each of the 2 likeliest, at each depth), or parents=P1,P2,..."),
    (["--matches", "2"], "--matches follows earlier matches of prompt lookup: add --draft ngram"),
    (["--tree", "3x2", "--mode", "plain"], "--tree makes token trees for speculative sampling, and --mode plain runs "
     "none: use --mode both or --mode speculative, or leave --tree out"),
    (["--draft", "ngram", "--matches", "2", "--mode", "plain"], "--matches makes token trees for speculative "
     "sampling, and --mode plain runs none"),
    (["--draft", "ngram", "--matches", "2", "--coupled"], "--matches 2 makes prompt lookup's token trees "
     "and goes without --coupled"),
    (["--draft", "ngram", "--matches", "17"], "argument --matches: invalid value '17'"),
    (["--draft", "ngram", "--matches", "16", "-K", "8"], "--matches 16 with K up to 8 makes trees of up to 128 drafts"),
    (["--tree", "auto", "--lookahead", "3"], "--tree drafts a token tree with the draft model and goes without "
     "--lookahead: the tree sets its depth itself"),
])
def test_what_tree_runs_do_not_take_exits_2_in_one_line(checkpoints, refused_before_loading, args, message):
    assert message in refused_before_loading("--target", str(checkpoints / "target"), *args)


def test_a_tree_runs_trace_page_draws_its_trees(checkpoints, tmp_path):
    page = tmp_path / "run.html"
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--tree", "2x2",
                     "--max-new-tokens", "12", "--ignore-eos", "--device", "cpu", "--trace", str(page), "--no-stream")
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "(a tree, 2 first drafts)" in text and "recursive rejection" in text


def test_help_explains_trees():
    out = run_cli("--help").stdout
    assert "--tree WIDTHS" in out and "--matches" in out and "token tree" in out and "depth=D,width=W,expand=E" in out \
        and "parents=-1,-1,0" in out and "Or auto: that fit made during the run itself" in " ".join(out.split())


def test_tree_auto_fits_the_tree_during_the_run_and_keeps_the_text(checkpoints):
    # The target as its own draft: the first sibling is always kept and no other ever is, so the fit is a chain (its
    # depth chosen by the measured times of draft passes and verifications).
    result = run_cli("--target", str(checkpoints / "target"), "--draft", str(checkpoints / "target"), "--tree", "auto",
                     "--max-new-tokens", "30", "--prompt", "one two one three", "--ignore-eos", "--device", "cpu",
                     "--no-stream")
    assert result.returncode == 0, result.stderr
    assert "=== Speculative sampling (a tree fitted during the run, depth up to 4), exact mode ===" in result.stdout
    assert "identical outputs: yes" in result.stdout
    fit = re.search(r"--tree auto: the last run ended with the tree parents=([-\d,]+) \((\d) nodes, depth (\d)\), "
                    r"fitted to the acceptance by sibling rank 1.00 0.00 0.00 0.00 0.00 0.00 0.00 0.00 \(\d+ tries of a "
                    r"first sibling, counted up to its last fit\), for the most tokens per ms by the passes' measured "
                    r"times", result.stdout)
    assert fit, result.stdout
    depth = int(fit.group(3))
    assert fit.group(1) == ",".join(map(str, range(-1, depth - 1))) and fit.group(2) == fit.group(3)


def test_tree_auto_in_a_run_too_short_to_fit_says_so(checkpoints, capsys):
    from speculative_gpt2 import cli

    status = cli.main(["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--tree", "auto",
                       "--max-new-tokens", "6", "--ignore-eos", "--device", "cpu", "--no-stream", "--mode",
                       "speculative"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "=== Speculative sampling (a tree fitted during the run, depth up to 4) ===" in out
    assert re.search(r"--tree auto: the last run had \d rounds, and the first 8 try 8 first drafts before the first "
                     r"fit: it drafted those only", out)
    assert "tree depth auto: mean 1.00, from 1 to 1" in out  # the fan's depth, not a K cut by the tokens left


def test_tree_auto_that_kept_no_draft_says_it_stayed_on_the_first_drafts(checkpoints, capsys, monkeypatch):
    # Every round's verdict counted as keeping nothing: the fit stays the fan, and the line says why.
    import dataclasses

    from speculative_gpt2 import cli

    class NothingKept(cli.FittedTree):
        def update(self, round):
            super().update(dataclasses.replace(round, kept=0, path=()))

    monkeypatch.setattr(cli, "FittedTree", NothingKept)
    status = cli.main(["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--tree", "auto",
                       "--max-new-tokens", "24", "--ignore-eos", "--device", "cpu", "--no-stream", "--mode",
                       "speculative"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert re.search(r"--tree auto: the last run kept no draft in \d+ tries of a first sibling, counted up to its last "
                     r"fit, so it stayed on the 8 first drafts \(one draft pass a round\)", out)


def test_each_run_of_tree_auto_fits_afresh_so_a_seed_gives_one_text(checkpoints, capsys, monkeypatch):
    # At temperature 1 the tree decides how the random stream is used: what one run measured must not steer the
    # next, or the second timed run of the same seed would give another text.
    from speculative_gpt2 import cli

    texts, sample = [], cli.speculative_sample
    monkeypatch.setattr(cli, "speculative_sample", lambda *args, **kwargs: texts.append(sample(*args, **kwargs)) or
                        texts[-1])
    status = cli.main(["--target", str(checkpoints / "target"), "--draft", str(checkpoints / "draft"), "--tree", "auto",
                       "--max-new-tokens", "40", "--ignore-eos", "--device", "cpu", "--no-stream", "--temperature",
                       "1", "--seed", "3", "--mode", "speculative", "--repeats", "3"])
    assert status == 0, capsys.readouterr().err
    warm_up, *timed = texts
    assert len(timed) == 3 and timed[0].tokens == timed[1].tokens == timed[2].tokens
    assert {r.nodes for r in timed[0].rounds} > {8}  # the fan, then a fitted tree
