"""Parameter groups with weight decay on weights only, not on biases and normalization layers."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["is_normalization_layer", "weight_decay_param_groups"]


def is_normalization_layer(module: nn.Module) -> bool:
    """True for batch, instance, layer, group and RMS norms, including custom `*Norm` classes.

    Custom classes are recognised by name (`LlamaRMSNorm`, `T5LayerNorm`, ...), since
    model libraries often define their own normalization layers.
    """
    builtin = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    return isinstance(module, builtin) or "norm" in type(module).__name__.lower()


def weight_decay_param_groups(
    module: nn.Module, weight_decay: float, *, decay_bias_and_norm: bool = False
) -> list[dict[str, Any]]:
    """Split the trainable parameters of `module` into a decayed and an undecayed group.

    Biases and the parameters of normalization layers get no weight decay unless
    `decay_bias_and_norm` is true. Shared parameters are listed once; empty groups are
    dropped. The groups are named `decay` and `no_decay` (a `name` key, which
    Lightning's `LearningRateMonitor` puts in its metric names, e.g. `lr-SNGM/decay`).

    Args:
        module: The model whose `requires_grad` parameters are grouped.
        weight_decay: The weight decay of the decayed group.
        decay_bias_and_norm: Put every parameter in the decayed group.

    Returns:
        Parameter groups for a `torch.optim.Optimizer`, each with its `name` and
        `weight_decay`.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for submodule in module.modules():
        in_norm_layer = is_normalization_layer(submodule)
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = in_norm_layer or name == "bias"
            (no_decay if exempt and not decay_bias_and_norm else decay).append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]
