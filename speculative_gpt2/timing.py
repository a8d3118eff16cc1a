"""Timings a busy machine cannot fake: each run against its own steps at their median pace.

A shared machine's load comes and goes: a burst that lands on one of the compared runs slows some of its steps and
skews the timed speedup, while the median step of each kind stays where it was. So every decoding step is timed
(`Generation.steps`) and a run's *expected* time is its prefill plus every step at the median time of the steps of
its width (K drafts per row; plain decoding's steps all have width 0). A run's slowdown, timed / expected, is 1.0
on a quiet machine; the speedup from the expected times follows from tokens per target pass and the pass costs,
and the report trusts it over the timed one when the runs' slowdowns differ by more than `BUSY`.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from speculative_gpt2.records import Generation, Step

# Runs whose slowdowns differ by more than this factor were not slowed alike: the timed speedup is skewed. Quiet
# runs measure within a few per cent of their median steps (docs/design.md#timings-on-a-busy-machine).
BUSY = 1.15
# A CPU run that got less than this share of its threads' CPU time shared the cores with other processes: a run
# alone gets 0.9-1.0 (waiting threads spin, and count), one beside a busy loop on one of two cores about 0.64.
FAIR_SHARE = 0.8


def step_medians(steps: list[Step]) -> dict[int, float]:
    """The median ms of the steps of each width."""
    by_width = defaultdict(list)
    for step in steps:
        by_width[step.width].append(step.ms)
    return {width: statistics.median(times) for width, times in by_width.items()}


def expected_seconds(run: Generation) -> float:
    """The prefill plus every step at the median pace of its width: what the run takes when nothing else runs."""
    medians = step_medians(run.steps)
    return run.prefill_seconds + sum(medians[step.width] for step in run.steps) / 1e3


def middle_half(steps: list[Step]) -> tuple[float, float]:
    """The quartiles of the step times, in ms: the spread of a run's pace."""
    times = [step.ms for step in steps]
    if len(times) < 2:
        return times[0], times[0]
    low, _, high = statistics.quantiles(times, n=4, method="inclusive")
    return low, high


@dataclass(frozen=True)
class Timed:
    """A run's time as measured and as its median steps predict, and the tokens it made."""

    name: str
    tokens: int
    seconds: float
    expected: float
    cpu_share: float | None = None  # of its threads' CPU time, on a CPU: see `cpu_share`

    @classmethod
    def of(cls, name: str, runs: list[Generation], shares: list[float] | None = None) -> Timed:
        """One run, or the medians of repeats of it."""
        return cls(name, len(runs[0].tokens), statistics.median(r.seconds for r in runs),
                   statistics.median(expected_seconds(r) for r in runs),
                   statistics.median(shares) if shares else None)

    @property
    def slowdown(self) -> float:
        return self.seconds / self.expected if self.expected > 0 else 1.0


def cpu_share(cpu_seconds: float, wall_seconds: float, threads: int) -> float:
    """The share of its threads' CPU time a run got: the process's CPU seconds over wall seconds x threads. Load
    that lasts through a whole run moves its median steps too, but not this: other processes take cores from it."""
    return cpu_seconds / (wall_seconds * threads) if wall_seconds > 0 else 1.0


def pace_line(run: Timed) -> str:
    """The timing line of a run timed alone (no speedup to state): whether it kept its median pace and got its
    threads' CPU time, that is, whether its speed holds."""
    share = f", {100 * run.cpu_share:.0f} % of its threads' CPU time" if run.cpu_share is not None else ""
    if run.slowdown > BUSY:
        return (f"timing: the machine was busy: {run.name} took {run.slowdown:.2f}x the time its median steps predict"
                f"{share}, so other work ran during it; its speed above does not hold (its median steps do)")
    if run.cpu_share is not None and run.cpu_share < FAIR_SHARE:
        return (f"timing: {run.name} kept its median pace ({run.slowdown:.2f}x) but got only {share[2:]}: other "
                f"processes ran throughout; its speed above is low")
    return f"timing: {run.name} took {run.slowdown:.2f}x of its median pace{share} (a quiet machine: its speed holds)"


def speedup_lines(spec: Timed, base: Timed, label: str, others: tuple[Timed, ...] = (),
                  repeats: str = "") -> tuple[float, list[str]]:
    """The speedup of `spec` over `base` and the lines that state it; returns (the figure to trust, lines).

    The timed speedup is printed as it is when both runs kept their median pace alike (within `BUSY` of each
    other); otherwise the speedup from the median steps is the one printed and trusted, and a line says which run
    was slowed and by how much. `others` are further runs whose pace is stated; `repeats` says how the timed
    figure was taken, if not from one run each."""
    timed = (spec.tokens / spec.seconds) / (base.tokens / base.seconds)
    predicted = (spec.tokens / spec.expected) / (base.tokens / base.expected)
    slowest, fastest = max(base, spec, key=lambda r: r.slowdown), min(base, spec, key=lambda r: r.slowdown)
    paces = ", ".join(f"{r.name} {r.slowdown:.2f}x" for r in (base, *others, spec))
    if slowest.slowdown <= BUSY * fastest.slowdown:
        lines = [f"speedup over {label}: {timed:.2f}x{repeats} (from the median steps: {predicted:.2f}x)"]
        shares = [r for r in (base, *others, spec) if r.cpu_share is not None]
        starved = [r for r in shares if r.cpu_share < FAIR_SHARE]
        if fastest.slowdown > BUSY:  # slowed alike: the ratio holds, the speeds do not
            lines.append(f"timing: every run took {fastest.slowdown:.2f}x or more of its median pace ({paces}): the "
                         f"machine was busy throughout; the speedup holds, the speeds above do not")
        elif starved:  # load through every step: the medians moved with it
            got = ", ".join(f"{r.name} {100 * r.cpu_share:.0f} %" for r in shares)
            lines.append(f"timing: each run kept its median pace ({paces}) but got only part of its threads' CPU "
                         f"time ({got}): other processes ran throughout; the speeds above are low, and the speedup "
                         f"holds only as far as the load was steady")
        else:
            got = f", {min(r.cpu_share for r in shares) * 100:.0f} % or more of its threads' CPU time" if shares else ""
            lines.append(f"timing: each run took {paces} of its median pace{got} (a quiet machine: the timed "
                         f"figures hold)")
        return timed, lines
    return predicted, [
        f"speedup over {label}: {predicted:.2f}x from the median steps (timed: {timed:.2f}x{repeats}, skewed: "
        f"below)",
        f"timing: the machine was busy: {slowest.name} took {slowest.slowdown:.2f}x the time its median steps "
        f"predict ({paces}), so other work ran during it; trust {predicted:.2f}x (the median steps, which the load's "
        f"bursts do not move); --repeats 3 alternates the runs and takes medians"]
