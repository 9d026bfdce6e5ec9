"""Batched autoregressive generation with a KV cache, left padding and per-prompt seeds.

Used by the difficulty measurer (greedy outputs), SeqKD and on-policy data (samples) and
evaluation. The decoding loop calls the Hugging Face model's ``forward`` itself instead of
``model.generate`` so that three properties hold exactly:

- A prompt's output does not depend on where it runs. Batches are formed from the whole
  prompt list (sorted by length, then chunked) before they are dealt to ranks, and each
  prompt samples from its own ``torch.Generator`` seeded by ``(seed, prompt index)`` (or by a
  seed the caller gives per prompt). One rank and two ranks therefore compute the same batches
  and draw the same numbers: the outputs are bit-identical.
- Left padding with position ids taken from the attention mask, so a padded prompt sees the
  positions it would see alone.
- Under ZeRO-3 a model whose full parameters fit in memory is gathered once per call
  (``engine.gathered_for_generation``): its forwards are then local, and each rank decodes at
  its own pace. Otherwise every forward is a collective (parameters are gathered layer by
  layer), so with ``synced_gpus`` every rank runs the same number of forwards: a rank whose
  rows have all stopped, or that has no batch left, runs one-token dummy forwards until every
  rank is done.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from pocl_ds import distributed
from pocl_ds.engine import gathered_for_generation
from pocl_ds.errors import PoclError
from pocl_ds.models import unwrap_model
from pocl_ds.telemetry import progress as progress_bar

logger = logging.getLogger(__name__)


class Generations(NamedTuple):
    """New tokens per prompt (EOS stripped) and whether each one ended with an EOS.

    ``finished[i]`` is False when prompt ``i`` ran out of its token budget (``max_new_tokens``
    or the total length limit): its answer is cut off, not complete.
    """

    tokens: list[list[int]]
    finished: list[bool]


def plan_batches(prompt_lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Global batches of prompt indices: longest prompts first (ties by index), then chunked.

    Sorting by length keeps left padding small; it also puts the largest batch first, so a
    batch size that does not fit in memory fails at once rather than at the end.
    """
    if batch_size < 1:
        raise PoclError(f"generation batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def prompt_seed(*keys: int) -> int:
    """The 63-bit seed of one prompt's sampler, a hash of its keys, e.g. ``(seed, prompt_index)``.

    Distinct key tuples give unrelated seeds (``(42, 1)`` and ``(43, 0)`` share nothing), so
    callers can key a prompt by everything that should make its draws differ.
    """
    digest = hashlib.sha256(":".join(str(int(key)) for key in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _max_positions(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class _ForwardAdapter:
    """Calls ``forward`` with the cache keyword this transformers version uses.

    transformers 5 renamed ``past_key_values`` to ``cache`` (input and output) and can skip
    the logits of all but the last position (``logits_to_keep``); older versions differ.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        params = inspect.signature(module.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" in params:
            self.keep_kw: str | None = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self.keep_kw = "num_logits_to_keep"
        else:
            self.keep_kw = None

    def last_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: object | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, object | None]:
        """Logits ``[B, V]`` at the last position, and the updated cache (or None)."""
        kwargs: dict[str, object] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": use_cache,
        }
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if self.keep_kw is not None:
            kwargs[self.keep_kw] = 1
        out = self.module(**kwargs)
        new_cache = None
        if use_cache:
            new_cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out["logits"][:, -1, :], new_cache

    def dummy(self, pad_id: int, device: torch.device) -> None:
        """A one-token forward that keeps ZeRO-3's collective gathers in step with peers."""
        ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        self.module(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def _any_rank_true(flag: bool, device: torch.device) -> bool:
    tensor = torch.tensor([int(flag)], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _global_max(value: int, device: torch.device) -> int:
    if distributed.world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def _sample(
    logits: torch.Tensor,
    active: torch.Tensor,
    generators: list[torch.Generator],
    temperature: float,
) -> torch.Tensor:
    """Draw one token per active row from softmax(logits / temperature) by inverse CDF.

    Each row consumes exactly one uniform from its own generator per step it is active, so the
    draws of a prompt never depend on the other rows of its batch.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.zeros(logits.shape[0], 1, dtype=torch.float32)
    for row in active.nonzero().flatten().tolist():
        uniforms[row, 0] = torch.rand(1, generator=generators[row])
    # Scale by the row total so rounding in the cumulative sum can never point past the end.
    target = uniforms.to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def _decode_batch(
    adapter: _ForwardAdapter,
    prompts: list[Sequence[int]],
    seeds: list[int],
    budgets: list[int],
    *,
    pad_id: int,
    eos_ids: torch.Tensor,
    greedy: bool,
    temperature: float,
    vocab_size: int | None,
    use_cache: bool,
    synced: bool,
    device: torch.device,
) -> tuple[list[list[int]], list[bool]]:
    """Generate for one batch (possibly empty, on a rank that only keeps peers in step).

    Returns the new tokens of each row and whether the row stopped at an EOS.
    """
    size = len(prompts)
    finished = torch.tensor([budget <= 0 for budget in budgets], dtype=torch.bool)
    ended_with_eos = torch.zeros(size, dtype=torch.bool)
    outputs: list[list[int]] = [[] for _ in range(size)]
    generators = []
    if not greedy:
        generators = [torch.Generator().manual_seed(row_seed) for row_seed in seeds]
    if size:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((size, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((size, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        budget_tensor = torch.tensor(budgets, dtype=torch.long)
    cache = None
    step = 0
    while True:
        local_busy = size > 0 and not bool(finished.all())
        if synced:
            if not _any_rank_true(local_busy, device):
                break
            if not local_busy:
                adapter.dummy(pad_id, device)
                continue
        elif not local_busy:
            break
        if use_cache and cache is not None:
            step_ids, step_positions = input_ids[:, -1:], position_ids[:, -1:]
        else:
            step_ids, step_positions = input_ids, position_ids
        logits, cache = adapter.last_logits(
            step_ids, attention_mask, step_positions, cache, use_cache
        )
        if vocab_size is not None:
            # Ids past the tokenizer (a padded embedding table's extra rows) are never drawn.
            logits = logits[:, :vocab_size]
        active = ~finished
        if greedy:
            next_tokens = logits.argmax(dim=-1).cpu()
        else:
            next_tokens = _sample(logits, active, generators, temperature).cpu()
        next_tokens = torch.where(active, next_tokens, torch.full_like(next_tokens, pad_id))
        step += 1
        is_eos = torch.isin(next_tokens, eos_ids) & active
        for row in active.nonzero().flatten().tolist():
            if not is_eos[row]:
                outputs[row].append(int(next_tokens[row]))
        ended_with_eos |= is_eos
        finished |= is_eos | (budget_tensor <= step)
        input_ids = torch.cat([input_ids, next_tokens.to(device).unsqueeze(-1)], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((size, 1))], dim=-1)
        # A finished row's filler tokens reuse its last position, so a long-running batch
        # never walks a short row past the model's position table.
        advance = (~finished).long().to(device).unsqueeze(-1)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + advance], dim=-1)
    return outputs, ended_with_eos.tolist()


def _token_budgets(
    batch: Sequence[int],
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    total: int | None,
    limit: int | None,
) -> list[int]:
    """New tokens each prompt may get: ``max_new_tokens``, less where the total length cap
    leaves less room (0 for a prompt that already fills it)."""
    budgets = []
    for index, prompt in zip(batch, rows, strict=True):
        if len(prompt) == 0:
            raise PoclError(f"prompt {index} is empty: every prompt needs at least one token")
        if limit is not None and len(prompt) > limit:
            raise PoclError(
                f"prompt {index} has {len(prompt)} tokens, more than the model's "
                f"{limit} positions: cut prompts to fit (launch/evaluate.py "
                "--max-prompt-length, or data.max_prompt_length for training)"
            )
        room = max_new_tokens if total is None else total - len(prompt)
        budgets.append(max(0, min(max_new_tokens, room)))
    return budgets


def _decode_rounds(
    decode: Callable[..., tuple[list[list[int]], list[bool]]],
    prompts: Sequence[Sequence[int]],
    batches: Iterable[list[int]],
    seeds: Sequence[int] | None,
    *,
    synced: bool,
    device: torch.device,
    max_new_tokens: int,
    total: int | None,
    limit: int | None,
    progress: bool,
    desc: str,
) -> tuple[list[list[tuple[list[int], bool]]], int]:
    """``decode`` (``_decode_batch`` with the call's settings bound) over ``batches`` (a list,
    or an iterator of batches claimed one at a time); with ``synced``, rounds of empty batches
    until every rank is done. ``seeds`` is None for greedy decoding. Returns the per-batch
    results and the number of new tokens."""
    if synced:  # every rank runs the same number of rounds: the forwards are collective
        batches = list(batches)
        rounds = _global_max(len(batches), device)
        schedule: Iterable[list[int]] = (
            batches[r] if r < len(batches) else [] for r in range(rounds)
        )
    else:
        rounds, schedule = len(batches) if isinstance(batches, list) else None, batches
    results: list[list[tuple[list[int], bool]]] = []
    no_room = new_tokens = 0
    bar = progress_bar(total=rounds, desc=desc, unit="batch", disable=not progress)
    try:
        for batch in schedule:
            rows = [prompts[i] for i in batch]
            budgets = _token_budgets(batch, rows, max_new_tokens, total=total, limit=limit)
            no_room += sum(int(max_new_tokens > 0 and budget == 0) for budget in budgets)
            outputs, ended = decode(
                rows, [] if seeds is None else [seeds[i] for i in batch], budgets, synced=synced
            )
            if batch:
                results.append(list(zip(outputs, ended, strict=True)))
            new_tokens += sum(len(tokens) for tokens in outputs)
            bar.update(1)
    finally:
        bar.close()
    if no_room:
        logger.warning(
            "%d prompt(s) already fill the %s-token limit and got no new tokens", no_room, total
        )
    return results, new_tokens


def _generate_batches(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    batches: Iterable[list[int]],
    *,
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    max_new_tokens: int,
    max_total_length: int | None,
    greedy: bool,
    seeds: Sequence[int],
    temperature: float,
    vocab_size: int | None,
    use_cache: bool,
    synced_gpus: bool,
    gather_budget_bytes: int | None,
    progress: bool,
    desc: str,
) -> list[list[tuple[list[int], bool]]]:
    """Run ``batches`` (lists of indices into ``prompts``) on this rank.

    Returns, per batch, the (new tokens, ended with EOS) of each of its prompts; ``seeds[i]``
    seeds prompt ``i``'s sampler.
    """
    if max_new_tokens < 0:
        raise PoclError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise PoclError(f"sampling temperature must be > 0, got {temperature}; use greedy instead")
    module = unwrap_model(model)
    device = next(module.parameters()).device
    limit = _max_positions(module)
    caps = [cap for cap in (max_total_length, limit) if cap is not None]
    eos_list = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    decode = functools.partial(
        _decode_batch,
        _ForwardAdapter(module),
        pad_id=pad_id,
        eos_ids=torch.tensor(eos_list, dtype=torch.long),
        greedy=greedy,
        temperature=temperature,
        vocab_size=vocab_size,
        use_cache=use_cache,
        device=device,
    )
    started = time.perf_counter()
    was_training = module.training
    module.eval()
    try:
        with (
            torch.no_grad(),
            gathered_for_generation(module, budget_bytes=gather_budget_bytes) as whole,
        ):
            # A whole model's forwards are no collectives: each rank decodes its own batches
            # at its own pace, with no dummy forwards and no per-step all-reduce.
            results, new_tokens = _decode_rounds(
                decode,
                prompts,
                batches,
                None if greedy else seeds,
                synced=synced_gpus and not whole and distributed.world_size() > 1,
                device=device,
                max_new_tokens=max_new_tokens,
                total=min(caps) if caps else None,
                limit=limit,
                progress=progress,
                desc=desc,
            )
    finally:
        module.train(was_training)
    prompts_done, seconds = sum(map(len, results)), time.perf_counter() - started
    logger.debug(f"generated {new_tokens} tokens for {prompts_done} prompts in {seconds:.2f}s")
    return results


def _prompt_seeds(num_prompts: int, seed: int, prompt_seeds: Sequence[int] | None) -> Sequence[int]:
    if prompt_seeds is None:
        return [prompt_seed(seed, i) for i in range(num_prompts)]
    if len(prompt_seeds) != num_prompts:
        raise PoclError(f"{len(prompt_seeds)} prompt_seeds given for {num_prompts} prompts")
    return prompt_seeds


def _in_prompt_order(
    batches: list[list[int]], per_batch: Sequence[Sequence[tuple[list[int], bool]]]
) -> Generations:
    by_index = {}
    for batch, rows in zip(batches, per_batch, strict=True):
        by_index.update(zip(batch, rows, strict=True))
    ordered = [by_index[i] for i in range(len(by_index))]
    return Generations([tokens for tokens, _ in ordered], [ended for _, ended in ordered])


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    max_new_tokens: int,
    max_total_length: int | None = None,
    batch_size: int = 8,
    greedy: bool = True,
    seed: int = 0,
    prompt_seeds: Sequence[int] | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    use_cache: bool = True,
    synced_gpus: bool = False,
    gather_budget_bytes: int | None = None,
    progress: bool = True,
    desc: str = "generate",
    return_finished: bool = False,
) -> list[list[int]] | Generations:
    """Continue every prompt on this rank; returns the new tokens only, EOS stripped.

    Args:
        model: a Hugging Face causal LM, or a DeepSpeed engine / DDP wrapper around one.
        prompts: token ids per prompt (any lengths >= 1); batched ``batch_size`` at a time as
            ``input_ids [B, T]`` left padded with ``pad_id``.
        eos_id: a row stops at the first of these ids (not included in its output); None
            never stops early.
        max_new_tokens: at most this many new tokens per prompt.
        max_total_length: at most this many tokens of prompt + output (the model's position
            limit applies as well); a prompt that already fills it gets no new tokens.
        greedy: argmax decoding; otherwise sampling from softmax(logits / temperature) with no
            top-k/top-p filtering, prompt ``i`` seeded by ``prompt_seed(seed, i)``.
        prompt_seeds: one sampler seed per prompt, replacing ``prompt_seed(seed, i)`` (for
            callers whose prompts must draw differently across ranks or steps).
        vocab_size: sample only among the first ``vocab_size`` ids (a padded embedding table's
            extra rows are never produced); None uses every logit.
        use_cache: keep the KV cache (the point); False recomputes the whole prefix each step.
        synced_gpus: run the same number of forwards as every other rank (needed by ZeRO-3's
            per-layer gathers; unused while the model is gathered whole, see below).
        gather_budget_bytes: a ZeRO-3-partitioned model is gathered whole once for the call
            when its full parameters take at most this many bytes on every rank, and layer by
            layer in every forward otherwise; None: half the free device memory
            (``engine.gathered_for_generation``), 0: always layer by layer. The outputs are
            the same either way.
        progress: a tqdm bar over batches on rank 0.
        return_finished: return ``Generations`` (tokens and, per prompt, whether it ended with
            an EOS rather than at its token budget) instead of the tokens alone.

    Returns:
        ``len(prompts)`` lists of new token ids, in the order of ``prompts`` (or ``Generations``).
    """
    batches = plan_batches([len(p) for p in prompts], batch_size)
    per_batch = _generate_batches(
        model,
        prompts,
        batches,
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        max_total_length=max_total_length,
        greedy=greedy,
        seeds=_prompt_seeds(len(prompts), seed, prompt_seeds),
        temperature=temperature,
        vocab_size=vocab_size,
        use_cache=use_cache,
        synced_gpus=synced_gpus,
        gather_budget_bytes=gather_budget_bytes,
        progress=progress,
        desc=desc,
    )
    result = _in_prompt_order(batches, per_batch)
    return result if return_finished else result.tokens


def distributed_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    max_new_tokens: int,
    max_total_length: int | None = None,
    batch_size: int = 8,
    greedy: bool = True,
    seed: int = 0,
    prompt_seeds: Sequence[int] | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    use_cache: bool = True,
    synced_gpus: bool = False,
    gather_budget_bytes: int | None = None,
    progress: bool = True,
    desc: str = "generate",
    return_finished: bool = False,
    balance: bool = True,
) -> list[list[int]] | Generations:
    """``generate`` over the same full ``prompts`` list given on every rank, work shared out.

    Each rank takes the next global batch (see ``plan_batches``) whenever it is free
    (``balance``): outputs end at unknown lengths, so equal counts of batches can be very
    unequal work. With ``synced_gpus`` (every forward collective), or without ``balance``,
    global batch ``b`` runs on rank ``b % world_size``. Every rank returns the full ordered
    result, bit-identical to a one-rank run with the same arguments. Other arguments as for
    ``generate``.
    """
    batches = plan_batches([len(p) for p in prompts], batch_size)
    seeds = _prompt_seeds(len(prompts), seed, prompt_seeds)

    def run_share(share: list[list[int]]) -> list[list[tuple[list[int], bool]]]:
        return _generate_batches(
            model,
            prompts,
            share,
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
            max_total_length=max_total_length,
            greedy=greedy,
            seeds=seeds,
            temperature=temperature,
            vocab_size=vocab_size,
            use_cache=use_cache,
            synced_gpus=synced_gpus,
            gather_budget_bytes=gather_budget_bytes,
            progress=progress,
            desc=desc,
        )

    dynamic = balance and not synced_gpus  # synced ranks must keep step, batch for batch
    per_batch = distributed.score_and_gather(batches, run_share, balance=dynamic)
    result = _in_prompt_order(batches, per_batch)
    return result if return_finished else result.tokens
