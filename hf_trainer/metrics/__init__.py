"""Metric modules for `evaluate.load` that work offline (no Hub access).

`evaluate.load` takes a local path to a metric script as well as a Hub name:

    import evaluate
    from hf_trainer.metrics import ACCURACY

    metric = evaluate.load(ACCURACY)  # offline; evaluate.load("accuracy") online
    metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])  # {"accuracy": 0.666...}
"""

from pathlib import Path

__all__ = ["ACCURACY"]

ACCURACY = str(Path(__file__).with_name("accuracy.py"))
"""Path of the accuracy metric script: the share of predictions equal to the references."""
