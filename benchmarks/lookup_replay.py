"""Prompt lookup's trees against its chain on real text, replayed: how many tokens a target pass would give.

At temperature 0 what a round keeps depends only on the drafts and on the target's next tokens, so a text can stand
in for the target: the replay commits the text token by token as the target's greedy output, and each round asks
`PromptLookupDrafter(matches=M)` for its proposal, keeps the drafts that match the text (the child, among a node's,
that holds the text's next token: what the tree rule keeps at temperature 0) and adds the next token (the target's
correction, or its bonus after a kept leaf). No model runs, so the texts can be real ones, which random weights cannot
give: this repository's own files at fixed commits, in GPT-2's tokens and within GPT-2's context of 1024:

- `code, rewritten`: the old version of a stretch of speculative.py as the prompt, its next version as the text (an
  edit of a few lines in forty: prompt lookup's best case, a model asked to rewrite what it was given);
- `code` and `prose`: a stretch of a source file and of docs/design.md after a short prompt (the text repeats only
  itself).

With `--bound`, each text also gets the trie of *every* continuation of the last token's earlier occurrences (every
n-gram's occurrences are among them): an upper bound on what any tree built from the text's own history keeps at
depth K, whatever its matches or their order.

It counts target passes, not time: a pass of 1 + N rows costs more than a 1-row pass by what
`benchmarks/tree_pass_cost.py` measures on the machine. Needs the repository's git history.

    python benchmarks/lookup_replay.py --out benchmarks/results/lookup-replay.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from speculative_gpt2.drafters import PromptLookupDrafter, Proposal, Sampling, TreeProposal, one_hot  # noqa: E402
from speculative_gpt2.tokenizer import load_tokenizer  # noqa: E402

V = 50257
PROMPT_TOKENS, TEXT_TOKENS = 480, 480  # prompt + text within GPT-2's context


def replay(prompt: list[int], text: list[int], drafter, lookahead: int) -> dict:
    """Decodes `text` after `prompt` as greedy speculative sampling would with this drafter, the text standing in for
    the target's greedy tokens. Returns the target passes, the tokens, and the drafts verified (rows past the
    pending token) in all."""
    drafter.start(torch.tensor(prompt), len(prompt) + len(text), Sampling(None, None, V, greedy=True))
    done = passes = rows = 0
    while done < len(text):
        K = min(lookahead, len(text) - done - 1)  # no draft past what is left, as a call's last rounds
        proposal = drafter.propose(None, K) if K > 0 else None
        tokens = [] if proposal is None else proposal.tokens.tolist()
        parents = getattr(proposal, "parents", None) or list(range(-1, len(tokens) - 1))  # a chain's
        kept, at = 0, -1
        while True:  # down the tree while a child holds the text's next token
            child = next((i for i, parent in enumerate(parents) if parent == at and tokens[i] == text[done + kept]),
                         None)
            if child is None:
                break
            kept, at = kept + 1, child
        new = text[done : done + kept + 1]  # the kept drafts, and the target's own next token
        drafter.commit(new)
        done, passes, rows = done + len(new), passes + 1, rows + len(tokens)
    return {"passes": passes, "tokens": done, "drafts_verified": rows}


class EveryContinuation:
    """A drafter for the bound: the K tokens after every earlier occurrence of the last token, merged into one trie
    (any lookup's continuations are among them, since an n-gram's occurrences end in its last token)."""

    def start(self, prompt, max_len: int, sampling: Sampling) -> None:
        self.history = prompt.tolist()

    def commit(self, new: list[int]) -> None:
        self.history += new

    def propose(self, tokens, lookahead: int) -> Proposal:
        history, children = self.history, {(): []}  # a path of tokens from the root -> its children's paths
        for start in (i + 1 for i in range(len(history) - 1) if history[i] == history[-1]):
            copied = []
            for i in range(lookahead):  # copy forward, reading what was just copied past the end (as the lookup does)
                j = start + i
                copied.append(history[j] if j < len(history) else copied[j - len(history)])
                if tuple(copied) not in children:
                    children[tuple(copied)] = []
                    children[tuple(copied[:-1])].append(tuple(copied))
        ordered = list(children[()])  # breadth-first, siblings together
        for path in ordered:
            ordered += children[path]
        place = {path: i for i, path in enumerate(ordered)}
        parents = [place[path[:-1]] if len(path) > 1 else -1 for path in ordered]
        x = torch.tensor([path[-1] for path in ordered], dtype=torch.long)
        if not ordered:
            return Proposal(x, one_hot(x, V), None)
        return TreeProposal(x, one_hot(x, V), None, parents)


def git_file(commit: str, path: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True, capture_output=True,
                              text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"lookup_replay.py: cannot read {path} at commit {commit} ({getattr(e, 'stderr', e) or e}): it "
                 f"replays this repository's own files, so run it in a clone with its history (not a shallow one)")


def cases() -> dict[str, tuple[list[int], list[int]]]:
    """{name: (prompt tokens, text tokens)}."""
    encode = load_tokenizer().encode

    def lines_from(source: str, first_line: int) -> list[int]:
        return encode("".join(source.splitlines(keepends=True)[first_line - 1 :]))

    old, new = git_file("2bbe40f", "speculative.py"), git_file("3f8e7cb", "speculative.py")
    rewrite = (lines_from(old, 265)[:PROMPT_TOKENS] + encode("\n\n# The same lines, revised:\n\n"),
               lines_from(new, 265)[:TEXT_TOKENS])
    code = lines_from(git_file("1dd756f", "speculative_gpt2/trees.py"), 140)
    prose = lines_from(git_file("1dd756f", "docs/design.md"), 1)
    return {"code, rewritten": rewrite, "code": (code[:32], code[32 : 32 + 2 * TEXT_TOKENS]),
            "prose": (prose[:32], prose[32 : 32 + 2 * TEXT_TOKENS])}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookahead", type=int, nargs="+", default=[4, 8], help="K, the tree's depth")
    parser.add_argument("--matches", type=int, nargs="+", default=[1, 2, 4, 8], help="M; 1 is the chain")
    parser.add_argument("--max-ngram", type=int, default=3)
    parser.add_argument("--bound", action="store_true",
                        help="add the trie of every earlier continuation (EveryContinuation): an upper bound")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = []
    print(f"{'text':<16} {'K':>2}  " + "  ".join(f"{f'M = {m}: tokens/pass, drafts/pass':>32}" for m in args.matches))
    for name, (prompt, text) in cases().items():
        for K in args.lookahead:
            row = []
            for M in args.matches:
                counts = replay(prompt, text, PromptLookupDrafter(max_ngram=args.max_ngram, matches=M), K)
                results.append({"text": name, "prompt_tokens": len(prompt), "lookahead": K, "matches": M, **counts})
                per_pass = counts["tokens"] / counts["passes"], counts["drafts_verified"] / counts["passes"]
                row.append(f"{per_pass[0]:.2f}, {per_pass[1]:.1f}")
            if args.bound:
                counts = replay(prompt, text, EveryContinuation(), K)
                results.append({"text": name, "prompt_tokens": len(prompt), "lookahead": K, "matches": "every",
                                **counts})
                row.append(f"every: {counts['tokens'] / counts['passes']:.2f}, "
                           f"{counts['drafts_verified'] / counts['passes']:.1f}")
            print(f"{name:<16} {K:>2}  " + "  ".join(f"{cell:>32}" for cell in row))
    if args.out:
        Path(args.out).write_text(json.dumps({"max_ngram": args.max_ngram, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
