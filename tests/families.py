"""Tiny random-weight models of every supported decoder family, from transformers' own config
classes (no downloads): 4 layers, hidden 64, vocabulary 256, fp32. Sliding windows are 8 tokens,
shorter than the test sequences, so windowed masks differ from full ones."""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2)

# name -> (config class name, family-specific settings: what makes the family differ from Llama)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),  # every layer windowed, no layer_types
    "mixtral": ("MixtralConfig", {**MOE, "num_local_experts": 4, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}),
    "qwen3": ("Qwen3Config", {}),  # q/k norms
    "qwen3_moe": ("Qwen3MoeConfig", {**MOE, "num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    "gemma2": ("Gemma2Config", {"sliding_window": 8, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 20.0}),
    "gemma3": ("Gemma3TextConfig", {"sliding_window": 8, "sliding_window_pattern": 2, "final_logit_softcapping": 5.0}),
    "phi3": ("Phi3Config", {}),  # fused qkv and gate_up projections
    "olmo2": ("Olmo2Config", {}),  # norms after attention and MLP, none before
    "granite": ("GraniteConfig", {"embedding_multiplier": 12.0, "logits_scaling": 4.0, "residual_multiplier": 0.22,
                                  "attention_multiplier": 0.0625}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2, "max_position_embeddings": 131072}),  # every 2nd layer without RoPE; YaRN x32 of 4,096
    "gpt_oss": ("GptOssConfig", {**MOE, "num_local_experts": 4, "sliding_window": 8}),  # attention sinks
}


def tiny(name: str):
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, settings = FAMILIES[name]
    config = getattr(transformers, class_name)(**{**COMMON, **settings})
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return backbone.requires_grad_(False)


def perturb_exits(model, seed: int = 0) -> None:
    """Move the exits away from their initial copies, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.exits.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
