"""Surface statistics of a prompt's text, a second input of the logistic probe beside the embedding.

A sentence embedding says what a prompt is about; it says little about how long or how technical it is,
which is much of what makes a prompt hard (a long multi-step word problem, a block of code). These eight
numbers are cheap (microseconds per prompt), computed from the raw text at routing time, and the same for
every table; the probe's cross-validated regularisation decides how much they count.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

STAT_NAMES = ("log_chars", "log_words", "digit_share", "non_ascii_share", "log_lines", "code_char_share",
              "log_question_marks", "upper_share")
_CODE_CHARS = "{}()[];=<>_"
# The statistics enter the probe at this scale next to a unit-length embedding, so that with the same
# regularisation neither part drowns the other (a z-scored statistic is O(1); an embedding entry O(0.05)).
SCALE = 0.3


def prompt_stats(texts: Sequence[str]) -> F64:
    """(n, 8) raw statistics, one row per text, in `STAT_NAMES` order."""
    out = np.empty((len(texts), len(STAT_NAMES)), dtype=np.float64)
    for i, t in enumerate(texts):
        # str.count runs in C: a few dozen passes over a long prompt cost far less than one Python loop
        # over its characters (this runs on every routed request). Digits and capitals are ASCII ones.
        n = max(len(t), 1)
        out[i] = (
            np.log1p(len(t)), np.log1p(len(t.split())), sum(map(t.count, string.digits)) / n,
            (len(t) - len(t.encode("ascii", "ignore"))) / n, np.log1p(t.count("\n")),
            sum(map(t.count, _CODE_CHARS)) / n, np.log1p(t.count("?")), sum(map(t.count, string.ascii_uppercase)) / n,
        )
    return out


@dataclass
class TextStats:
    """The training rows' mean and spread of each statistic, to put new prompts on the same scale."""

    mean: F64
    std: F64

    @classmethod
    def fit(cls, raw: F64) -> TextStats:
        """From the training prompts' raw statistics (a constant column gets unit spread)."""
        std = raw.std(axis=0)
        return cls(mean=raw.mean(axis=0), std=np.where(std > 1e-9, std, 1.0))

    def features(self, x: F32, raw: F64) -> F64:
        """[embedding, scaled z-scores, scaled squared z-score of the length]: the probe's input."""
        z = (raw - self.mean) / self.std
        return np.hstack([x.astype(np.float64), SCALE * z, SCALE * z[:, :1] ** 2])
