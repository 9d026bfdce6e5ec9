"""The stage → epoch → step loop of one distillation run on a DeepSpeed student.

``Trainer(build_run(config)).run()`` is all ``launch/train.py`` does after parsing: ``build_run``
builds the run (data, models, curation, difficulty, plans, samplers), the trainer runs the loop,
validation, checkpoints, export and evaluation; on every rank, rank 0 deciding what is shared.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from pocl_ds import atomic, distributed, plots, telemetry
from pocl_ds.checkpoint import CheckpointManager, export_pretrained
from pocl_ds.config import ExperimentConfig
from pocl_ds.curriculum import StagePlan
from pocl_ds.data import IGNORE_INDEX, TokenizedSample, collate_for_training
from pocl_ds.engine import reset_optimizer_state, set_learning_rate
from pocl_ds.errors import PoclError
from pocl_ds.evaluate import evaluate_model, report_to_json, validation_scores, write_report
from pocl_ds.preemption import PreemptionFlag
from pocl_ds.recipe import Run, build_run
from pocl_ds.sampler import StageSampler
from pocl_ds.step_totals import StepTotals

logger = logging.getLogger(__name__)


@dataclass
class Position:
    """How far the run has come; with the controller's and the samplers' state in a checkpoint
    it puts a resumed run on the same trajectory."""

    global_step: int = 0
    stage_step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0


def _without_targets(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label masked: its loss and gradient are exactly zero."""
    return {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}


def lr_at(step: int, total: int, *, peak: float, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up then cosine decay to 0 (or constant) over ``total`` steps."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Runs a built ``Run``: stages from its controller, epochs and steps from its samplers."""

    def __init__(self, run: Run, *, resume: str = "none") -> None:
        self.run_parts = run
        self.config = run.config
        self.resume = resume
        self.out = run.output_dir
        self.engine = run.engine
        self.controller = run.controller
        self.tokenizer = run.data.tokenizer
        self.metrics = telemetry.MetricsWriter(self.out, enabled=distributed.is_main_process())
        self.checkpoints = CheckpointManager(self.out, keep=self.config.train.keep_checkpoints)
        self.position = Position()
        self.preemption = PreemptionFlag()
        self.skip_nonfinite = self.config.train.on_nonfinite == "skip"
        # curriculum: the controller's own time (plans, stage decisions), difficulty excluded
        self.timings = {**run.timings, "train": 0.0, "validation": 0.0}
        self.preempted = False
        self.total_steps = sum(
            plan.epochs * len(sampler)
            for plan, sampler in zip(self.controller.plans, run.samplers, strict=True)
        )

    # ------------------------------------------------------------------ one optimizer step
    def train_step(
        self,
        plan: StagePlan,
        micro_batches: list[list[TokenizedSample]],
        *,
        global_targets: int | None = None,
    ) -> dict:
        """One optimizer step over ``micro_batches`` (this rank's share of the global batch).

        ``global_targets``: the global batch's target-token count, when the caller knows it
        (the run loop does, from every rank's share of the sampler); else it is all-reduced.
        Besides it, the host-side checks of a step (non-finite losses, the loss sums, token and
        sample counts, the preemption vote) take one all-reduce, after the last forward.
        """
        run = self.run_parts
        started = time.perf_counter()
        step = self.position.global_step
        curated = run.curation.uses_student_samples(step)
        micro_batches = run.curation.apply(
            self.engine.module.model, micro_batches, step=step, synced_gpus=run.zero3
        )
        on_prompt = run.method.loss_on_prompt  # pre-training: every token is a target
        batches = [
            collate_for_training(mb, run.pad_id, loss_on_prompt=on_prompt) for mb in micro_batches
        ]
        if global_targets is None or curated:  # fresh samples: only their rank knows them
            local = sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)
            global_targets = distributed.all_reduce_sum(local)
        world, accumulation = (
            distributed.world_size(),
            self.config.train.gradient_accumulation_steps,
        )
        # The engine averages gradients over ranks and scales by 1/accumulation, so each
        # micro-batch divides its token sum by global_targets / (world × accumulation): the
        # step's gradient is then that of the mean over every valid token of the global batch.
        divisor = max(global_targets, 1.0) / (world * accumulation)
        lr = self._learning_rate(plan)
        set_learning_rate(self.engine, lr)
        totals = StepTotals(run.device)
        for position, (cpu_batch, samples) in enumerate(zip(batches, micro_batches, strict=True)):
            batch = {k: v.to(run.device) for k, v in cpu_batch.items()}
            if totals.skipped:
                batch = _without_targets(batch)
            terms = self._loss_terms(plan, batch, samples, divisor)
            non_finite = totals.check(terms)
            if self.skip_nonfinite and not totals.skipped and bool(non_finite):
                # A non-finite loss must never reach the gradients: this micro-batch and the
                # rest of the step run with no target (zero gradient; DeepSpeed's accumulation
                # counters stay in step), and every rank learns of it from the step's reduction.
                totals.skipped = True
                terms = self._loss_terms(plan, _without_targets(batch), samples, divisor)
            input_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
            totals.add(terms, input_tokens=input_tokens, samples=len(samples))
            if position == len(batches) - 1:
                reduced = totals.reduce(self.preemption.vote)
                if reduced["non_finite"]:
                    self._non_finite(plan, totals.culprits(micro_batches))  # stop mode raises
                    set_learning_rate(self.engine, 0.0)  # skip mode: the parameters stay
            self.engine.backward(terms.loss)
            self.engine.step()
        return {
            # each micro-batch term is (its token sum) × world × accumulation / (global tokens)
            **{k: reduced[k] / (world * accumulation) for k in ("loss", "kd", "ce")},
            "lr": 0.0 if reduced["non_finite"] else lr,
            "tokens_per_s": reduced["tokens"] / max(time.perf_counter() - started, 1e-9),
            "skipped": reduced["non_finite"] > 0,
            "samples": int(reduced["samples"]),
            "student_samples": curated,
            "preemption_votes": reduced["preemption"],
        }

    def _learning_rate(self, plan: StagePlan) -> float:
        if self.config.curriculum.restart_schedule:  # each stage a run of its own (the paper's)
            sampler = self.run_parts.samplers[plan.stage - 1]
            step, span = self.position.stage_step, plan.epochs * len(sampler)
        else:
            step, span = self.position.global_step, self.total_steps
        t = self.config.train
        return lr_at(step, span, peak=t.lr, warmup_ratio=t.warmup_ratio, schedule=t.lr_schedule)

    def _loss_terms(
        self, plan: StagePlan, batch: dict, samples: list[TokenizedSample], divisor: float
    ) -> Any:
        # The teacher's states enter only when its distributions do (never for SeqKD, nor at
        # α = 1, where the distillation term is multiplied by 0): from its cache, or its forward.
        teacher_hidden, teacher_head = None, None
        if self.run_parts.teacher_cache is not None and plan.sft_weight < 1.0:
            teacher_hidden, teacher_head = self.run_parts.teacher_cache.inputs(
                batch["input_ids"], batch["attention_mask"], samples
            )
        return self.engine(
            *(batch[k] for k in ("input_ids", "attention_mask", "labels")),
            teacher_hidden=teacher_hidden,
            teacher_head=teacher_head,
            temperature=plan.temperature,
            sft_weight=plan.sft_weight,
            num_valid_tokens=divisor,
        )

    def _non_finite(self, plan: StagePlan, local: list[int]):
        # Every rank names the same samples, those of every rank's micro-batches whose loss
        # was not finite, so a stop is one message (not one per rank, each its own batch).
        culprits = [i for part in distributed.all_gather_objects(local) for i in part]
        where = f"stage {plan.stage}, step {self.position.global_step + 1}, samples {culprits}"
        if not self.skip_nonfinite:
            raise PoclError(
                f"non-finite loss at {where}; set train.on_nonfinite=skip to skip such steps"
            )
        if distributed.is_main_process():
            logger.warning("non-finite loss at %s: step skipped", where)

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        cfg, run = self.config.eval, self.run_parts
        started = time.perf_counter()
        model = self.engine.module.model
        model.eval()
        scores = validation_scores(
            model,
            run.data.valid,
            self.tokenizer,
            batch_size=cfg.batch_size,
            rouge_samples=cfg.valid_rouge_samples,
            max_new_tokens=cfg.max_new_tokens,
            max_total_length=cfg.max_total_length,
            vocab_size=run.vocab_size,
            synced_gpus=run.zero3,
            device=run.device,
        )
        model.train()
        self.timings["validation"] += time.perf_counter() - started
        return scores

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str:
        state = {
            "position": asdict(self.position),
            "controller": self.controller.state_dict(),
            "samplers": [s.state_dict() for s in self.run_parts.samplers],
            "curation": self.run_parts.curation.state_dict(),
        }
        return self.checkpoints.save(self.engine, self.position.global_step, state)

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
        for sampler, sampler_state in zip(self.run_parts.samplers, state["samplers"], strict=True):
            sampler.load_state_dict(sampler_state)
        self.run_parts.curation.load_state_dict(state["curation"])
        self.metrics.truncate_after(self.position.global_step)
        logger.info("resumed from %s at step %d", tag, self.position.global_step)

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        cfg = self.config
        run_started = time.perf_counter()
        self.try_resume()
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        logger.info(
            f"{self.run_parts.method.label(cfg.distill.divergence)}: "
            f"{len(self.controller.plans)} stages, {self.total_steps} optimizer steps, "
            f"{len(self.run_parts.samples_by_index)} training samples, "
            f"{distributed.world_size()} ranks"
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
            if not self._run_stage(plan, self.run_parts.samplers[plan.stage - 1], bar):
                break
        bar.close()
        self.preemption.stepping = False
        self.timings["train"] = time.perf_counter() - train_started
        if self.preempted:
            return {
                "preempted": True,
                "signal": self.preemption.reason,
                "step": self.position.global_step,
            }
        return self._finish(run_started)

    def _run_stage(self, plan: StagePlan, sampler: StageSampler, bar: Any) -> bool:
        """Train the stage's remaining epochs; False when the run must stop here
        (max_steps reached, or preemption)."""
        p = self.position
        while True:
            if sampler.epoch != self.controller.epochs_run:  # a new epoch (not a resumed one)
                sampler.set_epoch(self.controller.epochs_run)
            steps = iter(sampler)
            while sampler.steps_done < len(sampler):
                if p.global_step >= self.total_steps:
                    return False  # the step budget (train.max_steps) is spent
                indices = next(steps)
                batches = [[self.run_parts.samples_by_index[i] for i in mb] for mb in indices]
                # every rank's share is known here: no collective needed to count its targets
                targets = self.run_parts.target_tokens(sampler.global_batch(sampler.steps_done - 1))
                result = self.train_step(plan, batches, global_targets=targets)
                p.global_step += 1
                p.stage_step += 1
                p.samples_seen += result["samples"]
                p.skipped_steps += int(result["skipped"])
                bar.update(1)
                bar.set_postfix(stage=plan.stage, loss=f"{result['loss']:.3f}", refresh=False)
                self._log_step(plan, result)
                if self.preemption.agreed(result["preemption_votes"]):
                    self.save()
                    if distributed.is_main_process():
                        logger.warning(
                            "%s: checkpoint written at step %d; exiting",
                            self.preemption.reason,
                            p.global_step,
                        )
                    self.preempted = True
                    return False
            if self._end_of_epoch(plan):
                return True

    def _log_step(self, plan: StagePlan, result: dict[str, Any]) -> None:
        p = self.position
        if p.global_step % self.config.train.log_every and not result["skipped"]:
            return
        record = {
            "stage": plan.stage,
            "epoch": self.controller.epochs_run + 1,
            "step": p.global_step,
            **{k: result[k] for k in ("loss", "kd", "ce")},
            "temperature": plan.temperature,
            "sft_weight": plan.sft_weight,
            "lr": result["lr"],
            "tokens_per_s": result["tokens_per_s"],
            "samples_seen": p.samples_seen,
            "skipped_steps": p.skipped_steps,
        }
        if self.run_parts.method.on_policy:
            record["student_samples"] = result["student_samples"]
            # on-policy samples so far cut at their token budget (no EOS)
            record["truncated_samples"] = self.run_parts.curation.truncated_samples
        self.metrics.log(record)

    def _end_of_epoch(self, plan: StagePlan) -> bool:
        """Validate, maybe close the stage, checkpoint; True when the stage is over."""
        p = self.position
        if self.run_parts.teacher_cache is not None:
            self.run_parts.teacher_cache.share()  # memory mode: every rank gets every entry
        scores = self.validate()
        epoch = self.controller.epochs_run + 1
        self.metrics.log({"stage": plan.stage, "epoch": epoch, "step": p.global_step, **scores})
        logger.info(
            f"stage {plan.stage} epoch {epoch}: val loss {scores['val_loss']:.4f}, "
            f"val ROUGE-L {scores['val_rouge_l']:.2f}"
        )
        started = time.perf_counter()
        stage_over = self.controller.report_validation(scores["val_rouge_l"])
        if stage_over:
            self.controller.finish_stage(steps=p.stage_step)
            p.stage_step = 0
        self.timings["curriculum"] += time.perf_counter() - started
        best = distributed.broadcast_object(self.checkpoints.best())
        improved = best is None or scores["val_rouge_l"] > best["metric"]
        if self.config.train.checkpoint_every_epoch or improved:
            tag = self.save()
            if improved:
                self.checkpoints.mark_best(tag, scores["val_rouge_l"])
        return stage_over

    # ------------------------------------------------------------------ the end
    def _evaluate_at_end(self) -> dict[str, Any] | None:
        """ROUGE-L of the best student on the eval suites × seeds (the paper's protocol)."""
        cfg, suites = self.config.eval, self.run_parts.eval_suites
        if not suites:
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
            synced_gpus=self.run_parts.zero3,
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
            "method": self.run_parts.method.label(self.config.distill.divergence),
            "final": str(final),
            "steps": self.position.global_step,
            "best_val_rouge_l": None if best is None else best["metric"],
            "timings": self.timings,
            "wall_s": time.perf_counter() - run_started + self.timings["setup"],
            "eval": evaluation,
            "teacher_cache": cache.summary() if (cache := self.run_parts.teacher_cache) else None,
            # generated answers cut at their token budget, stored without EOS
            "truncated_samples": {
                "teacher_answers": self.run_parts.seqkd_truncated,
                "student_samples": self.run_parts.curation.truncated_samples,
            },
        }
        if distributed.is_main_process():
            self._write_summary(summary, final)
        return summary

    def _write_summary(self, summary: dict[str, Any], final: Any) -> None:
        records = telemetry.read_metrics(self.out / "metrics.jsonl")
        outputs = {
            "run": self.out,
            "final model": final,
            "metrics": self.out / "metrics.jsonl",
            "timeline": plots.plot_curriculum_timeline(
                records, self.controller.summary()["stages"], self.out / "curriculum_timeline.png"
            ),
        }
        if self.run_parts.difficulty is not None:  # ρ against the known level, if any
            known = {s.index: s.difficulty for s in self.run_parts.data.train_raw}
            outputs["difficulty"], summary["difficulty_spearman"] = plots.plot_difficulty_result(
                self.run_parts.difficulty,
                {i: level for i, level in known.items() if level is not None},
                self.out / "difficulty.png",
            )
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        summary["tokens_per_s"] = float(np.mean(rates)) if rates else None
        atomic.write_text(
            self.out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n"
        )
        logger.info(
            telemetry.run_summary(
                wall_time_s=summary["wall_s"],
                tokens_per_s=summary["tokens_per_s"],
                best_val_rouge_l=summary["best_val_rouge_l"],
                outputs={k: str(v) for k, v in outputs.items()},
            )
        )


def train(config: ExperimentConfig, *, resume: str = "none") -> dict[str, Any]:
    """Build the run from ``config`` and train it (what ``launch/train.py`` calls)."""
    return Trainer(build_run(config, resume=resume), resume=resume).run()
