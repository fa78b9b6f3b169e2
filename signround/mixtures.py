"""llama.cpp's K-quant mixtures (`Q4_K_M` and friends): one K type for most layers and bigger ones for
the layers that matter most, chosen by the rules of llama.cpp's quantizer (llama-quant.cpp, for dense
non-Falcon models), so that a model tuned here carries the tensor types a llama.cpp user expects from
the name. Pure rules on (layer name, block index, block count); `QuantConfig.mixture` applies them.
"""

from __future__ import annotations

import re

# The role of a linear layer, from the names transformers gives it across architectures
# (LLaMA/Mistral/Qwen/Gemma, Phi-3, GPT-2, OPT, GPT-NeoX).
_ROLES = {
    "attn_v": re.compile(r"(^|\.)(v_proj|value)$"),
    "attn_qkv": re.compile(r"(^|\.)(qkv_proj|query_key_value|c_attn|Wqkv)$"),
    "attn_output": re.compile(r"(^|\.)(o_proj|out_proj|attention\.dense|attn\.c_proj)$"),
    "ffn_down": re.compile(r"(^|\.)(down_proj|fc2|dense_4h_to_h|mlp\.c_proj)$"),
}


def layer_role(name: str) -> str | None:
    """attn_v, attn_qkv, attn_output, ffn_down, or None for the layers every mixture leaves at its base type."""
    return next((role for role, pattern in _ROLES.items() if pattern.search(name)), None)


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the blocks that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _q3_k_m(role, i, n):
    return {"attn_v": "Q5_K" if i < 2 else "Q4_K", "ffn_down": "Q5_K" if i < n // 16 else "Q4_K",
            "attn_output": "Q4_K", "attn_qkv": "Q4_K"}.get(role)


def _q3_k_l(role, i, n):
    return {"attn_v": "Q5_K", "ffn_down": "Q5_K", "attn_output": "Q5_K", "attn_qkv": "Q4_K"}.get(role)


def _q4_k_s(role, i, n):
    return {"attn_v": "Q5_K" if i < 4 else None, "ffn_down": "Q5_K" if i < n // 8 else None}.get(role)


def _k_m(qkv):
    def rule(role, i, n):
        if role in ("attn_v", "ffn_down"):
            return "Q6_K" if use_more_bits(i, n) else None
        return qkv if role == "attn_qkv" else None
    return rule


def _base_only(role, i, n):
    return None


# name -> (base K type, rule(role, block index, block count) -> a bigger K type or None for the base)
MIXTURES = {
    "Q3_K_S": ("Q3_K", _base_only),
    "Q3_K_M": ("Q3_K", _q3_k_m),
    "Q3_K_L": ("Q3_K", _q3_k_l),
    "Q4_K_S": ("Q4_K", _q4_k_s),
    "Q4_K_M": ("Q4_K", _k_m("Q5_K")),
    "Q5_K_S": ("Q5_K", _base_only),
    "Q5_K_M": ("Q5_K", _k_m("Q6_K")),
}
OUTPUT_TYPE = "Q6_K"  # llama.cpp's type for an (untied, quantized) lm_head under every K mixture


def find_mixture(name: str) -> str | None:
    key = name.strip().upper()
    return key if key in MIXTURES else None


def base_type(mixture: str) -> str:
    return MIXTURES[mixture][0]


def mixture_type(mixture: str, layer_name: str, block: tuple[int, int] | None) -> str:
    """The K type of one layer: `block` is (index, count) for a decoder block's layer, None for lm_head."""
    base, rule = MIXTURES[mixture]
    if block is None:
        return OUTPUT_TYPE
    return rule(layer_role(layer_name), *block) or base
