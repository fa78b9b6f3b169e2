"""llama.cpp's GGUF file (`OUT/model.gguf`) for LLaMA, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 and
Phi-3 models, with the tuned codes written into the block types that hold them exactly:

    4-bit sym  -> Q4_0  (q - 8) * d          4-bit asym -> Q4_1  q * d + m   (m = -zero * scale, in fp16)
    5-bit sym  -> Q5_0  (q - 16) * d         5-bit asym -> Q5_1  q * d + m
    8-bit sym  -> Q8_0  q * d  (q = code - 128)
    the K-quant schemes Q2_K .. Q6_K -> the K types of the same name (layouts in `gguf_blocks`)

Gemma's norm weights are written as 1 + w, as llama.cpp's converter does, with its sliding-window
layout, rotary bases and logit softcapping; the tokenizer goes in as `gguf_vocab` writes it.

Every legacy block is 32 weights along the input dimension with its own fp16 scale, so only group-32
integer schemes fit; K-quant schemes were tuned with their scales already quantized as the K types
store them. For the llama architecture, query and key rows are reordered as llama.cpp's converter does
(its rotary layout); rows carry their groups along, so the codes move unchanged. Stacked experts are
written as llama.cpp's `ffn_{gate,up,down}_exps` tensors, expert by expert, all in one block type. Embeddings and the untied output layer are written
in F16, norms in F32, and the tokenizer (vocabulary, merges, special tokens, chat template) is carried
over so that llama.cpp and transformers' GGUF loader rebuild it.

Rotary scaling is written as llama.cpp's llama architecture reads it: `linear` as rope.scaling.type and
rope.scaling.factor (positions divided by the factor), Llama 3's `llama3` as the `rope_freqs` tensor (one
divisor per rotary pair, base inverse frequency / scaled one). Any other rope type is refused before
tuning. transformers' GGUF loader reads neither for llama: a scaled model loaded through it gets plain
rotary embeddings (llama.cpp itself applies both).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..blocks import find_blocks
from . import Format, quantized_layers, register_format
from .gguf_blocks import encode_k_blocks, encode_mxfp4_blocks
from .gguf_vocab import add_tokenizer

FILE_NAME = "model.gguf"
# model_type -> (llama.cpp's architecture, whether its converter reorders q/k rows for its rotary layout)
_ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "mixtral": ("LLAMA", True), "qwen2": ("QWEN2", False), "qwen3": ("QWEN3", False),
                  "qwen3_moe": ("QWEN3MOE", False), "gemma2": ("GEMMA2", False), "gemma3_text": ("GEMMA3", False),
                  "phi3": ("PHI3", False)}  # Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are
# llama.cpp scales Gemma's attention by 1/sqrt(head_dim), except for the layer count of its 27B models, where it is
# 1/sqrt(hidden / heads): the model's query_pre_attn_scalar must be that number
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
_GEMMA_ELSEWHERE = "export with --format signround, gptq or auto_round"  # what a Gemma llama.cpp would run otherwise can take


def _types():
    from gguf import GGMLQuantizationType as T

    return {(4, True): T.Q4_0, (4, False): T.Q4_1, (5, True): T.Q5_0, (5, False): T.Q5_1, (8, True): T.Q8_0}


def ggml_type(scheme):
    """The GGML tensor type that holds a layer of this scheme."""
    from gguf import GGMLQuantizationType

    if scheme.fp:
        return GGMLQuantizationType[scheme.fp]
    return GGMLQuantizationType[scheme.ktype.name] if scheme.kquant else _types()[(scheme.bits, scheme.sym)]


def _file_type(kind):
    """The `general.file_type` llama.cpp reports for a model mostly of this tensor type."""
    import gguf

    f, t = gguf.LlamaFileType, gguf.GGMLQuantizationType
    return {t.Q4_0: f.MOSTLY_Q4_0, t.Q4_1: f.MOSTLY_Q4_1, t.Q5_0: f.MOSTLY_Q5_0, t.Q5_1: f.MOSTLY_Q5_1, t.Q8_0: f.MOSTLY_Q8_0,
            t.MXFP4: f.MOSTLY_MXFP4_MOE, t.Q2_K: f.MOSTLY_Q2_K, t.Q3_K: f.MOSTLY_Q3_K_S, t.Q4_K: f.MOSTLY_Q4_K_S, t.Q5_K: f.MOSTLY_Q5_K_S,
            t.Q6_K: f.MOSTLY_Q6_K}[kind]


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def encode_blocks(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> np.ndarray:
    """(out, in) codes with (out, in/32) fp16 scales and zero points -> (out, in/32 * block bytes) uint8,
    laid out as ggml's block_q4_0 / q4_1 / q5_0 / q5_1 / q8_0."""
    out_features, in_features = codes.shape
    q = codes.to(torch.int32).reshape(out_features, in_features // 32, 32)
    parts = [_f16_bytes(scale)]
    if not sym:
        parts.append(_f16_bytes(-(zero.float() * scale.float())))
    if bits == 8:
        parts.append((q - 128).to(torch.int8).numpy().view(np.uint8))
    else:
        low = q & 0xF
        if bits == 5:
            high = (q >> 4) & 1
            qh = (high << torch.arange(32, dtype=torch.int32)).sum(-1, dtype=torch.int64).to(torch.int32)
            parts.append(qh.unsqueeze(-1).numpy().view(np.uint8).reshape(out_features, in_features // 32, 4))
        parts.append((low[..., :16] | (low[..., 16:] << 4)).to(torch.uint8).numpy())
    return np.concatenate(parts, axis=-1).reshape(out_features, -1)


def llama_row_order(rows: int, heads: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to q_proj/k_proj (per head: interleave the
    two rotary halves). Row i of the GGUF tensor is row order[i] of the Hugging Face one."""
    idx = torch.arange(rows).reshape(heads, 2, rows // heads // 2)
    return idx.transpose(1, 2).reshape(rows)


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_FORMATS_KEEPING_ROPE = "--format signround, gptq, auto_round, awq or compressed-tensors, whose config.json keeps it"


def rope_parameters(cfg) -> dict:
    """The model's rotary settings as one dict with `rope_type` ("default" when unscaled) and `rope_theta`:
    transformers 5's `config.rope_parameters`, or the older `config.rope_scaling` beside `config.rope_theta`."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params["rope_theta"] = float(getattr(cfg, "rope_theta", None) or params.get("rope_theta") or 10000.0)
    return params


def rope_refusal(cfg) -> str | None:
    """Why the model's rotary scaling has no exact form in the GGUF this module writes, or None."""
    field = "rope_parameters" if getattr(cfg, "rope_parameters", None) else "rope_scaling"
    params = rope_parameters(cfg)
    if any(isinstance(v, dict) for v in params.values()):
        return f"its {field} differ per layer type, which llama.cpp's llama architecture has no place for; export with {_FORMATS_KEEPING_ROPE}"
    kind = params["rope_type"]
    needs = {"default": (), "linear": ("factor",), "llama3": _LLAMA3_KEYS}.get(kind)
    if needs is None:
        return (f"its {field} rope_type {kind!r} cannot be written to GGUF by signround (it writes default, linear and llama3 rotary "
                f"scaling, as llama.cpp's llama architecture reads them); export with {_FORMATS_KEEPING_ROPE}")
    missing = [k for k in needs if params.get(k) is None]
    if missing:
        return f"its {field} rope_type {kind!r} lacks {', '.join(missing)}; complete the config, or export with {_FORMATS_KEEPING_ROPE}"
    return None


def llama3_rope_factors(params: dict, dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 scaling: per rotary pair, the divisor that turns the plain
    inverse frequency theta^(-2i/dim) into the scaled one (1 above the high-frequency wavelength, `factor`
    below the low-frequency one, a smooth blend between)."""
    factor, low, high, old_len = (float(params[k]) for k in _LLAMA3_KEYS)
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    divisors = []
    for f in inv_freq.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            divisors.append(1.0)
        elif wavelen > old_len / low:
            divisors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


@register_format
class GGUFFormat(Format):
    name = "gguf"
    fits = ("group-32 schemes of 4 bit (Q4_0 sym, Q4_1 asym), 5 bit (Q5_0, Q5_1) or 8 bit sym (Q8_0), and the K-quant schemes "
            "Q2_K .. Q6_K, and MXFP4A16, on LLaMA, Mistral, Mixtral, Qwen2, Qwen3, Qwen3-MoE, Gemma 2, Gemma 3 and Phi-3 models")
    kinds = ("int", "kquant", "fp")
    holds_experts = True  # as llama.cpp's stacked ffn_*_exps tensors, for the MoE architectures it names
    one_scheme_per_stack = True
    fuses = ("experts",)  # llama.cpp runs q/k/v and gate/up as separate matrices (its K mixtures give v its own type)

    def refusal(self, scheme, in_features):
        if scheme.fp:
            if scheme.fp != "MXFP4":
                return "llama.cpp's float block type that signround writes is MXFP4 (E2M1 codes, one E8M0 scale per 32)"
            return None if in_features % 32 == 0 else f"the layer's width {in_features} is not a multiple of 32"
        if scheme.kquant:
            return None if scheme.fits(in_features) else f"the layer's width {in_features} is no whole number of 256-weight super-blocks"
        if scheme.group_size != 32:
            return f"its legacy quant blocks hold 32 weights each, not groups of {scheme.group_size}"
        if (scheme.bits, scheme.sym) not in _types():
            return f"no GGUF block type holds {scheme.bits}-bit {'symmetric' if scheme.sym else 'asymmetric'} codes"
        if in_features % 32:
            return f"the layer's width {in_features} is not a multiple of 32"
        return None

    def model_refusal(self, model) -> str | None:
        if model.config.model_type not in _ARCHITECTURES:
            return f"the GGUF export writes {', '.join(_ARCHITECTURES)} models, not {model.config.model_type!r}"
        if model.config.model_type == "qwen3_moe" and (model.config.mlp_only_layers or model.config.decoder_sparse_step != 1):
            return ("llama.cpp's qwen3moe has experts in every block, and this model has dense ones (mlp_only_layers, decoder_sparse_step); "
                    "export with --format signround, auto_round or gptq")
        if model.config.model_type == "qwen3_moe" and not model.config.norm_topk_prob:
            return ("llama.cpp's qwen3moe renormalises the chosen experts' routing weights, which this model does not (norm_topk_prob "
                    "false); export with --format signround, auto_round or gptq")
        if model.config.model_type in _GEMMA_27B_LAYERS:
            return gemma_refusal(model.config)
        if _ARCHITECTURES[model.config.model_type][0] != "LLAMA" and rope_parameters(model.config)["rope_type"] != "default":
            return f"signround writes rotary scaling for llama.cpp's llama architecture only; export with {_FORMATS_KEEPING_ROPE}"
        return rope_refusal(model.config)

    def write(self, model, tokenizer, folder):
        import gguf

        if tokenizer is None:
            raise ValueError("the GGUF export needs the tokenizer: llama.cpp reads it from the file")
        cfg = model.config
        blocks_name, blocks = find_blocks(model)
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        arch, reordered = _ARCHITECTURES[cfg.model_type]
        writer = gguf.GGUFWriter(folder / FILE_NAME, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])
        writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(len(blocks))
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        rotary = rope_parameters(cfg).get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None) or 1.0
        writer.add_rope_dimension_count(int(head_dim * rotary))  # Phi-3 and others may rotate part of each head
        if head_dim != cfg.hidden_size // heads or arch != "LLAMA":
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)  # Qwen3-MoE's or Mixtral's name
        if experts:
            writer.add_expert_count(experts)
            writer.add_expert_used_count(cfg.num_experts_per_tok)
            writer.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)
        rope, sliding_rope = _rope_by_layer_type(cfg)
        writer.add_rope_freq_base(rope["rope_theta"])
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        if arch.startswith("GEMMA"):
            _add_gemma(writer, cfg, sliding_rope)
        if arch == "PHI3":  # llama.cpp's converter always writes the window (0: none), which older llama.cpp requires
            writer.add_sliding_window(cfg.sliding_window or 0)
            if getattr(cfg, "original_max_position_embeddings", None):
                writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        layers = quantized_layers(model)
        kinds = [ggml_type(m.scheme) for m in layers.values()]
        mixture = (getattr(model.config, "quantization_config", None) or {}).get("mixture")
        writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{mixture}"] if mixture else _file_type(max(set(kinds), key=kinds.count)))
        add_tokenizer(writer, tokenizer, cfg.vocab_size)

        if rope["rope_type"] == "llama3":
            writer.add_tensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", llama3_rope_factors(rope, head_dim))
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], len(blocks))
        for hf_name, tensor in _tensors(model, layers):
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise ValueError(f"no GGUF tensor name for {hf_name} in llama.cpp's {arch.lower()} architecture")
            heads_here = (heads if gguf_name.endswith("attn_q") else kv_heads if gguf_name.endswith("attn_k") else None) if reordered else None
            if isinstance(tensor, list):  # one projection of stacked experts: each expert's layer, or its 16-bit matrix
                packed = [layer for layer in tensor if not isinstance(layer, torch.Tensor)]  # all or none, of one scheme: export() refused the rest
                if packed:
                    writer.add_tensor(f"{gguf_name}.weight", np.stack([_encode(layer, None) for layer in packed]), raw_dtype=ggml_type(packed[0].scheme))
                else:
                    writer.add_tensor(f"{gguf_name}.weight", torch.stack([t.detach() for t in tensor]).float().numpy().astype(np.float16))
                continue
            if base in layers and suffix == "weight":
                layer = layers[base]
                writer.add_tensor(f"{gguf_name}.weight", _encode(layer, heads_here), raw_dtype=ggml_type(layer.scheme))
                continue
            if heads_here:  # a 16-bit q/k weight, or a packed one's bias
                tensor = tensor[llama_row_order(tensor.shape[0], heads_here)]
            # vectors and the router in F32, as llama.cpp's converter keeps them (an F16 router can flip close expert choices)
            dtype = np.float32 if tensor.dim() == 1 or gguf_name.endswith("ffn_gate_inp") else np.float16
            if arch.startswith("GEMMA") and hf_name.endswith("norm.weight"):  # Gemma scales by 1 + w; llama.cpp stores 1 + w
                tensor = tensor.float() + 1
            writer.add_tensor(f"{gguf_name}.{suffix}", tensor.detach().float().numpy().astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _encode(layer, heads: int | None) -> np.ndarray:
    """A packed layer's GGUF blocks, its rows in llama.cpp's rotary order where `heads` is given."""
    qw = layer.quantized_weight()
    if heads:  # rows carry their groups and super-blocks along
        order = llama_row_order(layer.out_features, heads)
        qw = qw._replace(**{k: v[order] for k, v in qw._asdict().items() if isinstance(v, torch.Tensor)})
    if layer.scheme.fp:
        return encode_mxfp4_blocks(qw.codes, qw.scale)
    if layer.scheme.kquant:
        return encode_k_blocks(qw)
    return encode_blocks(qw.codes, qw.scale, qw.zero, layer.scheme.bits, layer.scheme.sym)


def _tensors(model, layers):
    """Every tensor to write, by Hugging Face name: packed layers once (by layer name, a None tensor), tied weights
    once, and stacked experts per projection (`mlp.experts.gate_proj.weight`) as the list of their experts' layers
    (packed, or 16-bit matrices)."""
    from ..experts import QuantExperts, expert_matrices_of, is_experts, read

    stacks = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantExperts):
            for part in ("gate", "up", "down") if m.layout.has_gate else ("up", "down"):
                held = [getattr(m.expert(e), f"{part}_proj") for e in range(m.experts)]
                stacks[f"{name}.{part}_proj.weight"] = [x.weight if isinstance(x, torch.nn.Linear) else x for x in held]
        elif is_experts(m):
            for entry in expert_matrices_of(m, name):
                stacks.setdefault(f"{name}.{entry.part}_proj.weight", []).append(read(m, entry))
    owners = tuple(name.rsplit(".", 2)[0] + "." for name in stacks)
    seen = set()
    for name, tensor in model.state_dict().items():
        base = name.rpartition(".")[0]
        if owners and name.startswith(owners):
            continue
        if base in layers:
            if base not in seen and name.endswith(".qweight"):
                seen.add(base)
                yield f"{base}.weight", None
            elif name.endswith(".bias"):
                yield name, tensor
            continue
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        yield name, tensor
    yield from stacks.items()


def gemma_refusal(cfg) -> str | None:
    """Why a Gemma 2 / 3 model does not run in llama.cpp as in transformers, or None."""
    heads, layers = cfg.num_attention_heads, cfg.num_hidden_layers
    scale = cfg.hidden_size // heads if layers == _GEMMA_27B_LAYERS[cfg.model_type] else cfg.head_dim
    if cfg.query_pre_attn_scalar != scale:
        return (f"llama.cpp scales attention by 1/sqrt({scale}) for a {layers}-block Gemma, and this model's query_pre_attn_scalar is "
                f"{cfg.query_pre_attn_scalar}; {_GEMMA_ELSEWHERE}")
    if cfg.model_type == "gemma2" and not (cfg.attn_logit_softcapping and cfg.final_logit_softcapping):
        return f"llama.cpp's gemma2 always softcaps the logits, and this model does not; {_GEMMA_ELSEWHERE}"
    if cfg.model_type == "gemma3_text" and cfg.attn_logit_softcapping:
        return f"llama.cpp's gemma3 has no attention-logit softcapping; {_GEMMA_ELSEWHERE}"
    rope, sliding = _rope_by_layer_type(cfg)
    if rope["rope_type"] not in ("default", "linear") or (sliding or {}).get("rope_type", "default") != "default":
        return (f"llama.cpp's {cfg.model_type.removesuffix('_text')} takes linear rotary scaling on its global layers only, not "
                f"{rope['rope_type']!r} / {(sliding or {}).get('rope_type')!r}; export with {_FORMATS_KEEPING_ROPE}")
    return None


def _rope_by_layer_type(cfg) -> tuple[dict, dict | None]:
    """(the global layers' rotary settings, the sliding-window layers' where they differ, as Gemma 3's do)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params.get("full_attention"), dict):
        full, sliding = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
        full.setdefault("rope_type", "default")
        return full, sliding
    return rope_parameters(cfg), None


def _add_gemma(writer, cfg, sliding_rope: dict | None) -> None:
    """Gemma's sliding-window layout (which layers see only the window), the sliding layers' rotary base and the softcapping."""
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in cfg.layer_types])
    if sliding_rope:
        writer.add_rope_freq_base_swa(float(sliding_rope["rope_theta"]))
    if cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if cfg.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
