"""SNGM (stochastic normalized gradient descent with momentum) for PyTorch.

The core depends on torch alone. Framework support lives in the sibling packages
`hf_trainer` (Hugging Face Trainer) and `lightning_callbacks` (Lightning).
"""

from sngm_integrations.reference import ReferenceSNGM
from sngm_integrations.schedules import scale_lr, warmup_decay_schedule
from sngm_integrations.sharding import ShardingError
from sngm_integrations.sngm import SNGM, SNGMParamGroup, SNGMStepStats, sngm

__version__ = "0.1.0"

__all__ = [
    "SNGM",
    "ReferenceSNGM",
    "SNGMParamGroup",
    "SNGMStepStats",
    "ShardingError",
    "__version__",
    "scale_lr",
    "sngm",
    "warmup_decay_schedule",
]
