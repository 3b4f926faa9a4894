"""Tiny LLaMA and GPT-2 models built from configs (no download), and calibration data."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 256
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def llama_config(
    *,
    vocab: int = VOCAB,
    intermediate: int = 96,
    layers: int = 2,
    max_positions: int = 128,
    tie_word_embeddings: bool = False,
) -> LlamaConfig:
    """A 64-wide LLaMA config (4 heads, 2 KV heads: GQA)."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
    )


def tiny_llama(
    seed: int = 0,
    *,
    vocab: int = VOCAB,
    intermediate: int = 96,
    layers: int = 2,
    max_positions: int = 128,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A 64-wide LLaMA (:func:`llama_config`) with fresh weights from ``seed``."""
    torch.manual_seed(seed)
    cfg = llama_config(
        vocab=vocab,
        intermediate=intermediate,
        layers=layers,
        max_positions=max_positions,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(cfg).eval()


def sequences(gen: torch.Generator, n: int, lo: int = 12, hi: int = 40) -> list[torch.Tensor]:
    """``n`` random token sequences of random lengths in ``[lo, hi)``."""
    lengths = torch.randint(lo, hi, (n,), generator=gen)
    return [torch.randint(0, VOCAB, (int(L),), generator=gen) for L in lengths]


def pad(seqs: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(B, L)`` ids and the boolean mask of real tokens."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask
