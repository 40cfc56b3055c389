"""OOD thresholds and p-values from a model's calibration block (models/README.md, "calibration").

The manifest stores, per score, the distribution of that score on the held-out validation split as a
quantile table (probs ascending from 0 to 1, values ascending). With n calibration scores:
  threshold(fpr) = Q(1 - fpr), Q the linear interpolation of the table (numpy's default quantile
                   when the table holds every score);
  p_value(s)     = (1 + #{calibration scores >= s}) / (n + 1), the count read off the table as
                   n * (1 - F(s)), F its interpolated CDF (exact when the table holds every score).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ScoreCalibration:
    name: str
    units: str
    n: int
    probs: np.ndarray  # ascending in [0, 1]
    values: np.ndarray  # ascending

    @classmethod
    def from_manifest(cls, name: str, block: dict[str, Any]) -> ScoreCalibration:
        q = block["quantiles"]
        return cls(name, block["units"], int(block["n"]), np.asarray(q["probs"], float), np.asarray(q["values"], float))

    def threshold(self, fpr: float) -> float:
        return float(np.interp(1.0 - fpr, self.probs, self.values))

    def exceed_count(self, scores: np.ndarray) -> np.ndarray:
        """#{calibration scores >= s} for each s."""
        if len(self.values) == self.n:  # every score is stored: count exactly
            return self.n - np.searchsorted(self.values, scores, side="left")
        cdf = np.interp(scores, self.values, self.probs, left=0.0, right=1.0)
        return np.rint(self.n * (1.0 - cdf))

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        return (1.0 + self.exceed_count(np.asarray(scores, float))) / (self.n + 1.0)
