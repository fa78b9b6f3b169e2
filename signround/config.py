"""Quantization configuration: small validated dataclasses that the CLI and the API share.

A `WeightScheme` says how one linear layer's weight is stored (bits, group size, symmetry);
a `QuantConfig` says which scheme applies where and how the rounding is tuned.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from . import budget, mixtures
from .hardware import can_compile
from .quant import formats, fp, kquant
from .quant.integer import num_groups


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""


_PRESET = re.compile(r"^W([2-8])A(16|8)(?:G(-1|\d+))?$", re.IGNORECASE)
# weight-and-activation presets of the float formats (compressed-tensors' and vLLM's names): (weights, activations)
_FP_ACT_PRESETS = {"FP8": ("FP8", "FP8"), "FP8_DYNAMIC": ("FP8", "FP8"), "W8A8-FP8": ("FP8", "FP8"), "MXFP8": ("MXFP8", "MXFP8"),
                   "MXFP4": ("MXFP4", "MXFP4"), "FP8_BLOCK": ("FP8_BLOCK", "FP8_BLOCK"), "NVFP4": ("NVFP4", "NVFP4")}
_K_LIST = ", ".join(f"{t.name} ({t.bits} bit, groups of {t.group_size}, {'sym' if t.sym else 'asym'})" for t in kquant.K_TYPES.values())
# llama.cpp's stand-ins for a K-quant on a row that is no whole number of 256-weight super-blocks
# (llama-quant.cpp; IQ4_NL, its choice for Q2_K/Q3_K, holds no tuned integer codes, so Q4_0 here)
_K_FALLBACK = {"Q2_K": (4, 32, True), "Q3_K": (4, 32, True), "Q4_K": (5, 32, True), "Q5_K": (5, 32, False), "Q6_K": (8, 32, True)}


@dataclass(frozen=True)
class WeightScheme:
    """Weight-only quantization of one layer: `bits` wide codes with one scale (and zero point) per
    `group_size` consecutive input channels (-1: one group per output channel). The number format is
    integer unless `kquant` (llama.cpp's K-quants: the groups' scales, and minimums, quantized per 256
    weights; only llama.cpp's five combinations exist) or `fp` (a floating-point format of `fp.FP_TYPES`:
    FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4, whose bits and groups are the format's). `format` is its handler
    (`quant.formats`), through which everything else quantizes. `act` names the format the layer's input
    is quantized to at run time (`formats.ACTIVATIONS`: INT8, FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4), None for 16-bit inputs."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    kquant: bool = False
    fp: str | None = None
    act: str | None = None

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits!r} is not supported: choose an integer from 2 to 8")
        if not isinstance(self.group_size, int) or not (self.group_size == -1 or self.group_size > 0):
            raise ConfigError(f"group_size={self.group_size!r} is not valid: use -1 (per channel) or a positive divisor of in_features")
        if self.kquant and self.ktype is None:
            raise ConfigError(f"no K-quant has {self.bits} bits, groups of {self.group_size}, {'sym' if self.sym else 'asym'}: use {_K_LIST}")
        if self.fp is not None:
            t = fp.FP_TYPES.get(str(self.fp).upper())
            if t is None or self.kquant:
                raise ConfigError(f"fp={self.fp!r} is not a floating-point format: use one of {', '.join(fp.FP_TYPES)} (without kquant)")
            object.__setattr__(self, "fp", t.name)
            if (self.bits, self.group_size, self.sym) != (t.element.bits, t.group_size, True):
                raise ConfigError(f"{t.name} has {t.element.bits}-bit symmetric elements in groups of {t.group_size}, not bits={self.bits}, "
                                  f"group_size={self.group_size}, sym={self.sym}: use the preset {t.name}A16")
        if self.act is not None:
            act = str(self.act).upper()
            if act not in formats.ACTIVATIONS:
                raise ConfigError(f"act={self.act!r} is not an activation format: use one of {', '.join(formats.ACTIVATIONS)}")
            if self.kquant:
                raise ConfigError(f"{self.name()} is a llama.cpp type, which quantizes its inputs itself: drop act={self.act!r}")
            object.__setattr__(self, "act", act)

    @property
    def kind(self) -> str:
        """The number format's name in `quant.formats.FORMATS`."""
        return "kquant" if self.kquant else "fp" if self.fp else "int"

    @property
    def format(self) -> formats.Format:
        return formats.FORMATS[self.kind]

    @property
    def ktype(self) -> kquant.KType | None:
        """The llama.cpp K-quant type of a `kquant` scheme."""
        if not self.kquant:
            return None
        return next((t for t in kquant.K_TYPES.values() if (t.bits, t.group_size, t.sym) == (self.bits, self.group_size, self.sym)), None)

    @property
    def fptype(self) -> fp.FPType | None:
        return fp.FP_TYPES[self.fp] if self.fp else None

    def to_dict(self) -> dict[str, Any]:
        """Fields for config files; `kquant` and `fp` only when set, so integer schemes serialise as before."""
        d = dataclasses.asdict(self)
        for name in ("kquant", "fp", "act"):
            if not d[name]:
                del d[name]
        return d

    def fallback(self) -> WeightScheme | None:
        """The legacy scheme llama.cpp uses instead of this K-quant where a row is no whole number of super-blocks."""
        return WeightScheme(*_K_FALLBACK[self.ktype.name]) if self.kquant else None

    def legacy_bits_per_weight(self) -> float:
        """What llama.cpp's legacy block of this (fallback) scheme stores per weight: the codes, an fp16 scale and,
        asymmetric, an fp16 minimum (Q4_0 4.5, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5), no packed zero point as GPTQ's."""
        return self.bits + (16 if self.sym else 32) / self.group_size

    def quantize(self, w, offset=None, min_scale=None, max_scale=None):
        """Final codes and scales of an (out, in) weight, in the format's stored form."""
        return self.format.quantize(self, w, offset, min_scale, max_scale)

    def dequantize(self, stored, dtype=torch.float32):
        return self.format.dequantize(stored, dtype)

    def fake_quant_groups(self, wg, offset=None, min_scale=None, max_scale=None):
        """Straight-through quantize-dequantize of grouped weights (out, groups, g): what tuning trains through."""
        return self.format.fake_quant_groups(self, wg, offset, min_scale, max_scale)

    @property
    def clip_max(self) -> float:
        """The largest clipping scale: 1, but 2 for MX scales (the next exponent) and 1.5 for NVFP4's (`FPType.clip_max`)."""
        return self.format.clip_max(self)

    def search_clipping(self, w, importance=None):
        """Per group, the clipping that round-to-nearest does best with (SignRound's starting point)."""
        return self.format.search_clipping(self, w, importance)

    @classmethod
    def preset(cls, name: str) -> WeightScheme:
        """`W4A16` (4 bit, group 128, symmetric) and friends; `W2A16G64` picks the group size; the floating-point
        weight-only formats as compressed-tensors names them (`MXFP4A16`, `NVFP4A16`, `MXFP8A16`, `FP8A16`).
        Integer presets follow auto-round's defaults: symmetric, except 2-bit which is asymmetric."""
        text = name.strip().upper()
        ktype = kquant.K_TYPES.get(text)
        if ktype:
            return cls(ktype.bits, ktype.group_size, ktype.sym, kquant=True)
        fptype = fp.FP_TYPES.get(text.removesuffix("A16")) if text.endswith("A16") else None
        weights, act = _FP_ACT_PRESETS.get(text, (fptype and fptype.name, None))
        if weights:
            t = fp.FP_TYPES[weights]
            return cls(t.element.bits, t.group_size, True, fp=t.name, act=act)
        m = _PRESET.match(name.strip())
        if not m:
            raise ConfigError(f"unknown scheme {name!r}: use W2A16, W3A16, W4A16, W8A16, optionally with G<group> (e.g. W2A16G64), "
                              f"W8A8 or W4A8 (int8 inputs), {', '.join(f'{t}A16' for t in fp.FP_TYPES)}, FP8, FP8_BLOCK, MXFP8, MXFP4, NVFP4, "
                              f"or a llama.cpp K-quant: {', '.join(kquant.K_TYPES)} (mixtures: {', '.join(mixtures.MIXTURES)})")
        bits, act = int(m.group(1)), "INT8" if m.group(2) == "8" else None
        group = int(m.group(3)) if m.group(3) else _default_group(bits, act)
        return cls(bits=bits, group_size=group, sym=bits != 2, act=act)

    def fits(self, in_features: int, pad_groups: bool = True) -> bool:
        """Whether a layer can take this scheme: always when a partial last group is allowed (never a
        partial K-quant super-block, nor an odd number of 4-bit float codes, which pack two a byte)."""
        if self.kquant:
            return in_features % kquant.SUPER_BLOCK == 0
        if self.fp and self.bits == 4 and in_features % 2:
            return False
        return self.group_size == -1 or pad_groups or in_features % self.group_size == 0

    def groups(self, in_features: int) -> int:
        return num_groups(in_features, self.group_size)

    def bits_per_weight(self, in_features: int) -> float:
        """Storage cost per weight, codes and scales (and zero points) as stored."""
        return self.format.bits_per_weight(self, in_features)

    def name(self) -> str:
        if self.kquant:
            return self.ktype.name
        if self.fp:
            return self.fp if self.act == self.fp else f"{self.fp}A16{f'-{self.act}' if self.act else ''}"
        inputs = "A8" if self.act == "INT8" else "A16"
        g = "" if self.group_size == _default_group(self.bits, self.act) else f"G{self.group_size}"
        extra = f"-{self.act}" if self.act not in (None, "INT8") else ""
        return f"W{self.bits}{inputs}{g}{'' if self.sym == (self.bits != 2) else ('-sym' if self.sym else '-asym')}{extra}"


def _default_group(bits: int, act: str | None) -> int:
    """Presets' group size: 128, except per output channel for W8A8 (int8 kernels scale whole rows, as vLLM's)."""
    return -1 if act and bits == 8 else 128


def parse_scheme(spec: str | WeightScheme | dict | None) -> WeightScheme | None:
    """A scheme from a preset name, a dict of fields, or `fp16`/`none` (keep the layer unquantized)."""
    if spec is None or isinstance(spec, WeightScheme):
        return spec
    if isinstance(spec, dict):
        return WeightScheme(**spec)
    text = str(spec).strip()
    if text.lower() in ("fp16", "bf16", "float", "none", "skip"):
        return None
    if "=" in text or "," in text:  # "bits=8,group_size=32,sym=false"
        fields = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in ("bits", "group_size", "sym", "kquant", "fp", "act"):
                raise ConfigError(f"unknown layer setting {key!r} in {text!r}: use bits=, group_size=, sym=, kquant=, fp=, act=")
            fields[key] = (value.strip() if key in ("fp", "act") else value.strip().lower() in ("1", "true", "yes") if key in ("sym", "kquant")
                           else int(value))
        if "fp" in fields:  # a float format's bits and groups are its own: only what is given differs from them
            return dataclasses.replace(WeightScheme.preset(f"{fields.pop('fp')}A16"), **fields)
        return WeightScheme(**fields)
    return WeightScheme.preset(text)


DEFAULT_DATASET = "NeelNanda/pile-10k"


# Tuning recipes: each fills the tuning fields a QuantConfig leaves unset (None). "paper" is the paper's and
# auto-round's default: 200 steps of 8 rows from plain round-to-nearest, the clipping scales projected onto
# [0, 1] after each step. "full" takes the same 200 x 8 from a better start: the clipping scales begin at an
# activation-weighted search, projected only at 2 bits (SmolLM2 W4A16 under bf16 autocast: 21.06 against the
# paper recipe's 21.23; auto-round 21.02). "fast" keeps that start and takes more but smaller steps: 112 x 3
# rows is a fifth of 200 x 8, and signed descent gains more from the number of steps than from their batch
# (docs/methods.md). 112 steps gave a better full-depth perplexity than 128 (21.06 against 21.17).
# adapt_batch (fast only): a block whose rows' gradients agree in sign spends the same rows on 336 single-row steps
# (Gemma-3 W2A16G64: wt2 589.6 against 688.7 with 112 x 3 throughout; auto-round 670.8).
KEEP = ("best", "last", "average")  # which parameters a tuned block keeps: see algorithms/signround.py
# compile="auto": on from this many rows through the tuned blocks (blocks x iters x batch). SmolLM2, 2 CPU cores:
# ~55 s of compile against ~27 ms saved per step of 8 rows, so the full recipe (48000) gains, the fast one (10080) would not
COMPILE_MIN_ROWS = 20000
PROJECT_AUTO_MAX_BITS = 2  # project_clipping="auto": on for layers of at most this many bits (docs/methods.md)
RECIPES = {
    "fast": {"iters": 112, "batch_size": 3, "adapt_batch": True, "clip_search": True, "keep": "best", "tame_outliers": False, "project_clipping": "auto"},
    "full": {"iters": 200, "batch_size": 8, "adapt_batch": False, "clip_search": True, "keep": "best", "tame_outliers": False, "project_clipping": "auto"},
    "paper": {"iters": 200, "batch_size": 8, "adapt_batch": False, "clip_search": False, "keep": "best", "tame_outliers": False, "project_clipping": True},
}
# A mixture of experts' routing layers, where they are linear: AfMoE-style `gate`, `router`, Qwen2/3.5-MoE's
# `shared_expert_gate`. Kept 16-bit unless `quantize_routers`: a wrong route costs more than their few weights save.
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")
# Settings that earlier versions kept in QuantConfig and now belong to RunConfig: a saved config that has them is read without them.
MOVED_TO_RUN = ("device", "amp", "compile", "cache_dtype")


@dataclass
class QuantConfig:
    """What decides the quantized result (serialised into the output's `quantization_config`); how the run
    executes (device, caches, work folder) is a `RunConfig`.

    `layer_overrides` maps a regular expression (searched in the layer's full name) to a scheme, or to
    None to keep matching layers in 16 bit; the last matching pattern wins. `mixture` names one of
    llama.cpp's K-quant mixtures (`mixtures.MIXTURES`, e.g. Q4_K_M): its base type is the scheme and
    its rules pick bigger types per layer; overrides still win. `scheme="Q4_K_M"` sets both.

    Tuning fields left None are the recipe's: they stay None here, so `dataclasses.replace(config,
    recipe="full")` gives the full recipe's values; `resolved()` is the config with them filled in.
    """

    scheme: WeightScheme = field(default_factory=WeightScheme)
    mixture: str | None = None
    method: str = "signround"
    layer_overrides: dict[str, WeightScheme | None] = field(default_factory=dict)
    quantize_lm_head: bool = False
    quantize_routers: bool = False   # mixture-of-experts routing layers (ROUTER) are kept 16-bit unless set
    pad_groups: bool = True          # a partial last group where in_features % group_size != 0 (auto-round does this)
    # calibration and tuning
    recipe: str = "fast"             # fills the tuning fields left None: see RECIPES
    iters: int | None = None
    nsamples: int = 128
    seqlen: int | None = None        # None: 2048, or the model's maximum when that is shorter
    batch_size: int | None = None
    adapt_batch: bool | None = None  # per block: iters x batch_size steps of one row where the rows' gradients agree
    grad_accum: int = 1
    lr: float | None = None          # None: 1 / iters, so the offsets can travel at most ±0.5
    minmax_lr: float | None = None   # None: same as lr
    seed: int = 42
    clip_search: bool | None = None  # start the clipping scales at an activation-weighted search instead of 1.0
    keep: str | None = None          # "best": the step with the lowest batch loss (auto-round); "last": the final step
    tame_outliers: bool | None = None  # weigh down tokens with massive hidden states (attention sinks) in the loss
    project_clipping: bool | str | None = None  # clamp the clipping scales onto [0, 1] after each step (auto-round); "auto": at low bits
    quantized_inputs: bool = True    # tune on the inputs the already-quantized blocks produce
    smooth: float | None = None      # SmoothQuant's alpha for layers with quantized inputs (W8A8 ...); None: no smoothing
    # mixed precision under a bit budget (search.py): each searched layer gets one of `options` so that the
    # average stored bits per weight is at most `target_bits`; `plan` (layer -> scheme, None: 16-bit) is a
    # search's result, given to skip the search; `fuse_groups`: layers runtimes fuse share one scheme (True: q/k/v,
    # gate/up and one block's experts; `signround.run` narrows it to what its output formats' runtimes fuse, e.g.
    # ("experts",) for GGUF alone, where llama.cpp runs q/k/v as three matrices; False: none; or the kinds by name)
    target_bits: float | None = None
    options: tuple[str, ...] | None = None  # None: the integer presets, or the K types with GGUF output (search.default_options)
    plan: dict[str, WeightScheme | None] | None = None
    fuse_groups: bool | tuple[str, ...] = True

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe={self.recipe!r} is not one of {', '.join(RECIPES)}")
        self._resolve_scheme()
        self.layer_overrides = {pattern: parse_scheme(spec) for pattern, spec in dict(self.layer_overrides).items()}
        if self.plan is not None:
            self.plan = {name: parse_scheme(spec) for name, spec in dict(self.plan).items()}
        self._check_budget()
        for pattern in self.layer_overrides:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"layer override pattern {pattern!r} is not a valid regular expression: {e}") from None
        self._check_tuning()

    def _resolve_scheme(self) -> None:
        """A preset name, a dict of fields or a K mixture's name, as the WeightScheme (and mixture) it means."""
        if self.mixture is not None:
            name = mixtures.find_mixture(self.mixture)
            if name is None:
                raise ConfigError(f"unknown mixture {self.mixture!r}: use one of {', '.join(mixtures.MIXTURES)}")
            self.mixture = name
        named = mixtures.find_mixture(self.scheme) if isinstance(self.scheme, str) else None
        if named:
            if self.mixture not in (None, named):
                raise ConfigError(f"scheme {named} and mixture {self.mixture} disagree: give one of them")
            self.mixture = named
            self.scheme = WeightScheme.preset(mixtures.base_type(named))
        if isinstance(self.scheme, str):
            self.scheme = parse_scheme(self.scheme)
            if self.scheme is None:
                raise ConfigError("the default scheme cannot be 16-bit: keep layers unquantized with layer_overrides={REGEX: 'fp16'}")
        elif isinstance(self.scheme, dict):
            self.scheme = WeightScheme(**self.scheme)
        if self.mixture is not None and self.scheme != WeightScheme.preset(mixtures.base_type(self.mixture)):
            raise ConfigError(f"mixture {self.mixture} is built on {mixtures.base_type(self.mixture)}, not {self.scheme.name()}: "
                              f"drop the scheme's bits/group/sym settings, or use --layer overrides on top of the mixture")

    def _check_budget(self) -> None:
        if self.options is not None:
            if isinstance(self.options, str):
                self.options = tuple(o for o in self.options.split(",") if o.strip())
            self.options = tuple(str(o).strip() for o in self.options)
            for option in self.options:
                parse_scheme(option)  # a ConfigError naming the bad one
            if not self.options:
                raise ConfigError("options is empty: list the schemes the bit-budget search may choose from, e.g. W2A16G64,W3A16,W4A16")
        if isinstance(self.fuse_groups, str):
            self.fuse_groups = [k for k in self.fuse_groups.split(",") if k.strip()]
        if not isinstance(self.fuse_groups, bool):
            if not isinstance(self.fuse_groups, (list, tuple)):
                raise ConfigError(f"fuse_groups={self.fuse_groups!r}: use True, False or kinds of {', '.join(budget.FUSED_KINDS)}")
            self.fuse_groups = tuple(str(k).strip() for k in self.fuse_groups)
            unknown = [k for k in self.fuse_groups if k not in budget.FUSED_KINDS]
            if unknown:
                raise ConfigError(f"fuse_groups names {', '.join(map(str, unknown))}: use True, False or kinds of {', '.join(budget.FUSED_KINDS)}")
        if self.target_bits is None:
            return
        if not isinstance(self.target_bits, (int, float)) or not 1 <= self.target_bits <= 16:
            raise ConfigError(f"target_bits={self.target_bits!r} must be an average bits per weight between 1 and 16, e.g. 3.5")
        if self.mixture is not None:
            raise ConfigError(f"target_bits chooses each layer's type itself; mixture {self.mixture} fixes them: give one of the two "
                              f"(with GGUF output the search chooses among K types)")

    def _check_tuning(self) -> None:
        """Range checks of the tuning fields the user set (the recipes' values are valid)."""
        if self.iters is not None and self.iters < 0:
            raise ConfigError(f"iters={self.iters} is out of range: use a value >= 0")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum={self.grad_accum} is out of range: use a value >= 1")
        for name in ("nsamples", "seqlen", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} is out of range: use a positive value")
        for name in ("lr", "minmax_lr"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name}={value} must be positive (or left unset for 1/iters)")
        if self.keep is not None and self.keep not in KEEP:
            raise ConfigError(f"keep={self.keep!r} is not one of {', '.join(KEEP)}")
        for name in ("tame_outliers", "adapt_batch", "clip_search"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if self.smooth is not None and not (isinstance(self.smooth, (int, float)) and 0 <= self.smooth <= 1):
            raise ConfigError(f"smooth={self.smooth!r} must be SmoothQuant's alpha, between 0 and 1 (0.5 is typical), or None")
        if self.smooth is not None and self.method == "rtn":
            raise ConfigError("smooth needs calibration data, which method rtn does not take: use method signround, or drop smooth")
        if self.project_clipping is not None and not isinstance(self.project_clipping, bool) and self.project_clipping != "auto":
            raise ConfigError(f"project_clipping={self.project_clipping!r} must be True, False or 'auto' (on at <= {PROJECT_AUTO_MAX_BITS} bits)")

    def resolved(self) -> QuantConfig:
        """This config with the recipe's values in the tuning fields left unset (itself when none are)."""
        unset = {name: value for name, value in RECIPES[self.recipe].items() if getattr(self, name) is None}
        return dataclasses.replace(self, **unset) if unset else self

    def calibrates_inputs(self) -> bool:
        """Whether some layer may quantize its inputs in a format with a calibrated scale (NVFP4): then even
        round-to-nearest reads calibration data, to set that scale."""
        schemes = [self.scheme, *self.layer_overrides.values(), *(self.plan or {}).values(), *map(parse_scheme, self.options or ())]
        return any(s is not None and s.act and formats.ACTIVATIONS[s.act].calibrated for s in schemes)

    def projects_clipping(self, scheme: WeightScheme) -> bool:
        """Whether a layer of this scheme has its clipping scales projected onto [0, `scheme.clip_max`] after each step."""
        project = self.resolved().project_clipping
        if project == "auto":
            return scheme.bits <= PROJECT_AUTO_MAX_BITS
        return project

    def scheme_for(self, layer_name: str, block: tuple[int, int] | None = None) -> WeightScheme | None:
        """The scheme a layer gets after the mixture and the overrides (None: keep it unquantized).
        `block`: (index, count) of the decoder block holding the layer; None for lm_head."""
        chosen: WeightScheme | None = self.scheme
        if self.mixture:
            chosen = WeightScheme.preset(mixtures.mixture_type(self.mixture, layer_name, block))
        if self.keeps_router(layer_name):
            chosen = None
        if self.plan is not None and layer_name in self.plan:
            chosen = self.plan[layer_name]
        for pattern, scheme in self.layer_overrides.items():
            if re.search(pattern, layer_name):
                chosen = scheme
        return chosen

    def overridden(self, layer_name: str) -> bool:
        """Whether a `layer_overrides` pattern names this layer (its scheme is the user's, fixed)."""
        return any(re.search(p, layer_name) for p in self.layer_overrides)

    def keeps_router(self, layer_name: str) -> bool:
        """Whether this layer is a router kept 16-bit by default (a layer override still decides)."""
        return not self.quantize_routers and ROUTER.search(layer_name) is not None

    def kept_reason(self, layer_name: str) -> str:
        """Why `scheme_for` keeps this layer 16-bit."""
        overridden = self.overridden(layer_name)
        if self.keeps_router(layer_name) and not overridden and layer_name not in (self.plan or {}):
            return "a router: kept 16-bit (quantize_routers quantizes it)"
        return "kept 16-bit by a layer override" if overridden else "kept 16-bit by the bit-budget plan"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scheme"] = self.scheme.to_dict()
        d["layer_overrides"] = {p: None if s is None else s.to_dict() for p, s in self.layer_overrides.items()}
        if self.plan is not None:
            d["plan"] = {n: None if s is None else s.to_dict() for n, s in self.plan.items()}
        d["options"] = list(self.options) if self.options is not None else None
        d["fuse_groups"] = self.fuse_groups if isinstance(self.fuse_groups, bool) else list(self.fuse_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """The config a `to_dict` describes; an unknown key is an error, not dropped: it is a setting this
        version would silently not apply."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(MOVED_TO_RUN))
        if unknown:
            raise ConfigError(f"unknown quantization setting(s) {', '.join(map(repr, unknown))}: "
                              f"remove them, or upgrade signround if a newer version wrote them")
        return cls(**{k: v for k, v in d.items() if k in known})


CACHE_DTYPE_NAMES = ("float32", "bfloat16", "float16")
RESUME_MODES = ("auto", "force", "never")


@dataclass
class RunConfig:
    """How a run executes: where it computes, what it keeps on disk, what it shows. These change the result
    only by float rounding (autocast, cache dtype, compiled kernels), never its settings.

    `work_dir`: keep each finished block there, so that the same call after a crash continues after the last
    finished block (`signround.run` puts it beside the output); `resume`: "auto" continues a matching state and
    refuses a different one (keeping it), "force" continues it anyway, "never" discards it.
    `offload`: keep the cached hidden states in files (in the work folder) instead of in memory.
    `threads`: torch's intra-op threads for the run (None: torch's default)."""

    device: str = "auto"
    amp: str = "auto"                # auto | bf16 | fp16 | off
    compile: bool | str = "auto"     # torch.compile the tuning step; "auto": on long runs where inductor can build
    cache_dtype: str = "bfloat16"    # dtype of the hidden states cached between blocks
    offload: bool = False
    work_dir: str | None = None
    resume: str = "auto"
    progress: bool = True
    threads: int | None = None

    def __post_init__(self):
        if self.cache_dtype not in CACHE_DTYPE_NAMES:
            raise ConfigError(f"cache_dtype={self.cache_dtype!r} is not one of {', '.join(CACHE_DTYPE_NAMES)}")
        if not isinstance(self.compile, bool) and self.compile != "auto":
            raise ConfigError(f"compile={self.compile!r} must be True, False or 'auto' (on from {COMPILE_MIN_ROWS} rows of tuning: blocks x iters x batch)")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ConfigError(f"amp={self.amp!r} is not one of auto, bf16, fp16, off")
        if self.resume not in RESUME_MODES:
            raise ConfigError(f"resume={self.resume!r} is not one of {', '.join(RESUME_MODES)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"threads={self.threads!r} must be a positive integer (or None for torch's default)")

    def compiles(self, config: QuantConfig, device, blocks: int) -> bool:
        """Whether tuning runs its step through torch.compile: its one-off compile (~55 s on 2 CPU cores)
        only pays back over a long run, and needs a compiler for the device."""
        if self.compile == "auto":
            tuning = config.resolved()
            return tuning.iters * blocks * tuning.batch_size >= COMPILE_MIN_ROWS and can_compile(device)
        if self.compile and not can_compile(device):
            raise ConfigError(f"compile=True needs a C++ compiler (CPU) or triton (CUDA) for {device}: install one, or use compile=False")
        return self.compile
