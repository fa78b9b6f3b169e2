"""Tiny randomly initialised decoder-only models, built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)

# How close a runtime's logits of these models must be to ours after an export: the auto_round and gptq consumers' CPU
# kernels round differently by CPU (an AVX512 Xeon without BF16: a few logits up to 6e-3 off; an AVX512-BF16 EPYC: within 3e-3)
CONSUMER_TOL = dict(atol=1e-2, rtol=3e-3)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=16),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=16, sliding_window=16),
    "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=16),
    "phi3": lambda: tf.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0),
    "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "opt": lambda: tf.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, word_embed_proj_dim=64),
    "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=256),
}


def make(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(config, k, v)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def calib_ids(n: int = 16, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# Mixtures of experts, kept apart from CONFIGS so that the dense architectures' tests stay as they are.
# intermediate (96) differs from hidden (64) so that a transposed expert matrix cannot pass for the right one.
MOE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256, num_experts_per_tok=2)
MOE_CONFIGS = {
    "qwen3_moe": lambda: tf.Qwen3MoeConfig(**MOE, num_key_value_heads=2, head_dim=16, intermediate_size=128, moe_intermediate_size=96,
                                           num_experts=4, decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": lambda: tf.MixtralConfig(**MOE, num_key_value_heads=2, intermediate_size=96, num_local_experts=4),
    "deepseek_v3": lambda: tf.DeepseekV3Config(**MOE, num_key_value_heads=4, intermediate_size=128, moe_intermediate_size=96,
                                               n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                                               kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**MOE, num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=96, num_experts=4,
                                           shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "gpt_oss": lambda: tf.GptOssConfig(**MOE, num_key_value_heads=2, head_dim=16, intermediate_size=96, num_local_experts=4,
                                       sliding_window=16),
}


def make_moe(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = MOE_CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(config, k, v)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # gpt-oss starts its expert biases at zero: values, so that a bias read from the wrong place shows
        for name, p in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                p.normal_(0, 0.05)
    return model.eval()
