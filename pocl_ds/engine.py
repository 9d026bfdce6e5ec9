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
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pocl_ds.errors import PoclError
from pocl_ds.models import unwrap_model

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Share of the device's free memory that a whole ZeRO-3 model may take for generation; the
# rest is left to the KV cache, the logits and whatever else runs while it is gathered.
GATHER_MEMORY_SHARE = 0.5
_per_layer_logged = False  # the per-layer fallback is logged at INFO once per process
# Modules a ``gathered_for_generation`` block holds whole now: a nested block reuses them.
_held_whole: set[int] = set()


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


def _partitioned_parameters(module: torch.nn.Module) -> tuple[list[torch.nn.Parameter], bool]:
    """The parameters ZeRO-3 holds as partitions right now (persistent ones are whole), and
    whether any is in flight (a prefetch that only DeepSpeed's hooks would wait for)."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return [], False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    in_flight = any(p.ds_status == ZeroParamStatus.INFLIGHT for p in params)
    return [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE], in_flight


def _free_memory_budget(device: torch.device) -> int:
    """Bytes a rank may gather: ``GATHER_MEMORY_SHARE`` of what its device has free.

    A CUDA device counts what torch's caching allocator holds unused as free; CPU ranks on one
    machine share its memory, so each gets its part of the share.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        sharing = 1
    else:
        import psutil  # a DeepSpeed dependency, as is every partitioned model

        free = psutil.virtual_memory().available
        sharing = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return int(GATHER_MEMORY_SHARE * free / max(sharing, 1))


def _fits_on_every_rank(fits: bool, device: torch.device) -> bool:
    """One verdict for all ranks: the gather is a collective, so one rank short of memory
    keeps every rank on the per-layer path."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fits
    flag = torch.tensor([int(fits)], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _is_deepspeed_hook(hook: Any) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith("deepspeed.")


@contextlib.contextmanager
def _deepspeed_hooks_set_aside(module: torch.nn.Module) -> Iterator[None]:
    """Take DeepSpeed's forward hooks off every submodule for the block; other hooks stay.

    With the parameters already whole, ZeRO-3's per-module hooks would still cost a fetch and
    a release per submodule and forward, and the release would partition the parameters the
    block gathered. DeepSpeed's own ``unwrap_model_for_generation`` removes them too, but it
    needs the engine and re-registers the hooks (new module ids, a re-recorded trace); this
    edits the hook tables in place and restores the very same hooks in their order.
    """
    saved = []
    for submodule in module.modules():
        for table in (submodule._forward_pre_hooks, submodule._forward_hooks):
            snapshot = dict(table)
            for key in [k for k, hook in snapshot.items() if _is_deepspeed_hook(hook)]:
                del table[key]
            saved.append((table, snapshot))
    try:
        yield
    finally:
        for table, snapshot in saved:
            # A hook registered (or removed) inside the block keeps that change.
            current = dict(table)
            table.clear()
            for key, hook in snapshot.items():
                if key in current or _is_deepspeed_hook(hook):
                    table[key] = current.get(key, hook)
            table.update((k, hook) for k, hook in current.items() if k not in table)


@contextlib.contextmanager
def gathered_for_generation(
    module: torch.nn.Module, *, budget_bytes: int | None = None
) -> Iterator[bool]:
    """Make a ZeRO-3-partitioned model whole for the block, if it fits; yields whether it did.

    Collective on a partitioned model: every rank enters it together. The model is gathered
    when the bytes its partitioned parameters take whole are at most ``budget_bytes`` on every
    rank (None: ``GATHER_MEMORY_SHARE`` of the free device memory, split among the CPU ranks of
    one machine; 0: never). Inside the block its forwards are then plain local computations (no
    collective, so ranks need not run the same number of them) and DeepSpeed's hooks are off;
    on exit the parameters are partitioned again. Otherwise (or for a model that is not
    partitioned) the block runs as it is and yields False: ZeRO-3 gathers layer by layer in
    every forward, a collective. Inference only: nothing may change the parameters inside.

    Blocks nest: inside a block that holds ``module`` whole, another yields True at once (no
    second gather, no collective) and leaves it whole on exit, so a caller that generates
    several times with the same weights (an evaluation's sampling seeds and suites) gathers
    once for all of them.
    """
    if id(module) in _held_whole:
        yield True
        return
    params, in_flight = _partitioned_parameters(module)
    if not params and not in_flight:
        yield False
        return
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    whole_bytes = sum(p.ds_numel * p.element_size() for p in params)
    budget = _free_memory_budget(device) if budget_bytes is None else budget_bytes
    if not _fits_on_every_rank(whole_bytes <= budget and not in_flight, device):
        global _per_layer_logged
        # Once per process at INFO: on-policy training generates every step.
        (logger.debug if _per_layer_logged else logger.info)(
            "generation keeps ZeRO-3's per-layer gathers (slow: every forward gathers every "
            "layer): the model takes %.1f MB whole against a budget of %.1f MB here (or a "
            "parameter is in flight, or another rank is short of memory)",
            whole_bytes / 2**20,
            budget / 2**20,
        )
        _per_layer_logged = True
        yield False
        return
    logger.debug("generation gathers the whole model once (%.1f MB)", whole_bytes / 2**20)
    with _gathered_whole(params, device), _deepspeed_hooks_set_aside(module):
        _held_whole.add(id(module))
        try:
            yield True
        finally:
            _held_whole.discard(id(module))


def _coalescible(params: list[torch.nn.Parameter]) -> bool:
    """Whether ``_gathered_whole`` may gather these itself: one process group, one dtype, every
    partition resident and plain (no NVMe swap, no ZeRO++ quantised or secondary copies)."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    group, dtype = getattr(params[0], "ds_process_group", None), params[0].ds_tensor.dtype
    return group is not None and all(
        getattr(p, "ds_process_group", None) is group
        and p.ds_tensor.dtype == dtype
        and getattr(p.ds_tensor, "status", None) == PartitionedParamStatus.AVAILABLE
        and not hasattr(p.ds_tensor, "ds_quant_scale")
        and getattr(p, "ds_secondary_tensor", None) is None
        for p in params
    )


@contextlib.contextmanager
def _gathered_whole(params: list[torch.nn.Parameter], device: torch.device) -> Iterator[None]:
    """Every partitioned parameter whole for the block, in one all-gather; partitioned after.

    DeepSpeed's ``GatheredParameters`` launches one all-gather per parameter: on gloo (CPU
    ranks) those run one after another, and for the tiny benchmark student 28 of them took
    25 ms where one all-gather of the same bytes took 9 (measured on the 2-core machine). Here
    every rank's partitions go into one flat buffer and one collective, and each parameter is
    copied out of the result (for a moment the model is held twice); on one rank each partition
    is its parameter and is used as it is. Anything DeepSpeed gathers specially (see
    ``_coalescible``) goes through ``GatheredParameters`` instead.
    """
    import deepspeed

    if not _coalescible(params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    import torch.distributed as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    group = params[0].ds_process_group
    world = dist.get_world_size(group)
    if world == 1:  # each partition is its whole parameter: a view of it, no copy
        whole = [p.ds_tensor.detach().to(device).reshape(-1)[: p.ds_numel] for p in params]
    else:
        local = torch.cat([p.ds_tensor.detach().reshape(-1).to(device) for p in params])
        by_rank = local.new_empty(world, local.numel())
        dist.all_gather_into_tensor(by_rank.view(-1), local, group=group)
        sizes = [p.ds_tensor.numel() for p in params]  # padded partitions: alike on every rank
        # per parameter: rank 0's part, rank 1's part, ...; the last one's padding is cut off
        whole = [
            part.reshape(-1)[: p.ds_numel]
            for p, part in zip(params, by_rank.split(sizes, dim=1), strict=True)
        ]
        del local, by_rank
    for p, data in zip(params, whole, strict=True):
        p.data = data.view(p.ds_shape)
        p.ds_status = ZeroParamStatus.AVAILABLE
    try:
        yield
    finally:
        params[0].partition(param_list=params, has_been_updated=False)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter's name, dtype, shape and bytes (collective under ZeRO-3)."""
    digest = hashlib.sha256()
    for name, param in unwrap_model(model).named_parameters():
        with gathered_parameters(param):
            tensor = param.detach().cpu().contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
