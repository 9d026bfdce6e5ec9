"""The stage → epoch → step loop of one distillation run on a DeepSpeed student.

``train(config)`` is everything ``launch/train.py`` does after parsing: data, models, the
difficulty measurer and curriculum, the loop, validation, checkpoints, export and the final
evaluation. Every rank runs it; rank 0 decides what must be decided once (stage plans,
checkpoint bookkeeping) and broadcasts it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocl_ds import distributed, telemetry
from pocl_ds.checkpoint import CheckpointManager, export_pretrained
from pocl_ds.config import ExperimentConfig, save_config
from pocl_ds.curation import CurationPolicy, seqkd_responses
from pocl_ds.curriculum import (
    CurriculumController,
    baby_step_plans,
    equal_budget_epochs,
    shard_indices,
    single_stage_plan,
)
from pocl_ds.data import TokenizedSample, collate_for_training, load_instructions
from pocl_ds.difficulty import measure_difficulty
from pocl_ds.engine import (
    build_ds_config,
    create_student_engine,
    create_teacher,
    reset_optimizer_state,
    set_learning_rate,
    zero_stage,
)
from pocl_ds.errors import PoclError
from pocl_ds.evaluate import evaluate_model, report_to_json, write_report
from pocl_ds.generation import distributed_generate
from pocl_ds.metrics import rouge_l
from pocl_ds.objective import DistillationObjective, teacher_inputs
from pocl_ds.recipe import prepare_data, prepare_models

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Position:
    """Where the loop is; a checkpoint restores it to continue on the same trajectory."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    stage_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    best_metric: float | None = None


def _without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label masked: its loss and gradient are exactly zero."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    return distributed.all_reduce_sum(float(not torch.isfinite(loss.detach()))) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, *, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up then cosine decay to 0 (or constant) over ``total`` steps."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class PreemptionFlag:
    """Turns SIGTERM (a cluster's preemption notice) into a request to checkpoint and exit."""

    def __init__(self) -> None:
        self.requested = False
        if distributed.detect_launcher() != "mpi":
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """True on every rank once any rank was asked to stop (one tiny all-reduce)."""
        return distributed.all_reduce_sum(float(self.requested)) > 0


class Trainer:
    def __init__(self, config: ExperimentConfig, *, resume: str = "none") -> None:
        self.config = config
        self.resume = resume
        self.out = Path(config.train.output_dir)
        self.rank = distributed.rank()
        self.world = distributed.world_size()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.metrics = telemetry.MetricsWriter(self.out, enabled=distributed.is_main_process())
        self.checkpoints = CheckpointManager(self.out, keep=config.train.keep_checkpoints)
        self.position = Position()
        self.preemption = PreemptionFlag()
        # curriculum: the controller's own time (plans, stage decisions), difficulty excluded
        self.timings = {"difficulty": 0.0, "curriculum": 0.0, "train": 0.0, "validation": 0.0}
        self.difficulty = None
        self.preempted = False

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.config
        if distributed.is_main_process():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        distributed.barrier()
        seed_everything(cfg.train.seed)
        self.data = prepare_data(cfg, self.out)
        self.tokenizer = self.data.tokenizer
        student, teacher = prepare_models(cfg, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos_id = self.tokenizer.eos_token_id

        ds_config = build_ds_config(
            cfg.train.ds_config,
            micro_batch_size=cfg.train.micro_batch_size,
            gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
            world_size=self.world,
            precision=cfg.train.precision,
            max_grad_norm=cfg.train.max_grad_norm,
        )
        self.zero3 = zero_stage(ds_config) == 3
        objective = DistillationObjective(student, chunk_size=cfg.distill.chunk_size)
        self.engine = create_student_engine(
            objective, ds_config, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.teacher = None
        if teacher is not None:
            self.teacher = create_teacher(
                teacher,
                partition=cfg.model.teacher_partition,
                dtype=DTYPES[cfg.model.teacher_dtype],
                micro_batch_size=cfg.train.micro_batch_size,
                world_size=self.world,
                device=self.device,
            )
        self.train_samples = self.data.train
        if cfg.distill.method == "seqkd":
            self.train_samples = seqkd_responses(
                self.teacher,
                self.train_samples,
                cache_path=self.out / "seqkd_responses.jsonl",
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                max_length=cfg.data.max_length,
                max_new_tokens=cfg.distill.generation_max_new_tokens,
                batch_size=cfg.eval.batch_size,
                synced_gpus=cfg.model.teacher_partition,
            )
        self.samples_by_index = {s.index: s for s in self.train_samples}
        self.curation = CurationPolicy(
            method=cfg.distill.method,
            on_policy_prob=cfg.distill.on_policy_prob,
            seed=cfg.train.seed,
            max_length=cfg.data.max_length,
            max_new_tokens=cfg.distill.generation_max_new_tokens,
            pad_id=self.pad_id,
            eos_id=self.eos_id,
        )
        started = time.perf_counter()
        self.controller = self._build_controller()
        elapsed = time.perf_counter() - started
        self.timings["curriculum"] += elapsed - self.timings["difficulty"]

    def _build_controller(self) -> CurriculumController:
        cfg = self.config
        c = cfg.curriculum
        on_policy = cfg.distill.method == "gkd"
        indices = [s.index for s in self.train_samples]
        if c.strategy == "none":
            sft = 1.0 if cfg.distill.method in ("sft", "seqkd") else cfg.distill.sft_weight
            plans = single_stage_plan(
                indices,
                temperature=cfg.distill.temperature,
                sft_weight=0.0 if on_policy else sft,
                epochs=cfg.train.epochs,
            )
        else:
            started = time.perf_counter()
            self.difficulty = measure_difficulty(
                self.engine.module.model,
                self.train_samples,
                tokenizer=self.tokenizer,
                pad_id=self.pad_id,
                eos_id=self.eos_id,
                batch_size=c.difficulty_batch_size,
                max_new_tokens=c.difficulty_max_new_tokens,
                max_total_length=cfg.data.max_length,
                rank_by=c.rank_by,
                order=c.order,
                num_subsets=c.num_stages,
                seed=cfg.train.seed,
                rrf_k=c.rrf_k,
                cache_path=self.out / "difficulty.jsonl",
                cache_key={"student": cfg.model.student or cfg.model.student_config},
                synced_gpus=self.zero3,
            )
            self.timings["difficulty"] = time.perf_counter() - started
            plans = baby_step_plans(
                self.difficulty.subsets,
                epochs_per_stage=c.epochs_per_stage
                or equal_budget_epochs(cfg.train.epochs, c.num_stages),
                temperature_start=c.temperature_start,
                temperature_end=c.temperature_end,
                sft_weight_start=c.sft_weight_start,
                sft_weight_end=c.sft_weight_end,
                on_policy=on_policy,
            )
            if cfg.distill.method in ("sft", "seqkd"):  # no teacher distributions to match
                plans = [replace(p, sft_weight=1.0) for p in plans]
        return CurriculumController(
            plans,
            patience=c.patience,
            output_dir=self.out,
            steps_per_epoch=self._steps_per_epoch_of_size,
        )

    # ------------------------------------------------------------------ loop pieces
    def _micro_batches(self, plan: Any, epoch: int) -> list[list[TokenizedSample]]:
        cfg = self.config.train
        shard = shard_indices(
            plan.sample_indices,
            rank=self.rank,
            world_size=self.world,
            epoch=epoch,
            seed=cfg.seed + plan.stage,
        )
        samples = [self.samples_by_index[i] for i in shard]
        mb = cfg.micro_batch_size
        batches = [samples[i : i + mb] for i in range(0, len(samples), mb)]
        usable = len(batches) // cfg.gradient_accumulation_steps * cfg.gradient_accumulation_steps
        if usable == 0:
            raise PoclError(
                f"stage {plan.stage}: {len(plan.sample_indices)} samples over {self.world} ranks "
                f"give fewer than train.gradient_accumulation_steps="
                f"{cfg.gradient_accumulation_steps} micro-batches of {mb}; lower the batch size"
            )
        return batches[:usable]

    def _steps_per_epoch_of_size(self, num_samples: int) -> int:
        cfg = self.config.train
        per_rank = math.ceil(num_samples / self.world)
        return math.ceil(per_rank / cfg.micro_batch_size) // cfg.gradient_accumulation_steps

    def steps_per_epoch(self, plan: Any) -> int:
        return self._steps_per_epoch_of_size(len(plan.sample_indices))

    def _train_step(self, plan: Any, micro_batches: list[list[TokenizedSample]]) -> dict[str, Any]:
        cfg = self.config
        started = time.perf_counter()
        micro_batches = self.curation.apply(
            self.engine.module.model,
            micro_batches,
            step=self.position.global_step,
            synced_gpus=self.zero3,
        )
        collated = [
            {k: v.to(self.device) for k, v in collate_for_training(mb, self.pad_id).items()}
            for mb in micro_batches
        ]
        local_tokens = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in collated)
        global_tokens = distributed.all_reduce_sum(local_tokens)
        # The engine averages gradients over ranks and scales by 1/accumulation, so each
        # micro-batch divides its token sum by global_tokens / (world × accumulation): the
        # step's gradient is then that of the mean over every valid token of the global batch.
        divisor = max(global_tokens, 1.0) / (self.world * cfg.train.gradient_accumulation_steps)
        span = self._schedule_span(plan)
        lr = lr_at(
            self.position.stage_step
            if cfg.curriculum.restart_schedule
            else self.position.global_step,
            span,
            peak=cfg.train.lr,
            warmup_ratio=cfg.train.warmup_ratio,
            schedule=cfg.train.lr_schedule,
        )
        set_learning_rate(self.engine, lr)
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0}
        input_tokens = 0
        skipped = False
        for position, (batch, samples) in enumerate(zip(collated, micro_batches, strict=True)):
            if skipped:
                batch = _without_targets(batch)
            terms = self._loss_terms(plan, batch, divisor)
            if not skipped and not _finite_on_every_rank(terms.loss):
                self._non_finite(plan, samples, terms.loss)
                # Keep DeepSpeed's accumulation counters in step: the rest of this step's
                # micro-batches still run forward/backward, with no target tokens, so they add
                # zero gradient; and the optimizer step is taken at learning rate 0, so the
                # parameters do not move.
                skipped = True
                batch = _without_targets(batch)
                terms = self._loss_terms(plan, batch, divisor)
            if skipped and position == len(collated) - 1:
                set_learning_rate(self.engine, 0.0)
            self.engine.backward(terms.loss)
            self.engine.step()
            for key in sums:
                sums[key] += float(getattr(terms, key).detach())
            input_tokens += int(batch["attention_mask"].sum())
        # Each micro-batch term is (its token sum) × world × accumulation / (global tokens).
        scale = self.world * cfg.train.gradient_accumulation_steps
        totals = {k: distributed.all_reduce_sum(v) / scale for k, v in sums.items()}
        elapsed = time.perf_counter() - started
        tokens = distributed.all_reduce_sum(input_tokens)
        return {
            **totals,
            "lr": 0.0 if skipped else lr,
            "tokens_per_s": tokens / max(elapsed, 1e-9),
            "skipped": skipped,
            "samples": int(distributed.all_reduce_sum(sum(len(mb) for mb in micro_batches))),
        }

    def _loss_terms(self, plan: Any, batch: dict[str, torch.Tensor], divisor: float) -> Any:
        cfg = self.config
        teacher_hidden, teacher_head = (
            (None, None)
            if self.teacher is None
            else teacher_inputs(self.teacher, batch["input_ids"], batch["attention_mask"])
        )
        return self.engine(
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            kind="jsd" if cfg.distill.method == "gkd" else cfg.distill.divergence,
            temperature=plan.temperature,
            beta=cfg.distill.beta,
            sft_weight=plan.sft_weight,
            num_valid_tokens=divisor,
            scale_by_temperature_squared=cfg.distill.scale_by_temperature_squared,
        )

    def _non_finite(self, plan: Any, samples: list[TokenizedSample], loss: torch.Tensor) -> None:
        # Every rank names the same samples, those of the ranks whose own loss is not finite,
        # so a stop is one message (not one per rank, each naming its own batch).
        local = [] if bool(torch.isfinite(loss.detach())) else [s.index for s in samples]
        culprits = [i for part in distributed.all_gather_objects(local) for i in part]
        where = f"stage {plan.stage}, step {self.position.global_step + 1}, samples {culprits}"
        if self.config.train.on_nonfinite == "stop":
            raise PoclError(
                f"non-finite loss at {where}; set train.on_nonfinite=skip to skip such steps"
            )
        if distributed.is_main_process():
            logger.warning("non-finite loss at %s: step skipped", where)

    def _schedule_span(self, plan: Any) -> int:
        if self.config.curriculum.restart_schedule:
            return plan.epochs * self.steps_per_epoch(plan)
        return self.total_steps

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        cfg = self.config
        started = time.perf_counter()
        model = self.engine.module.model
        model.eval()
        valid = self.data.valid
        # Validation CE: every rank takes every world-th batch; sums cross ranks.
        loss_sum, count = 0.0, 0
        batches = [
            valid[i : i + cfg.eval.batch_size] for i in range(0, len(valid), cfg.eval.batch_size)
        ]
        for b in range(self.rank, len(batches) + (-len(batches)) % self.world, self.world):
            chunk = batches[b] if b < len(batches) else batches[0]
            batch = {
                k: v.to(self.device) for k, v in collate_for_training(chunk, self.pad_id).items()
            }
            logits_loss = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
            ).loss
            n = int(batch["labels"][:, 1:].ne(-100).sum())
            if b < len(batches):
                loss_sum += float(logits_loss) * n
                count += n
        val_loss = distributed.all_reduce_sum(loss_sum) / max(
            1.0, distributed.all_reduce_sum(count)
        )
        limit = cfg.eval.valid_rouge_samples or len(valid)
        scored = valid[:limit]
        outputs = distributed_generate(
            model,
            [s.prompt_ids for s in scored],
            pad_id=self.pad_id,
            eos_id=self.eos_id,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_total_length=cfg.eval.max_total_length,
            batch_size=cfg.eval.batch_size,
            greedy=True,
            synced_gpus=self.zero3,
            desc="validation",
        )
        texts = self.tokenizer.batch_decode(outputs, skip_special_tokens=True)
        rouge = 100.0 * float(
            np.mean([rouge_l(t, s.references) for t, s in zip(texts, scored, strict=True)])
        )
        model.train()
        self.timings["validation"] += time.perf_counter() - started
        return {"val_loss": val_loss, "val_rouge_l": rouge}

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "position": asdict(self.position),
            "controller": self.controller.state_dict(),
            "curation": self.curation.state_dict(),
        }

    def save(self) -> str:
        return self.checkpoints.save(self.engine, self.position.global_step, self._trainer_state())

    def try_resume(self) -> None:
        if self.resume == "none":
            return
        tag = self.checkpoints.find_resumable() if self.resume == "auto" else self.resume
        tag = distributed.broadcast_object(tag)
        if tag is None:
            logger.info("no checkpoint to resume from in %s: starting fresh", self.checkpoints.root)
            return
        state = self.checkpoints.load(self.engine, tag)
        self.position = Position(**state["position"])
        self.controller.load_state_dict(state["controller"])
        self.curation.load_state_dict(state["curation"])
        self.metrics.truncate_after(self.position.global_step)
        logger.info("resumed from %s at step %d", tag, self.position.global_step)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.config
        run_started = time.perf_counter()
        self.setup()
        plans = self.controller.plans
        self.total_steps = sum(p.epochs * self.steps_per_epoch(p) for p in plans)
        self.try_resume()
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        logger.info(
            "%s%s: %d stages, %d optimizer steps, %d training samples, %d ranks",
            cfg.distill.method,
            "" if cfg.distill.method in ("sft", "seqkd") else f" ({cfg.distill.divergence})",
            len(plans),
            self.total_steps,
            len(self.train_samples),
            self.world,
        )
        bar = telemetry.progress(total=self.total_steps, desc="train", unit="step")
        bar.update(self.position.global_step)
        if self.position.global_step == 0:  # the starting point of the validation curves
            self.metrics.log({"stage": 1, "epoch": 0, "step": 0, **self.validate()})
        self.engine.module.train()
        train_started = time.perf_counter()
        while not self.controller.finished:
            plan = self.controller.current_plan()
            if self.position.stage_step == 0 and cfg.curriculum.restart_schedule:
                reset_optimizer_state(self.engine)
            if not self._run_stage(plan, bar):
                break
        bar.close()
        self.timings["train"] = time.perf_counter() - train_started
        if self.preempted:
            return {"preempted": True, "step": self.position.global_step}
        return self._finish(run_started)

    def _run_stage(self, plan: Any, bar: Any) -> bool:
        """Train the stage's remaining epochs; False when the run must stop here
        (max_steps reached, or preemption)."""
        cfg = self.config
        ga = cfg.train.gradient_accumulation_steps
        p = self.position
        while True:
            micro = self._micro_batches(plan, p.epoch)
            steps = len(micro) // ga
            while p.step_in_epoch < steps:
                if p.global_step >= self.total_steps:
                    return False
                s = p.step_in_epoch
                result = self._train_step(plan, micro[s * ga : (s + 1) * ga])
                p.global_step += 1
                p.step_in_epoch += 1
                p.stage_step += 1
                p.samples_seen += result["samples"]
                p.skipped_steps += int(result["skipped"])
                bar.update(1)
                bar.set_postfix(stage=plan.stage, loss=f"{result['loss']:.3f}", refresh=False)
                if p.global_step % cfg.train.log_every == 0 or result["skipped"]:
                    self.metrics.log(
                        {
                            "stage": plan.stage,
                            "epoch": p.epoch + 1,
                            "step": p.global_step,
                            "loss": result["loss"],
                            "kd": result["kd"],
                            "ce": result["ce"],
                            "temperature": plan.temperature,
                            "sft_weight": plan.sft_weight,
                            "lr": result["lr"],
                            "tokens_per_s": result["tokens_per_s"],
                            "samples_seen": p.samples_seen,
                            "skipped_steps": p.skipped_steps,
                        }
                    )
                if self.preemption.agreed():
                    self.save()
                    if distributed.is_main_process():
                        logger.warning(
                            "SIGTERM: checkpoint written at step %d; exiting", p.global_step
                        )
                    self.preempted = True
                    return False
            if self._end_of_epoch(plan):
                return True

    def _end_of_epoch(self, plan: Any) -> bool:
        """Validate, maybe close the stage, checkpoint; True when the stage is over."""
        cfg = self.config
        p = self.position
        scores = self.validate()
        self.metrics.log(
            {"stage": plan.stage, "epoch": p.epoch + 1, "step": p.global_step, **scores}
        )
        logger.info(
            "stage %d epoch %d: val loss %.4f, val ROUGE-L %.2f",
            plan.stage,
            p.epoch + 1,
            scores["val_loss"],
            scores["val_rouge_l"],
        )
        started = time.perf_counter()
        stage_over = self.controller.report_validation(scores["val_rouge_l"])
        p.epoch += 1
        p.step_in_epoch = 0
        if stage_over:
            self.controller.finish_stage(steps=p.stage_step)
            p.epoch = 0
            p.stage_step = 0
        self.timings["curriculum"] += time.perf_counter() - started
        improved = p.best_metric is None or scores["val_rouge_l"] > p.best_metric
        if improved:
            p.best_metric = scores["val_rouge_l"]
        if cfg.train.checkpoint_every_epoch or improved:
            tag = self.save()
            if improved:
                self.checkpoints.mark_best(tag, scores["val_rouge_l"])
        return stage_over

    def _plot_difficulty(self) -> Path:
        position = {index: rank for rank, index in enumerate(self.difficulty.order, start=1)}
        records = [
            {"index": r.index, "score": r.fused, "rank": position[r.index], "subset": r.subset}
            for r in self.difficulty.records
        ]
        known = {s.index: s.difficulty for s in self.data.train_raw if s.difficulty is not None}
        return telemetry.plot_difficulty(records, self.out / "difficulty.png", known or None)

    def _evaluate_at_end(self) -> dict[str, Any] | None:
        """ROUGE-L of the best student on the eval suites × seeds (the paper's protocol)."""
        cfg = self.config.eval
        if not cfg.evaluate_at_end:
            return None
        if cfg.suites:
            suites = {
                name: load_instructions(path, data_format=self.config.data.format)
                for name, path in cfg.suites.items()
            }
        elif self.data.test_raw:
            suites = {"test": self.data.test_raw}
        else:
            logger.info("no test split and no eval.suites: skipping the final evaluation")
            return None
        started = time.perf_counter()
        report = evaluate_model(
            self.engine.module.model,
            self.tokenizer,
            suites,
            name=self.out.name,
            seeds=cfg.seeds,
            greedy=cfg.greedy,
            batch_size=cfg.batch_size,
            max_total_length=cfg.max_total_length,
            synced_gpus=self.zero3,
        )
        self.timings["evaluation"] = time.perf_counter() - started
        write_report(report, self.out / "eval")
        return report_to_json(report)

    def _finish(self, run_started: float) -> dict[str, Any]:
        best = distributed.broadcast_object(self.checkpoints.best())
        if best is not None:
            self.checkpoints.load(self.engine, best["tag"], restore_rng=False)
        final = export_pretrained(self.engine, self.tokenizer, self.out / "final")
        evaluation = self._evaluate_at_end()
        summary: dict[str, Any] = {
            "output_dir": str(self.out),
            "final": str(final),
            "steps": self.position.global_step,
            "best_val_rouge_l": None if best is None else best["metric"],
            "timings": self.timings,
            "wall_s": time.perf_counter() - run_started,
            "eval": evaluation,
        }
        if distributed.is_main_process():
            records = telemetry.read_metrics(self.out / "metrics.jsonl")
            stages = self.controller.summary()["stages"]
            outputs = {
                "run": self.out,
                "final model": final,
                "metrics": self.out / "metrics.jsonl",
                "timeline": telemetry.plot_curriculum_timeline(
                    records, stages, self.out / "curriculum_timeline.png"
                ),
            }
            if self.difficulty is not None:
                outputs["difficulty"] = self._plot_difficulty()
            rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
            summary["tokens_per_s"] = float(np.mean(rates)) if rates else None
            (self.out / "summary.json").write_text(
                json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8"
            )
            logger.info(
                telemetry.run_summary(
                    wall_time_s=summary["wall_s"],
                    tokens_per_s=summary["tokens_per_s"],
                    best_val_rouge_l=summary["best_val_rouge_l"],
                    outputs={k: str(v) for k, v in outputs.items()},
                )
            )
        return summary


def train(config: ExperimentConfig, *, resume: str = "none") -> dict[str, Any]:
    return Trainer(config, resume=resume).run()
