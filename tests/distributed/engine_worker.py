"""Runs under `torchrun --nproc_per_node 2` on CPU with gloo: a plain SNGM under real engines.

For each configuration, SNGM is built the way the HF Trainer and Accelerate build it
(nobody tells it about the engine), handed to DeepSpeed or FSDP1, and takes 3 steps with
half of each batch on each rank. Rank 0 saves the full weights, SNGM's last norm, and what
really ran (the wrapper's type, the sharding) to OUT/<name>.pt, or the error SNGM raised;
tests/test_sharded_engines.py compares them with one process on the whole batch.
Usage: python -m torch.distributed.run --nproc_per_node 2 engine_worker.py OUT ENGINE
ENGINE is "deepspeed", "fsdp1" or "fsdp1-hybrid" (the last on 4 ranks).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from sharded_sngm_worker import STEPS, batch, full_model  # noqa: E402
from teardown import finish  # noqa: E402

from sngm_integrations import SNGM, ShardingError  # noqa: E402

WEIGHT_DECAY = 0.01


def param_groups(
    model: torch.nn.Module, groups: int, weight_decay: float = WEIGHT_DECAY
) -> list[dict[str, Any]]:
    """One group with weight decay, or the Trainer's two: decay on weights, none on biases."""
    if groups == 1:
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": trainable, "weight_decay": weight_decay}]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
    ]


def make_sngm(groups: list[dict[str, Any]]) -> SNGM:
    return SNGM(groups, lr=0.1, momentum=0.9)


def half_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal part of the step's batch (a half on 2 ranks)."""
    x, y = batch(step)
    size = len(x) // dist.get_world_size()
    rows = slice(rank * size, (rank + 1) * size)
    return x[rows], y[rows]


def save(out: Path, name: str, result: dict[str, Any]) -> None:
    if dist.get_rank() == 0:
        torch.save(result, out / f"{name}.pt")


def deepspeed_run(
    out: Path, stage: int, groups: int, bf16: bool = False, sub_group_size: int = 10**9
) -> None:
    import deepspeed

    model = full_model()
    optimizer = make_sngm(param_groups(model, groups, weight_decay=0.0 if bf16 else WEIGHT_DECAY))
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "sub_group_size": sub_group_size},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    engine, ds_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config
    )
    name = f"zero{stage}_groups{groups}" + ("_bf16" if bf16 else "")
    if sub_group_size < 10**9:
        name += f"_subgroups{sub_group_size}"
    result: dict[str, Any] = {"wrapper": type(ds_optimizer).__name__}
    if stage == 3:
        result["partitions"] = len(ds_optimizer.fp32_partitioned_groups_flat)
    try:
        for step in range(STEPS):
            x, y = half_batch(step, dist.get_rank())
            if bf16:
                x = x.to(torch.bfloat16)
            loss = torch.nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
    except RuntimeError as error:
        result["error"] = str(error)
        save(out, name, result)
        engine.destroy()
        return
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        result["dtype"] = str(next(model.parameters()).dtype)
        result["params"] = [p.detach().float().clone() for p in model.parameters()]
    result["norm"] = optimizer.last_grad_norm
    result["deepspeed_norm"] = engine.get_global_grad_norm()
    save(out, name, result)
    engine.destroy()


def fsdp1_run(
    out: Path,
    strategy: str,
    use_orig_params: bool,
    groups: int,
    frozen: bool = False,
    process_group: str | None = None,
) -> None:
    """`process_group`: None, "world", or "shard" (HYBRID_SHARD's shard group)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp._flat_param import FlatParameter

    model = full_model()
    if frozen:
        for layer in (model[0], model[2]):
            layer.requires_grad_(False)
    kwargs: dict[str, Any] = dict(
        sharding_strategy=ShardingStrategy[strategy],
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
    )
    if strategy == "HYBRID_SHARD":  # 2 replicas of 2 shards on 4 ranks
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["device_mesh"] = init_device_mesh("cpu", (2, 2))
    if frozen and not use_orig_params:  # one flat parameter may not mix frozen and trained
        for i in (0, 2, 4):
            model[i] = FSDP(model[i], **kwargs)
    wrapped = FSDP(model, **kwargs)
    group = {None: None, "world": dist.group.WORLD, "shard": wrapped.process_group}
    optimizer = SNGM(
        param_groups(wrapped, groups), lr=0.1, momentum=0.9, process_group=group[process_group]
    )
    held = [p for g in optimizer.param_groups for p in g["params"]]
    name = f"fsdp1_{strategy}_orig{int(use_orig_params)}_groups{groups}" + (
        "_frozen" if frozen else ""
    )
    if process_group is not None:
        name += f"_{process_group}_group"
    result: dict[str, Any] = {
        "wrapper": type(wrapped).__name__,
        "strategy": wrapped.sharding_strategy.name,
        "flat_parameters": sum(isinstance(p, FlatParameter) for p in held),
        "local_numel": sum(p.numel() for p in held),
    }
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(STEPS):
                x, y = half_batch(step, dist.get_rank())
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(wrapped(x), y).backward()
                optimizer.step()
    except ShardingError as error:
        result["error"] = str(error)
        save(out, name, result)
        return
    result["warnings"] = [str(w.message) for w in caught if "SNGM" in str(w.message)]
    result["tensors_with_grad"] = sum(p.grad is not None for p in held)
    with FSDP.summon_full_params(wrapped):
        result["params"] = [p.detach().clone() for p in wrapped.parameters()]
    result["norm"] = optimizer.last_grad_norm
    save(out, name, result)


def main() -> None:
    out, engine = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    if engine == "deepspeed":
        import deepspeed

        # The shared-memory op is JIT-compiled with g++ (minutes); gloo does not need it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # type: ignore[attr-defined]
        deepspeed.init_distributed(dist_backend="gloo")
        for stage in (0, 1, 2, 3):
            for groups in (1, 2):
                deepspeed_run(out, stage, groups)
        deepspeed_run(out, 3, 2, sub_group_size=8)
        deepspeed_run(out, 2, 2, bf16=True)
        deepspeed_run(out, 0, 2, bf16=True)
    elif engine == "fsdp1-hybrid":
        fsdp1_run(out, "HYBRID_SHARD", True, 2)
        fsdp1_run(out, "HYBRID_SHARD", True, 2, process_group="shard")
    else:
        fsdp1_run(out, "NO_SHARD", True, 2, process_group="world")
        for strategy in ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"):
            for use_orig_params in (True, False):
                fsdp1_run(out, strategy, use_orig_params, 2 if use_orig_params else 1)
        for use_orig_params in (True, False):
            fsdp1_run(out, "FULL_SHARD", use_orig_params, 1, frozen=True)
    finish()


if __name__ == "__main__":
    main()
