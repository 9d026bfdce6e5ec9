"""One collective per optimizer step for the trainer's host-side checks, on 2 ranks.

A torchrun job (this file's ``__main__``) builds the tiny KD run and takes optimizer steps
through ``Trainer.train_step`` as the run loop does, with 1 and with 3 micro-batches per step.
Around each step it counts (a) the torch.distributed collectives issued from pocl_ds code (not
DeepSpeed's own gradient reduction) and (b) host reads of tensors (``item``, ``tolist``,
``bool``, ``float``, ``int``) made by the trainer and its step totals. Neither may grow with the
micro-batches: one all-reduce and one read per step, whatever the accumulation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.launchers import REPO, run

TINY = REPO / "launch" / "configs" / "tiny.yaml"
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "gather_object", "reduce_scatter", "reduce_scatter_tensor", "barrier",
)  # fmt: skip
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
# the files whose host reads count: the step's own bookkeeping and the reduction's helper (the
# kernel's one read per call, of its valid-row count, is its chunk plan, not a check)
STEP_FILES = ("pocl_ds/trainer.py", "pocl_ds/step_totals.py", "pocl_ds/distributed.py")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_step_makes_one_collective_and_one_host_read_whatever_its_micro_batches(tmp_path, mode):
    from pocl_ds.synthetic import write_synthetic_tasks

    data = tmp_path / "data.jsonl"
    write_synthetic_tasks(data, num_samples=48, seed=5)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"data": str(data), "out": str(tmp_path), "mode": mode}))
    done = run("torchrun", Path(__file__), [str(spec)], timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"counts_rank{rank}.json").read_text())
        for accumulation in ("1", "3"):
            steps = counts[accumulation]
            assert [s["collectives"] for s in steps] == [["all_reduce"]] * 2, (rank, steps)
            # stop mode reads the step's reduction once; skip mode also reads each micro-batch's
            # own finiteness flag (so a non-finite loss never reaches the gradients)
            reads = 1 + (int(accumulation) if mode == "skip" else 0)
            assert [s["host_reads"] for s in steps] == [reads] * 2, (rank, steps)
            # the sampler's global-batch count is what an all-reduce of the ranks' counts gives
            assert all(s["targets_known"] == s["targets_reduced"] for s in steps), steps
            assert all(not s["skipped"] for s in steps)


def _counting(calls: list[str]):
    """Wrap torch.distributed's collectives: record those called from pocl_ds code."""
    import functools
    import traceback

    import torch.distributed as dist

    def wrap(name, inner):
        @functools.wraps(inner)
        def counted(*args, **kwargs):
            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            caller = next(f for f in reversed(frames) if "/torch/" not in f)
            if "/pocl_ds/" in caller:
                calls.append(name)
            return inner(*args, **kwargs)

        return counted

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def _host_read_counter():
    import traceback

    from torch.overrides import TorchFunctionMode

    class HostReads(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in HOST_READS:
                frames = [f.filename for f in traceback.extract_stack()[:-1]]
                caller = next(f for f in reversed(frames) if "/torch/" not in f)
                self.count += any(caller.endswith(f) for f in STEP_FILES)
            return func(*args, **(kwargs or {}))

    return HostReads()


def _worker(spec_path: str) -> None:
    from pocl_ds import distributed
    from pocl_ds.config import load_config
    from pocl_ds.data import IGNORE_INDEX, collate_for_training
    from pocl_ds.recipe import build_run
    from pocl_ds.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    info = distributed.init_distributed()
    counts = {}
    for accumulation in (1, 3):
        overrides = [
            f"train.output_dir={spec['out']}/run_{accumulation}",
            f"data.train_path={spec['data']}",
            f"data.valid_path={spec['data']}",
            "data.split_sizes=[0, 0]",
            "train.micro_batch_size=2",
            f"train.gradient_accumulation_steps={accumulation}",
            "distill.sft_weight=0.5",
            f"train.on_nonfinite={spec['mode']}",
        ]
        run_parts = build_run(load_config(TINY, overrides))
        trainer = Trainer(run_parts)
        plan = trainer.controller.current_plan()
        sampler = run_parts.samplers[0]
        steps, calls = iter(sampler), []
        _counting(calls)
        counts[accumulation] = []
        for _ in range(2):
            indices = next(steps)
            batches = [[run_parts.samples_by_index[i] for i in mb] for mb in indices]
            known = run_parts.target_tokens(sampler.global_batch(sampler.steps_done - 1))
            local = sum(
                int(
                    collate_for_training(mb, run_parts.pad_id)["labels"][:, 1:]
                    .ne(IGNORE_INDEX)
                    .sum()
                )
                for mb in batches
            )
            reduced = distributed.all_reduce_sum(local)
            calls.clear()
            with _host_read_counter() as reads:
                result = trainer.train_step(plan, batches, global_targets=known)
            trainer.position.global_step += 1
            counts[accumulation].append({
                "collectives": list(calls), "host_reads": reads.count,
                "targets_known": known, "targets_reduced": reduced, "skipped": result["skipped"],
            })  # fmt: skip
        import torch.distributed as dist

        for name in COLLECTIVES:  # unwrap before the next run's build
            inner = getattr(dist, name, None)
            if inner is not None and hasattr(inner, "__wrapped__"):
                setattr(dist, name, inner.__wrapped__)
    out = Path(spec["out"]) / f"counts_rank{info.rank}.json"
    out.write_text(json.dumps(counts))


if __name__ == "__main__":
    from pocl_ds.cli import run_main

    run_main(lambda: _worker(sys.argv[1]))
