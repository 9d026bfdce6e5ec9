"""Tests of pocl_ds.models: tokenizers, tiny families, loading, head/hidden split, vocab alignment."""

from __future__ import annotations

import pytest
import torch

from pocl_ds.data import render_prompt
from pocl_ds.errors import PoclError
from pocl_ds.models import (
    TINY_FAMILIES,
    check_tokenizers_agree,
    final_hidden_states,
    load_causal_lm,
    load_tokenizer,
    output_head,
    shared_vocab_size,
    tiny_model_config,
    train_bpe_tokenizer,
)

torch.set_num_threads(1)

TEXTS = [render_prompt(f"Add {a} and {b}.") + str(a + b) for a in range(12) for b in range(6)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe_tokenizer(TEXTS, vocab_size=300, save_dir=directory)
    return directory


def test_bpe_tokenizer_roundtrips_and_reloads(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir)
    assert 258 < len(tokenizer) <= 300
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    text = "Ünïcode, tabs\tand 12345 — never seen before\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # Trained merges shorten the texts it was trained on well below one token per byte.
    assert len(tokenizer(TEXTS[0])["input_ids"]) < len(TEXTS[0].encode()) / 2


def test_bpe_training_is_deterministic(tmp_path, bpe_dir):
    again = train_bpe_tokenizer(TEXTS, vocab_size=300, save_dir=tmp_path)
    assert again.get_vocab() == load_tokenizer(bpe_dir).get_vocab()


def test_bpe_vocab_too_small(tmp_path):
    with pytest.raises(PoclError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(TEXTS, vocab_size=100, save_dir=tmp_path)


def test_load_tokenizer_errors_and_pad_default(tmp_path, bpe_dir):
    with pytest.raises(PoclError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path / "nothing-here")
    # A tokenizer without PAD (GPT-2 style) gets PAD = EOS.
    tokenizer = load_tokenizer(bpe_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "nopad")
    reloaded = load_tokenizer(tmp_path / "nopad")
    assert reloaded.pad_token_id == reloaded.eos_token_id


def test_tokenizers_agree_and_mismatch_is_named(tmp_path, bpe_dir):
    teacher = load_tokenizer(bpe_dir)
    check_tokenizers_agree(teacher, load_tokenizer(bpe_dir))
    other = train_bpe_tokenizer(
        ["completely different words, zebra quartz" * 3] * 20, vocab_size=300, save_dir=tmp_path
    )
    with pytest.raises(PoclError) as error:
        check_tokenizers_agree(teacher, other)
    message = str(error.value)
    assert str(bpe_dir) in message and str(tmp_path) in message
    assert "map to different tokens (id " in message


def test_special_token_mismatch(bpe_dir, tmp_path):
    teacher = load_tokenizer(bpe_dir)
    student = load_tokenizer(bpe_dir)
    student.eos_token = "<|pad|>"
    with pytest.raises(PoclError, match=r"EOS ids 0 vs 1"):
        check_tokenizers_agree(teacher, student)


def test_shared_vocab_size():
    assert shared_vocab_size(50257, 50304, 50257) == 50257
    assert shared_vocab_size(151665, 152064, 151936) == 151665
    with pytest.raises(PoclError, match="below the tokenizer size 300"):
        shared_vocab_size(300, 299, 320)


FAMILY_CASES = [(family, {}) for family in TINY_FAMILIES] + [("opt", {"word_embed_proj_dim": 32})]


@pytest.mark.parametrize(("family", "extra"), FAMILY_CASES)
def test_tiny_family_hidden_times_head_equals_logits(family, extra):
    model = load_causal_lm(
        inline_config={"family": family, "hidden_size": 64, "num_layers": 2, **extra},
        vocab_size=300,
        seed=1,
    )
    input_ids = torch.randint(0, 300, (3, 9), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding
    attention_mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        hidden = final_hidden_states(model, input_ids, attention_mask)
        weight, bias = output_head(model)
        logits = hidden @ weight.T + (0 if bias is None else bias)
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert hidden.shape == (3, 9, extra.get("word_embed_proj_dim", 64))
    assert weight.shape[0] == 300
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logits).all()


def test_inline_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = load_causal_lm(inline_config={"family": "llama"}, vocab_size=280, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = load_causal_lm(inline_config={"family": "llama"}, vocab_size=280, seed=3)
    third = load_causal_lm(inline_config={"family": "llama"}, vocab_size=280, seed=4)
    w1, w2, w3 = (output_head(m)[0] for m in (first, second, third))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)


def test_pretrained_roundtrip_dtype_resize_and_checkpointing(tmp_path):
    model = load_causal_lm(inline_config={"family": "qwen2"}, vocab_size=280)
    model.save_pretrained(tmp_path / "tiny")
    loaded = load_causal_lm(tmp_path / "tiny", dtype="bf16", gradient_checkpointing=True)
    assert output_head(loaded)[0].dtype == torch.bfloat16
    assert loaded.is_gradient_checkpointing and loaded.config.use_cache is False
    torch.testing.assert_close(
        output_head(loaded)[0], output_head(model)[0].to(torch.bfloat16), rtol=0, atol=0
    )
    resized = load_causal_lm(tmp_path / "tiny", vocab_size=290)
    assert output_head(resized)[0].shape[0] == 290
    # Gradient checkpointing still trains: a backward pass reaches the embeddings.
    trained = load_causal_lm(tmp_path / "tiny", gradient_checkpointing=True).train()
    ids = torch.randint(0, 280, (2, 6))
    trained(input_ids=ids, labels=ids).loss.backward()
    assert trained.get_input_embeddings().weight.grad is not None


def test_model_loading_errors(tmp_path):
    with pytest.raises(PoclError, match="exactly one"):
        load_causal_lm()
    with pytest.raises(PoclError, match="cannot load model"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(PoclError, match="needs vocab_size"):
        load_causal_lm(inline_config={"family": "gpt2"})
    with pytest.raises(PoclError, match="needs 'family'"):
        load_causal_lm(inline_config={"hidden_size": 32}, vocab_size=280)
    with pytest.raises(PoclError, match="dtype 'fp8' is unknown"):
        load_causal_lm(inline_config={"family": "gpt2"}, vocab_size=280, dtype="fp8")
    with pytest.raises(PoclError, match="family 'bert' has no tiny config"):
        tiny_model_config("bert", vocab_size=280)
