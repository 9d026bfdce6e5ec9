"""Tokenizers, teacher/student models, tiny inline configs and vocabulary alignment.

Everything between a model name and a module ready for DeepSpeed: Hugging Face causal LMs
by name or path, tiny gpt2/opt/llama/qwen2 models from inline configs (no download), a
byte-level BPE trained on the run's own texts for from-scratch students, the teacher/student
tokenizer agreement check of SPEC.md, and the pieces the fused loss needs (the output head
and the hidden states that feed it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocl_ds.errors import PoclError

logger = logging.getLogger(__name__)

TINY_FAMILIES = ("gpt2", "opt", "llama", "qwen2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BPE_EOS_TOKEN = "<|endoftext|>"
BPE_PAD_TOKEN = "<|pad|>"
# Configs whose logits are not a plain linear map of the final hidden states.
_NONLINEAR_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale")


# ----------------------------------------------------------------------------- tokenizers


def load_tokenizer(name_or_path: str | Path) -> Any:
    """A Hugging Face tokenizer by hub name or local directory, with EOS and PAD defined.

    A tokenizer without a pad token (GPT-2, LLaMA) gets PAD = EOS: padded positions are
    excluded by the attention mask and the labels, never by the pad id, so reuse is safe.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise PoclError(
            f"cannot load tokenizer {str(name_or_path)!r} ({type(err).__name__}: {err}); check "
            "the hub name or the directory (it must hold tokenizer files)"
        ) from None
    return _with_special_tokens(tokenizer)


def _with_special_tokens(tokenizer: Any) -> Any:
    if tokenizer.eos_token_id is None:
        raise PoclError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token; responses must end with one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], *, vocab_size: int, save_dir: str | Path) -> Any:
    """Train a byte-level BPE on ``texts`` and save it (``save_pretrained``) in ``save_dir``.

    Byte-level so every string is encodable and decodes back exactly. ``vocab_size`` counts
    the 256 byte tokens and the two special tokens (EOS ``<|endoftext|>``, PAD ``<|pad|>``);
    the trainer may stop below it when the texts have no more merges. Reload the result
    with :func:`load_tokenizer` (evaluation and export do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = [BPE_EOS_TOKEN, BPE_PAD_TOKEN]
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise PoclError(
            f"BPE vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum} "
            "(256 bytes + EOS + PAD)"
        )
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=BPE_EOS_TOKEN, pad_token=BPE_PAD_TOKEN
    )
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    tokenizer.name_or_path = str(save_dir)
    logger.info("trained a byte-level BPE of %d tokens, saved to %s", len(tokenizer), save_dir)
    return tokenizer


def check_tokenizers_agree(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Stop before any compute when teacher and student would read ids differently.

    They must have the same number of ids, the same token at every id and the same EOS and
    BOS ids (SPEC: divergences compare distributions id by id). PAD ids are not compared:
    padded positions are masked and never scored.
    """
    names = f"teacher tokenizer {teacher_tokenizer.name_or_path!r} and student tokenizer " + (
        f"{student_tokenizer.name_or_path!r}"
    )
    problems = []
    if len(teacher_tokenizer) != len(student_tokenizer):
        problems.append(f"sizes {len(teacher_tokenizer)} vs {len(student_tokenizer)}")
    teacher_tokens = {i: t for t, i in teacher_tokenizer.get_vocab().items()}
    student_tokens = {i: t for t, i in student_tokenizer.get_vocab().items()}
    differing = sorted(
        i
        for i in teacher_tokens.keys() & student_tokens.keys()
        if teacher_tokens[i] != student_tokens[i]
    )
    if differing:
        examples = ", ".join(
            f"id {i}: {teacher_tokens[i]!r} vs {student_tokens[i]!r}" for i in differing[:3]
        )
        problems.append(f"{len(differing)} shared id(s) map to different tokens ({examples})")
    for role in ("eos", "bos"):
        teacher_id = getattr(teacher_tokenizer, f"{role}_token_id")
        student_id = getattr(student_tokenizer, f"{role}_token_id")
        if teacher_id != student_id:
            problems.append(f"{role.upper()} ids {teacher_id} vs {student_id}")
    if problems:
        raise PoclError(
            f"{names} disagree: {'; '.join(problems)}. Distillation compares the two models id "
            "by id: use a student of the teacher's family or the teacher's tokenizer"
        )


def shared_vocab_size(tokenizer_size: int, teacher_width: int, student_width: int) -> int:
    """Width of the logits the divergence compares: the tokenizer's ids, nothing more.

    Embedding tables are often padded past the tokenizer (50257 → 50304, 151665 → 151936
    or 152064); those columns are never real tokens, so both models' logits are cut to the
    first ``tokenizer_size`` columns, which gives every padded column zero probability.
    """
    narrow = min(teacher_width, student_width)
    if narrow < tokenizer_size:
        raise PoclError(
            f"a model's output width ({narrow}; teacher {teacher_width}, student "
            f"{student_width}) is below the tokenizer size {tokenizer_size}: resize the model's "
            "embeddings (load_causal_lm(vocab_size=...)) or use its own tokenizer"
        )
    return tokenizer_size


# ----------------------------------------------------------------------------- models


def tiny_model_config(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    intermediate_size: int | None = None,
    **overrides: Any,
) -> Any:
    """A small config of one of :data:`TINY_FAMILIES`; ``overrides`` go to the config as-is.

    ``intermediate_size`` defaults to 4 × hidden. For opt, ``word_embed_proj_dim`` may be
    given in ``overrides`` to get the project_in/project_out layers of the larger OPTs.
    """
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    ffn = intermediate_size or 4 * hidden_size
    if family == "gpt2":
        settings = dict(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            n_inner=ffn,
        )
        config_class = GPT2Config
    elif family == "opt":
        settings = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_positions,
            ffn_dim=ffn,
            word_embed_proj_dim=hidden_size,
        )
        config_class = OPTConfig
    elif family in ("llama", "qwen2"):
        settings = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            intermediate_size=ffn,
        )
        config_class = LlamaConfig if family == "llama" else Qwen2Config
    else:
        raise PoclError(
            f"model family {family!r} has no tiny config: use one of {', '.join(TINY_FAMILIES)}"
        )
    # The families' default special ids (50256, 1/2, ...) are wrong for a run's own tokenizer;
    # leave them unset unless given (generation and export pass the tokenizer's ids).
    settings.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    settings.update(overrides)
    try:
        return config_class(vocab_size=vocab_size, **settings)
    except (TypeError, ValueError) as err:
        raise PoclError(f"tiny {family} config is invalid: {err}") from None


def load_causal_lm(
    name_or_path: str | Path | None = None,
    *,
    inline_config: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: str = "fp32",
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> Any:
    """A causal LM by hub name/path, or a freshly initialised tiny one from ``inline_config``.

    Args:
        name_or_path: hub name or local directory (``AutoModelForCausalLM.from_pretrained``).
        inline_config: ``{"family": "gpt2"|"opt"|"llama"|"qwen2", **tiny_model_config kwargs}``;
            exactly one of this and ``name_or_path``. Initialised from ``seed`` without
            touching the global RNG.
        vocab_size: the tokenizer size. Required with ``inline_config``; for a pretrained model
            the embeddings are resized when they are narrower (e.g. a pad token was added).
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        gradient_checkpointing: trade compute for activation memory (turns the KV cache off).
    """
    from transformers import AutoModelForCausalLM

    if (name_or_path is None) == (inline_config is None):
        raise PoclError("give exactly one of a model name/path and an inline model config")
    if dtype not in DTYPES:
        raise PoclError(f"dtype {dtype!r} is unknown: use one of {', '.join(DTYPES)}")
    if inline_config is not None:
        settings = dict(inline_config)
        family = settings.pop("family", None)
        if family is None:
            raise PoclError(
                f"inline model config needs 'family' (one of {', '.join(TINY_FAMILIES)})"
            )
        if vocab_size is None:
            raise PoclError("an inline model config needs vocab_size (the tokenizer's size)")
        config = tiny_model_config(family, vocab_size=vocab_size, **settings)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # eval() like from_pretrained, so both paths hand back a model in the same mode.
            model = AutoModelForCausalLM.from_config(config).to(DTYPES[dtype]).eval()
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=DTYPES[dtype])
        except (OSError, ValueError) as err:
            raise PoclError(
                f"cannot load model {str(name_or_path)!r} ({type(err).__name__}: {err}); check "
                "the hub name or the directory (config.json and weights)"
            ) from None
        width = model.get_input_embeddings().weight.shape[0]
        if vocab_size is not None and vocab_size > width:
            logger.info("resizing %s embeddings from %d to %d", name_or_path, width, vocab_size)
            model.resize_token_embeddings(vocab_size)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The lm_head's ``weight`` [V, H] and ``bias`` [V] (or None) of a model or DeepSpeed engine."""
    head = unwrap_model(model).get_output_embeddings()
    return head.weight, head.bias


def final_hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The hidden states that feed the lm_head, without computing logits.

    ``model.base_model`` is ``transformer`` (gpt2, after ln_f), ``model`` (opt: OPTModel,
    after final_layer_norm and project_out; llama/qwen2: after the final norm), so
    ``hidden @ weight.T (+ bias)`` equals the model's logits.

    Args:
        input_ids: [B, T] long. attention_mask: [B, T] (0 on padding, left or right).

    Returns:
        [B, T, H'] where H' is the lm_head's input width.
    """
    module = unwrap_model(model)
    for attribute in _NONLINEAR_HEAD_ATTRIBUTES:
        if getattr(module.config, attribute, None) not in (None, 1.0):
            raise PoclError(
                f"model type {module.config.model_type!r} sets {attribute}, so its logits are not "
                "hidden @ lm_head; turn the fused loss off for it"
            )
    outputs = module.base_model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True
    )
    return outputs.last_hidden_state


def unwrap_model(model: nn.Module) -> Any:
    """The Hugging Face model inside wrappers; a bare Hugging Face model is returned as is.

    DeepSpeed engines and DDP keep their module as ``.module``; the trainer's loss wrapper
    keeps the language model as ``.model``.
    """
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            raise PoclError(
                f"expected a Hugging Face causal LM or a DeepSpeed engine around one, got a "
                f"{type(model).__name__}"
            )
        model = inner
    return model
