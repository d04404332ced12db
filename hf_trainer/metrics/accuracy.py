"""Accuracy for `evaluate.load`: the share of predictions equal to their references.

Loaded by path (`evaluate.load(hf_trainer.metrics.ACCURACY)`), it computes what the Hub's
`accuracy` metric computes for single-label classification, without network access.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
from sklearn.metrics import accuracy_score

_DESCRIPTION = "Accuracy: the proportion of predictions equal to their references."

_INPUTS = """
Args:
    predictions (`list` of `int`): Predicted labels.
    references (`list` of `int`): Ground-truth labels.
    normalize (`bool`): The proportion if true (default), else the number of correct ones.
    sample_weight (`list` of `float`): Weight of each example (default: all 1).
Returns:
    accuracy (`float`): The proportion (or number, if `normalize=False`) of correct ones.
"""


class Accuracy(evaluate.Metric):
    """The share of predictions equal to their references."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        normalize: bool = True,
        sample_weight: list[float] | None = None,
    ) -> dict[str, Any]:
        score = accuracy_score(
            references, predictions, normalize=normalize, sample_weight=sample_weight
        )
        return {"accuracy": float(score)}
