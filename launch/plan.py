"""Plan a distillation run's memory per rank before starting it.

    python launch/plan.py --config RECIPE.yaml [section.key=value ...] --world-size N
                          [--device-gib G] [--device cpu|cuda] [--json]
    python launch/plan.py --teacher NAME_OR_DIR --student NAME_OR_DIR --world-size N
                          [--zero 0-3] [--offload] [--teacher-partition] [--precision fp32|bf16]
                          [--teacher-dtype fp32|bf16] [--micro-batch B] [--seq-len T]
                          [--gradient-checkpointing] [--loss fused|naive] [--chunk-size C]
                          [--device cpu|cuda] [--device-gib G] [--json]

A model is a known shape (launch/model_shapes/NAME.json: gpt2 ... gpt2-xl, opt-125m/350m/2.7b,
llama-3.2-1b/3b, llama-3.1-8b/70b, qwen2.5-0.5b/7b), a Hugging Face model directory (its
config.json) or a config.json file. With --config the recipe gives the models, ZeRO
config, precision, micro batch, sequence length (data.max_length), teacher dtype and
partitioning; flags given next to it override those. Without --config the defaults are those
of `launch/bench.py scale`'s cases (bf16, micro batch 2, 256 tokens, CPU).

Prints each part's bytes per rank (student weights, gradients, optimizer states, teacher
weights, activations, the loss's working set, ZeRO-3 gathers, the process runtime: on CPU the
measured baseline of a rank, on CUDA the context) at the peak of a steady-state optimizer step
(the largest of: teacher forward, student forward, backward, optimizer step; from step 2 on,
when Adam's moments exist), and whether it fits --device-gib (per rank: a GPU's memory, or a
CPU rank's share of RAM). --json prints exactly
{"per_rank_bytes": {part: bytes}, "total_per_rank_bytes": N, "fits": true|false|null}.
Each part is counted at its upper bound, so the plan errs on the safe side. On CUDA,
offloaded optimizer states and parameters are not counted (they live in host memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pocl_ds.cli import ArgumentParser, run_main  # noqa: E402
from pocl_ds.errors import PoclError  # noqa: E402
from pocl_ds.memory_plan import (  # noqa: E402
    GIB,
    RunSetup,
    ZeroSettings,
    fits,
    load_shape,
    peak_phase,
    plan,
    shape_from_config,
)

SHAPES_DIR = REPO / "launch" / "model_shapes"
# Flag defaults without a recipe: the settings of `launch/bench.py scale`'s cases.
DEFAULT_ARGS = {
    "zero": 2, "precision": "bf16", "teacher_dtype": None, "micro_batch": 2, "seq_len": 256,
    "loss": "fused", "chunk_size": 1024, "device": "cpu",
}  # fmt: skip


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a YAML recipe (launch/configs/...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, with --config")
    parser.add_argument("--teacher", help="known shape name, model directory or config.json")
    parser.add_argument("--student", help="known shape name, model directory or config.json")
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="student ZeRO stage")
    parser.add_argument("--offload", action="store_true", default=None,
                        help="ZeRO-3 with optimizer and parameters offloaded to CPU")  # fmt: skip
    parser.add_argument("--teacher-partition", action="store_true", default=None,
                        help="partition the teacher with ZeRO-3 inference")  # fmt: skip
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--teacher-dtype", choices=("fp32", "bf16", "fp16"),
                        help="default: --precision")  # fmt: skip
    parser.add_argument("--micro-batch", type=int, help="sequences per rank per forward")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--loss", choices=("fused", "naive"))
    parser.add_argument("--chunk-size", type=int, help="rows per chunk of the fused loss")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--device-gib", type=float, help="memory per rank to fit, GiB")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _recipe_settings(path: str, overrides: list[str]) -> dict:
    """The planner's settings from a recipe; inline tiny models become shapes."""
    from pocl_ds.config import load_config

    config = load_config(path, overrides)
    ds_path = Path(config.train.ds_config)
    ds_path = ds_path if ds_path.is_file() else REPO / ds_path
    if not ds_path.is_file():
        raise PoclError(f"train.ds_config: {config.train.ds_config} does not exist")
    zero = ZeroSettings.from_ds_config(json.loads(ds_path.read_text(encoding="utf-8")))
    models = {}
    for role in ("teacher", "student"):
        name, inline = getattr(config.model, role), getattr(config.model, f"{role}_config")
        if inline is not None:
            models[role] = shape_from_config(
                _inline_config(inline, config.model.tokenizer_vocab_size), f"model.{role}_config"
            )
        elif name is not None:
            models[role] = name
    if config.distill.method == "sft":
        models.pop("teacher", None)
    return {
        **models, "zero_settings": zero, "precision": config.train.precision,
        "teacher_dtype": config.model.teacher_dtype,
        "teacher_partition": config.model.teacher_partition,
        "micro_batch": config.train.micro_batch_size, "seq_len": config.data.max_length,
        "gradient_checkpointing": config.model.gradient_checkpointing,
        "chunk_size": config.distill.chunk_size,
    }  # fmt: skip


def _inline_config(inline: dict, vocab_size: int) -> dict:
    """A recipe's inline tiny model (models.tiny_model_config's keys) as config.json values."""
    hidden = inline.get("hidden_size", 64)
    heads = inline.get("num_heads", 4)
    return {
        "model_type": inline["family"], "hidden_size": hidden,
        "num_hidden_layers": inline.get("num_layers", 2), "num_attention_heads": heads,
        "num_key_value_heads": inline.get("num_key_value_heads", heads),
        "intermediate_size": inline.get("intermediate_size") or 4 * hidden,
        "ffn_dim": inline.get("intermediate_size") or 4 * hidden, "n_inner": None,
        "vocab_size": inline.get("vocab_size", vocab_size),
        "max_position_embeddings": inline.get("max_positions", 512),
        "tie_word_embeddings": inline.get("tie_word_embeddings", True),
    }  # fmt: skip


def _shape(model, role: str):
    if model is None:
        raise PoclError(f"no {role}: pass --{role} NAME_OR_DIR or a recipe that names one")
    return model if not isinstance(model, str) else load_shape(model, SHAPES_DIR)


def setup_from_args(argv: list[str] | None) -> tuple[RunSetup, argparse.Namespace]:
    args = _parser().parse_args(argv)
    if args.overrides and not args.config:
        raise PoclError(f"command line: {args.overrides[0]!r}: overrides need --config")
    settings = (
        _recipe_settings(args.config, args.overrides)
        if args.config
        else dict(DEFAULT_ARGS, teacher_partition=False, gradient_checkpointing=False)
    )
    settings.setdefault("device", DEFAULT_ARGS["device"])
    settings.setdefault("loss", DEFAULT_ARGS["loss"])
    for key in ("teacher", "student", "zero", "teacher_partition", "precision",
                "teacher_dtype", "micro_batch", "seq_len", "gradient_checkpointing", "loss",
                "chunk_size", "device"):  # fmt: skip
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    zero = settings.get("zero_settings") or ZeroSettings(stage=settings["zero"])
    if args.zero is not None:
        zero = ZeroSettings(stage=args.zero)
    if args.offload:
        if zero.stage != 3:
            raise PoclError("--offload is ZeRO-3 with CPU offload (ds_configs/zero3_offload.json)"
                            "; pass --zero 3")  # fmt: skip
        zero = ZeroSettings(stage=3, offload_optimizer=True, offload_param=True)
    if "student" not in settings:
        raise PoclError("no student: pass --student NAME_OR_DIR or --config RECIPE")
    setup = RunSetup(
        student=_shape(settings["student"], "student"),
        teacher=_shape(settings["teacher"], "teacher") if settings.get("teacher") else None,
        world_size=args.world_size,
        zero=zero,
        teacher_partition=bool(settings["teacher_partition"]),
        precision=settings["precision"],
        teacher_dtype=settings["teacher_dtype"] or settings["precision"],
        micro_batch=settings["micro_batch"],
        seq_len=settings["seq_len"],
        gradient_checkpointing=bool(settings["gradient_checkpointing"]),
        device=settings["device"],
        chunk_size=settings["chunk_size"],
        loss=settings["loss"],
    )
    if args.device_gib is not None and args.device_gib <= 0:
        raise PoclError(f"--device-gib {args.device_gib}: must be > 0")
    return setup, args


def main() -> int:
    setup, args = setup_from_args(sys.argv[1:])
    parts = plan(setup)
    total = sum(parts.values())
    verdict = fits(total, args.device_gib)
    if args.json:
        print(json.dumps({"per_rank_bytes": parts, "total_per_rank_bytes": total,
                          "fits": verdict}))  # fmt: skip
        return 0
    teacher = setup.teacher
    print(
        f"{teacher.name + ' -> ' if teacher else ''}{setup.student.name}, {setup.world_size} "
        f"rank(s), student ZeRO-{setup.zero.stage}"
        f"{' + offload' if setup.zero.offload_optimizer else ''} {setup.precision}, teacher "
        f"{'partitioned' if setup.teacher_partition else 'replicated'} {setup.teacher_dtype}, "
        f"micro batch {setup.micro_batch} x {setup.seq_len} tokens, {setup.loss} loss, "
        f"{setup.device}"
    )
    print(f"  at the peak ({peak_phase(setup).replace('_', ' ')}):")
    for name, value in parts.items():
        print(f"  {name:<18} {value / GIB:9.2f} GiB")
    print(f"  {'total per rank':<18} {total / GIB:9.2f} GiB")
    if verdict is not None:
        print(f"  {'fits' if verdict else 'does NOT fit'} in {args.device_gib:g} GiB per rank")
    return 0


if __name__ == "__main__":
    run_main(main)
