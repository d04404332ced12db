"""Lightning support for SNGM: a `configure_optimizers` mixin and a monitoring callback.

* `SNGMMixin`: `configure_optimizers` with SNGM, warmup, decay and an optional
  batch-size scaling rule, from the module's hyperparameters.
* `SNGMMonitor`: logs the gradient norm SNGM normalized by, the update norm, the
  learning rate and skipped steps at Lightning's logging frequency.
* `weight_decay_param_groups`: parameter groups without weight decay on biases and
  normalization layers (also useful with Lightning Fabric).
* `StepScheduleCLI`: a `LightningCLI` that steps `--lr_scheduler WarmupDecayLR` every
  optimizer step (`LightningCLI` steps it once per epoch).

With LightningCLI no code is needed to pick the optimizer:
`--optimizer sngm_integrations.SNGM --optimizer.lr 0.1`.
"""

from lightning_callbacks.cli import StepScheduleCLI
from lightning_callbacks.mixin import SNGMHyperparameters, SNGMMixin
from lightning_callbacks.monitor import SNGMMonitor
from lightning_callbacks.param_groups import is_normalization_layer, weight_decay_param_groups

__all__ = [
    "SNGMHyperparameters",
    "SNGMMixin",
    "SNGMMonitor",
    "StepScheduleCLI",
    "is_normalization_layer",
    "weight_decay_param_groups",
]
