"""Sparse upcycling: a mixture-of-experts model made from a dense LLaMA-style one, to measure MoE
quantization on real weights (random tiny MoE models prove plumbing, not quality).

Every MLP becomes `experts` copies of itself, each weight scaled by (1 + noise * N(0, 1)) so that the
experts differ, behind a random router whose top-k weights are renormalised to sum to one: the MoE computes
nearly what the dense model computes. Mixtral's classes hold it exactly otherwise (the same attention, no
biases); Qwen3-MoE's normalise q and k per head, which a LLaMA does not, so they cannot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError


def upcycle(model, experts: int = 8, top_k: int = 2, noise: float = 0.01, seed: int = 0):
    """A `MixtralForCausalLM` whose every block routes to `experts` perturbed copies of `model`'s MLP."""
    import transformers as tf

    cfg = model.config
    if cfg.model_type not in ("llama", "mistral") or getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConfigError(f"upcycling takes LLaMA or Mistral models without biases, not {cfg.model_type!r}")
    if not 1 <= top_k <= experts:
        raise ConfigError(f"top_k={top_k} must be between 1 and experts={experts}")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id", "hidden_act")
    moe_config = tf.MixtralConfig(**{k: getattr(cfg, k) for k in keep if getattr(cfg, k, None) is not None},
                                  num_local_experts=experts, num_experts_per_tok=top_k, sliding_window=None)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        moe = tf.MixtralForCausalLM(moe_config)
    generator = torch.Generator().manual_seed(seed)

    def jitter(w: torch.Tensor) -> torch.Tensor:
        return w * (1 + noise * torch.randn((experts, *w.shape), generator=generator, dtype=torch.float32)).to(w.dtype)

    state = {}
    for name, tensor in model.state_dict().items():
        if ".mlp." not in name:
            state[name] = tensor
    for i, block in enumerate(model.model.layers):
        mlp, prefix = block.mlp, f"model.layers.{i}.mlp"
        gate, up, down = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()
        state[f"{prefix}.experts.gate_up_proj"] = torch.cat([jitter(gate), jitter(up)], dim=1)
        state[f"{prefix}.experts.down_proj"] = jitter(down)
        state[f"{prefix}.gate.weight"] = (torch.randn((experts, cfg.hidden_size), generator=generator) / cfg.hidden_size ** 0.5).to(dtype)
    if moe_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    moe.load_state_dict(state, strict=not moe_config.tie_word_embeddings, assign=True)
    if moe_config.tie_word_embeddings:
        moe.tie_weights()
    moe.model.rotary_emb = type(moe.model.rotary_emb)(config=moe_config)  # its buffers were built on the meta device
    return moe.eval()


def upcycle_to(model: str, output, experts: int = 8, top_k: int = 2, noise: float = 0.01, seed: int = 0, overwrite: bool = False):
    """`upcycle` a dense model (a built-in name, folder, .gguf or hub id) and save the MoE as a Hugging Face
    folder with its tokenizer, which `signround quantize` then takes like any other model; returns the folder."""
    from .checkpoint import atomic_folder, check_output_dir
    from .models import load

    check_output_dir(output, overwrite)
    if not 1 <= top_k <= experts:  # before the model is read
        raise ConfigError(f"top_k={top_k} must be between 1 and experts={experts}")
    dense, tokenizer = load(model)
    moe = upcycle(dense, experts, top_k, noise, seed)
    with atomic_folder(output, overwrite) as tmp:  # an interrupted save leaves no folder that looks complete
        moe.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)
