"""DeepSpeed engines: configs filled from the recipe, the trainable student, the frozen teacher.

``ds_configs/*.json`` are the one place for the ZeRO stage and its knobs; batch sizes, clipping
and precision marked ``"auto"`` there are filled from the recipe so the two never disagree.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from pocl_ds.errors import PoclError
from pocl_ds.models import unwrap_model

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_ds_config_path(path: str) -> Path:
    """A DeepSpeed config path as given, or relative to the repository (``ds_configs/x.json``)."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    in_repo = REPO_ROOT / path
    if not candidate.is_absolute() and in_repo.is_file():
        return in_repo
    raise PoclError(f"train.ds_config: {path} does not exist (shipped: {shipped_ds_configs()})")


def shipped_ds_configs() -> str:
    return ", ".join(sorted(p.name for p in (REPO_ROOT / "ds_configs").glob("*.json")))


def _fill(section: dict, key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def build_ds_config(
    path: str | Path,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    precision: str,
    max_grad_norm: float = 0.0,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill its ``"auto"`` values from the recipe.

    The global batch must equal micro batch × accumulation × world size; a config that pins a
    different number is refused here rather than by an assertion deep in DeepSpeed.
    """
    path = resolve_ds_config_path(str(path))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise PoclError(f"{path}: not valid JSON ({err})") from None
    config = copy.deepcopy(config)
    _fill(config, "train_micro_batch_size_per_gpu", micro_batch_size)
    _fill(config, "gradient_accumulation_steps", gradient_accumulation_steps)
    _fill(config, "gradient_clipping", max_grad_norm)
    expected = (
        config["train_micro_batch_size_per_gpu"]
        * config["gradient_accumulation_steps"]
        * world_size
    )
    _fill(config, "train_batch_size", expected)
    if config["train_batch_size"] != expected:
        raise PoclError(
            f"{path}: train_batch_size={config['train_batch_size']} but micro batch "
            f"{config['train_micro_batch_size_per_gpu']} x accumulation "
            f"{config['gradient_accumulation_steps']} x world size {world_size} = {expected}; "
            'set it to "auto" or make the three agree'
        )
    if precision not in ("fp32", "bf16", "fp16"):
        raise PoclError(f"train.precision: got {precision!r}, expected fp32, bf16 or fp16")
    config.setdefault("bf16", {})
    config.setdefault("fp16", {})
    _fill(config["bf16"], "enabled", precision == "bf16")
    _fill(config["fp16"], "enabled", precision == "fp16")
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise PoclError(f"{path}: bf16 and fp16 are both enabled; pick one")
    return config


def check_precision_supported(ds_config: dict[str, Any]) -> None:
    """Refuse a precision this machine's accelerator cannot run, naming the recipe field
    (DeepSpeed's CPU accelerator, for one, has bf16 but no fp16)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    for precision, supported in (
        ("fp16", accelerator.is_fp16_supported),
        ("bf16", accelerator.is_bf16_supported),
    ):
        if ds_config.get(precision, {}).get("enabled") and not supported():
            raise PoclError(
                f"train.precision: {precision} is not supported on this machine's "
                f"{accelerator.device_name()} accelerator; use fp32 or "
                f"{'bf16' if precision == 'fp16' else 'fp16'}"
            )


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that DeepSpeed's ZeRO/bf16 wrappers finally step."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RuntimeError("could not find the torch optimizer inside the DeepSpeed engine")
    return optimizer


def set_learning_rate(engine: Any, lr: float) -> None:
    for group in innermost_optimizer(engine.optimizer).param_groups:
        group["lr"] = lr


def reset_optimizer_state(engine: Any) -> None:
    """Forget Adam's moments and step counts (a new stage starts a new run, as in the paper)."""
    innermost_optimizer(engine.optimizer).state.clear()


def create_student_engine(
    module: torch.nn.Module,
    ds_config: dict[str, Any],
    *,
    lr: float,
    weight_decay: float,
) -> Any:
    """Wrap the student (with its loss head) in a DeepSpeed engine with a client AdamW.

    A client ``torch.optim.AdamW`` instead of the config's optimizer: DeepSpeed's own compiles
    FusedAdam, which needs CUDA and minutes of compilation; under ZeRO-Offload DeepSpeed
    still swaps in its CPU Adam.
    """
    import deepspeed

    check_precision_supported(ds_config)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {})
    if offload.get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=lr, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine


def create_teacher(
    teacher: torch.nn.Module,
    *,
    partition: bool,
    dtype: torch.dtype,
    micro_batch_size: int,
    world_size: int,
    device: torch.device,
) -> torch.nn.Module:
    """Freeze the teacher; replicate it on every rank or partition it with ZeRO-3 inference.

    Returns the module to call. A partitioned teacher's parameters are gathered layer by layer
    inside its forward, so only one layer is whole on a rank at a time.
    """
    teacher.requires_grad_(False)
    teacher.eval()
    if not partition:
        return teacher.to(device=device, dtype=dtype)
    import deepspeed

    config = build_ds_config(
        "ds_configs/teacher_zero3.json",
        micro_batch_size=micro_batch_size,
        gradient_accumulation_steps=1,
        world_size=world_size,
        precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"),
    )
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine.module


def gathered_parameters(*params: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """A context in which ZeRO-3-partitioned parameters (an output head, say) are whole.

    Call the loss inside it, passing the parameters themselves, so that autograd delivers the
    weight gradient to the partitioned parameter and DeepSpeed's hooks reduce-scatter it:

        with gathered_parameters(student_head.weight, teacher_head.weight):
            loss = fused_linear_distill_loss(h_s, student_head.weight, h_t, ...)
        engine.backward(loss)

    Parameters that are not partitioned (no `ds_id`) or None pass through untouched.
    """
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if partitioned:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        # A parameter the engine's forward already gathered (a tied embedding, still active
        # in its submodule) must not be gathered again: releasing it at the block's end would
        # free it under that submodule. DeepSpeed releases it after the forward as usual.
        partitioned = [p for p in partitioned if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes (collective under ZeRO-3)."""
    digest = hashlib.sha256()
    for name, param in unwrap_model(model).named_parameters():
        with gathered_parameters(param):
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
