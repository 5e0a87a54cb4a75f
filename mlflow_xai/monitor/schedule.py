"""When the monitor measures: pure decisions from epochs, steps and measured costs.

No clock is read here: the callback passes the seconds it measured, so a test can feed
any timeline.
"""

from __future__ import annotations

import math

__all__ = ["HISTOGRAM_BUDGET", "HISTOGRAM_SNAPSHOTS", "auto_every", "histogram_due"]

#: Histogram snapshots per fit with ``histogram_every_n_epochs=None``. Three images per
#: snapshot cost a noticeable share of a short fit; one per epoch of a 500-epoch cookbook
#: run would add 3000 artifact files, while ten already show how the distributions move.
HISTOGRAM_SNAPSHOTS = 10
#: With ``histogram_every_n_epochs=None``, the share of training time the snapshots
#: between the first and the last epoch may take: the next one waits until the training
#: time since the previous one is ``cost / HISTOGRAM_BUDGET``, ``cost`` being what the
#: previous snapshot took (drawing, histograms, storing). A fit of sub-second epochs gets
#: its first and last snapshot; a fit of minute-long epochs gets ten.
HISTOGRAM_BUDGET = 0.02


def auto_every(max_epochs: int | None, snapshots: int = HISTOGRAM_SNAPSHOTS) -> int:
    """Epochs between histogram snapshots for about ``snapshots`` per fit.

    Example:
        >>> auto_every(30), auto_every(5), auto_every(512), auto_every(-1), auto_every(512, 100)
        (3, 1, 52, 10, 6)
    """
    if max_epochs is None or max_epochs <= 0:  # unbounded: stopped by steps, time or a callback
        return snapshots
    return max(1, math.ceil(max_epochs / snapshots))


def histogram_due(
    epoch: int,
    every: int,
    *,
    explicit: bool,
    last_logged: int,
    since_last_s: float,
    cost_s: float,
    budget: float = HISTOGRAM_BUDGET,
) -> bool:
    """Whether epoch ``epoch`` gets a histogram snapshot (the last epoch is decided apart).

    Args:
        epoch: The epoch that just ended.
        every: Epochs between snapshots (0: none).
        explicit: ``every`` was given by the user: obeyed exactly.
        last_logged: The epoch of the previous snapshot, -1 before the first.
        since_last_s: Training seconds since the previous snapshot ended.
        cost_s: What the previous snapshot cost (drawing, binning, storing).
        budget: The share of the training time the snapshots may take.

    Example:
        >>> histogram_due(4, 2, explicit=False, last_logged=0, since_last_s=1.0, cost_s=0.1)
        False
        >>> histogram_due(4, 2, explicit=False, last_logged=0, since_last_s=10.0, cost_s=0.1)
        True
    """
    if every == 0:
        return False
    if explicit or last_logged < 0:
        return epoch % every == 0
    if epoch - last_logged < every:
        return False
    return since_last_s >= cost_s / budget
