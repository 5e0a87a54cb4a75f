"""When the monitor measures: pure decisions from epochs, steps and measured costs.

No clock is read here: the callback passes the seconds it measured (its own time in the
training loop and the writer thread's CPU time), so a test can feed any timeline.

The rule, with the defaults (``log_every_n_steps=None``, ``histogram_every_n_epochs=None``):
each kind of measurement (step scalars, epoch-end statistics, histogram images) may cost
a third of :data:`BUDGET` (3%) of the fit's wall time so far; the next one of a kind is
taken once what that kind has spent, plus what its last one cost, fits. The first and
the last epoch's ends are always measured; a NaN/Inf loss is checked at every step.
Given frequencies are obeyed exactly.
"""

from __future__ import annotations

import math

__all__ = [
    "BUDGET",
    "HISTOGRAM_BUDGET",
    "HISTOGRAM_SNAPSHOTS",
    "ROW_COST_GUESS",
    "SHARES",
    "SNAPSHOT_COST_GUESS",
    "auto_every",
    "epoch_due",
    "images_due",
    "next_due",
    "step_due",
]

#: Histogram snapshots per fit with ``histogram_every_n_epochs=None``. Three images per
#: snapshot cost a noticeable share of a short fit; one per epoch of a 500-epoch cookbook
#: run would add 3000 artifact files, while ten already show how the distributions move.
HISTOGRAM_SNAPSHOTS = 10


def auto_every(max_epochs: int | None, snapshots: int = HISTOGRAM_SNAPSHOTS) -> int:
    """Epochs between histogram snapshots for about ``snapshots`` per fit.

    Example:
        >>> auto_every(30), auto_every(5), auto_every(512), auto_every(-1), auto_every(512, 100)
        (3, 1, 52, 10, 6)
    """
    if max_epochs is None or max_epochs <= 0:  # unbounded: stopped by steps, time or a callback
        return snapshots
    return max(1, math.ceil(max_epochs / snapshots))


# --- The budget: by default the monitor's own cost stays within BUDGET of the fit's time ---

#: The share of the fit's wall time the monitor may cost by default: its statistics, its
#: metric rows, its images and the writer thread's CPU time (its share of the GIL).
BUDGET = 0.03
#: How :data:`BUDGET` is split between the kinds of measurement, so that an expensive
#: kind (images) cannot starve a cheap one (step scalars): each kind gets a third.
SHARES = {"step": BUDGET / 3, "epoch": BUDGET / 3, "images": BUDGET / 3}
#: The images' share (the name of the images' budget before there was one for all kinds).
HISTOGRAM_BUDGET = SHARES["images"]
#: CPU seconds the writer spends per metric row until it has measured its own: MLflow's
#: SQLAlchemy store costs ~0.2 ms a row in this process; a server costs the client less.
ROW_COST_GUESS = 2e-4
#: Seconds one snapshot's images cost (three drawn, encoded and stored) until one was
#: measured: a short fit that cannot afford this many gets no images in between.
SNAPSHOT_COST_GUESS = 0.1


def next_due(done: int, spent: float, cost: float, elapsed: float, share: float) -> int:
    """The first step (or epoch) at which one more measurement fits the budget.

    A measurement is taken when what its kind has spent so far plus what the next one
    will cost (the last one's cost) is at most ``share`` of the fit's elapsed wall time.
    Time is counted in units of the fit's own progress (steps or epochs done so far,
    ``done``, in ``elapsed`` seconds), so the answer is a step (or epoch) number that every
    DDP rank can act on alike: the cadence settles where the cost fits, for any epoch length.

    Args:
        done: Steps (or epochs) completed so far (the one just measured included).
        spent: Seconds this kind of measurement has cost so far (the one just taken included).
        cost: Seconds the next measurement is expected to cost (the last one's).
        elapsed: Wall seconds since the fit started.
        share: The share of ``elapsed`` this kind may cost.

    Returns:
        The step (or epoch) index from which the next measurement is due, at least ``done``.

    Example:
        >>> next_due(done=10, spent=0.01, cost=0.01, elapsed=1.0, share=0.01)  # 1 s per 10 steps: 2 s
        20
        >>> next_due(done=10, spent=0.0, cost=0.001, elapsed=1.0, share=0.01)  # affordable now
        10
    """
    if done <= 0 or elapsed <= 0:
        return done
    needed = (spent + cost) / share  # the elapsed time at which it fits
    if needed <= elapsed:
        return done
    per_unit = elapsed / done
    return done + math.ceil((needed - elapsed) / per_unit)


def step_due(step: int, *, every: int | None, last_batch: bool, due: int) -> bool:
    """Whether optimizer step ``step`` is measured (norms, update ratios).

    Args:
        step: The global step.
        every: ``log_every_n_steps`` when given: every this many steps and each epoch's last.
        last_batch: The epoch's last batch.
        due: From :func:`next_due`, the budget's next step (without ``every``).

    Example:
        >>> [s for s in range(8) if step_due(s, every=3, last_batch=s == 7, due=0)]
        [0, 3, 6, 7]
        >>> [s for s in range(8) if step_due(s, every=None, last_batch=s == 7, due=5)]
        [5, 6, 7]
    """
    if every is not None:
        return step % every == 0 or last_batch
    return step >= due


def epoch_due(epoch: int, *, explicit: bool, last: bool, images: bool, due: int) -> bool:
    """Whether the end of epoch ``epoch`` is measured (activation statistics, the page's histograms).

    The first and the last epoch always are; with ``log_every_n_steps`` given, every
    epoch is (as that cadence always was); else an epoch whose images are due, and the
    others when the budget says so (``due``, from :func:`next_due` over epochs).

    Example:
        >>> [e for e in range(6) if epoch_due(e, explicit=False, last=e == 5, images=False, due=3)]
        [0, 3, 4, 5]
    """
    return explicit or epoch == 0 or last or images or epoch >= due


def images_due(
    epoch: int,
    *,
    every: int | None,
    last: bool,
    last_logged: int,
    spacing: int,
    spent: float,
    cost: float | None,
    elapsed: float,
    share: float = SHARES["images"],
) -> bool:
    """Whether epoch ``epoch`` gets a histogram snapshot (three images).

    Args:
        epoch: The epoch that ends.
        every: ``histogram_every_n_epochs`` when given: obeyed exactly (0: never),
            counted from the first epoch, and the last.
        last: The fit's last epoch, when known (``max_epochs``).
        last_logged: The epoch of the previous snapshot, -1 before the first.
        spacing: At least this many epochs between default snapshots (about ten per fit).
        spent: Seconds the snapshots have cost so far.
        cost: What the last one cost; None before the first (:data:`SNAPSHOT_COST_GUESS`).
        elapsed: Wall seconds since the fit started.
        share: The images' share of the budget.

    Example:
        >>> images_due(3, every=2, last=True, last_logged=2, spacing=1, spent=9.0, cost=1.0, elapsed=1.0)
        True
        >>> images_due(5, every=None, last=True, last_logged=-1, spacing=1, spent=0.0, cost=None, elapsed=1.0)
        False
        >>> images_due(5, every=None, last=True, last_logged=-1, spacing=1, spent=0.0, cost=None, elapsed=60.0)
        True
    """
    if every is not None:
        return every > 0 and (epoch % every == 0 or last)
    if last_logged >= 0 and epoch - last_logged < spacing and not last:
        return False
    expected = SNAPSHOT_COST_GUESS if cost is None else cost
    return spent + expected <= share * elapsed
