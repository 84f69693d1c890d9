"""The run's budgets and the learning-rate schedule's horizon they imply, including a wall-clock budget
(`train.max_time`, `--max-time 4m`).

A step or token budget fixes the horizon before the first step. A time budget cannot: the horizon is estimated
from the step time measured over the first steps of a session (after TIMING_SKIP steps of start-up, over
TIMING_STEPS steps), then frozen in the `TrainState`, so every later checkpoint carries it and a resume repeats
the same schedule step for step; config.json gets a note saying the horizon came from timing. The run stops
when the budget is spent: the step that crosses it is the last one.

The horizon is planned for HORIZON_SHARE of the remaining time, so that a machine somewhat slower than measured
still reaches the schedule's floor before the budget ends; the steps after the horizon train at the floor
(`optim.lr_factor` clamps there) until the budget is spent. Cramming (Geiping & Goldstein 2022, arXiv
2212.14034) instead maps the elapsed time onto the schedule at every step (JonasGeiping/cramming,
`cramming/backend/optimizers/schedulers.py`, `_get_fake_step`), which no resume can repeat exactly.

Torch-free, so that the config can parse durations without importing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.checkpoint import TrainState
    from pretrain.config import TrainConfig

TIMING_SKIP = 2  # steps of a session left untimed: DataLoader workers starting, first-call allocations
TIMING_STEPS = 8  # steps timed after those; then the horizon is planned and frozen
HORIZON_SHARE = 0.9  # of the remaining time the schedule is planned for: a 10% slower machine still ends at the floor
EVAL_COST = 1 / 3  # an evaluation batch costs about a third of a training micro-batch (forward only; backward ~2x)

_DURATION = re.compile(r"(?:(?P<h>\d+(?:\.\d*)?)h)?(?:(?P<m>\d+(?:\.\d*)?)m)?(?:(?P<s>\d+(?:\.\d*)?)s?)?")


def parse_duration(text: str, key: str = "--max-time") -> float:
    """Seconds in a duration such as "4m", "90s", "1h30m", "2.5h" or "240" (seconds); "" or 0 = no budget.
    Anything else is a UserError naming `key`."""
    t = str(text).strip().lower().replace(" ", "")
    match = _DURATION.fullmatch(t)
    if match is None or (t and not any(match.groups())):
        raise UserError(f"{key} = {text!r} is not a duration; write it like 4m, 90s, 1h30m or 240 (seconds)")
    h, m, s = (float(match[g] or 0) for g in "hms")
    return 3600 * h + 60 * m + s


Agree = Callable[[float, str], float]
"""agree(value, "max" | "min"): the value every rank agrees on (identity on one process)."""


class Horizon:
    """The optimizer steps the schedule runs for and when the run stops, for one session of the loop.

    `cap`: the step budget (max_steps, or fewer when the token budget ends first): the loop never passes it.
    `steps`: the schedule's horizon: `cap`, or the time budget's frozen estimate when that is smaller.
    The frozen estimate lives in `state.horizon` (with the budget it was planned for in `state.horizon_budget`),
    so a checkpoint carries it; a resume with another `max_time` plans again.
    """

    def __init__(self, tc: TrainConfig, cap: int, state: TrainState, agree: Agree) -> None:
        self.tc, self.cap, self.agree, self.budget = tc, cap, agree, parse_duration(tc.max_time)
        if not self.budget or state.horizon_budget != self.budget:  # no time budget, or another one: plan anew
            state.horizon, state.horizon_budget = 0, 0.0
        self.state, self.start, self.timed, self.step_seconds = state, state.step, 0.0, 0.0
        self.timed_steps = (self.start + TIMING_SKIP, self.start + TIMING_SKIP + TIMING_STEPS)

    @property
    def steps(self) -> int:
        """The schedule's horizon in optimizer steps."""
        return min(self.cap, self.state.horizon) if self.state.horizon else self.cap

    @property
    def source(self) -> str:
        """Where the horizon came from: "timing" (the time budget's estimate), or the step/token budget."""
        if self.state.horizon and self.state.horizon < self.cap:
            return "timing"
        return "max_tokens" if self.tc.max_tokens and self.cap < self.tc.max_steps else "max_steps"

    def exhausted(self, state: TrainState) -> str | None:
        """"max_tokens" or "max_time" when that budget is spent (all ranks agree), else None."""
        if self.tc.max_tokens and state.tokens >= self.tc.max_tokens:
            return "max_tokens"
        if self.budget and self.agree(float(state.elapsed >= self.budget), "max") > 0:
            return "max_time"
        return None

    def observe(self, state: TrainState, seconds: float) -> bool:
        """Count a finished step that took `seconds`; True once, when the time budget's horizon gets frozen."""
        if not self.budget or state.horizon or not self.timed_steps[0] < state.step <= self.timed_steps[1]:
            return False
        self.timed += seconds
        if state.step < self.timed_steps[1]:
            return False
        step_s = self.agree(self.timed / TIMING_STEPS, "max")  # the slowest rank sets the pace
        state.horizon = max(state.step, int(self.agree(float(self.plan(state.step, state.elapsed, step_s)), "min")))
        state.horizon_budget, self.step_seconds = self.budget, step_s
        return True

    def plan(self, step: int, elapsed: float, step_seconds: float) -> int:
        """The step at which HORIZON_SHARE of the remaining budget is spent, at `step_seconds` a step plus the
        periodic evaluations' share (EVAL_COST of a micro-batch per evaluation batch)."""
        tc = self.tc
        per_step = step_seconds
        if tc.eval_every:
            per_step += step_seconds / tc.grad_accum * EVAL_COST * tc.eval_batches / tc.eval_every
        return step + max(0, int(HORIZON_SHARE * (self.budget - elapsed) / per_step))

    def note(self) -> dict:
        """What config.json records about a horizon that came from timing."""
        a, b = self.timed_steps
        return {"steps": self.state.horizon, "from": "timing", "max_time": self.tc.max_time,
                "step_seconds": self.step_seconds, "timed_steps": f"{a + 1}-{b}",
                "note": f"the schedule's horizon was estimated from the step time measured over steps {a + 1}-{b} "
                        f"({self.step_seconds:.3g} s a step) for {HORIZON_SHARE:.0%} of the remaining "
                        f"max_time, then frozen; every checkpoint's state.json holds it, so a resume keeps it"}
