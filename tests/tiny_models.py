"""Tiny HF transformers models built locally from configs (random weights, never downloaded)."""
from __future__ import annotations

import torch
import transformers

VOCAB = 128


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0):
    """A sequence-classification model: the task head (``classifier``) PEFT trains in full."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                  vocab_size=VOCAB, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()
