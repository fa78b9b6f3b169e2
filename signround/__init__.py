"""signround: SignRound weight quantization for Hugging Face causal language models.

    import signround
    model, tokenizer = signround.load_model("smollm2-135m")
    report = signround.quantize(model, signround.QuantConfig(scheme="W4A16"), tokenizer=tokenizer)
    signround.save(model, "out", tokenizer)
    model = signround.load("out")
"""

__version__ = "0.1.0"

from .checkpoint import load, save
from .config import ConfigError, QuantConfig, WeightScheme
from .models import load as load_model
from .pipeline import QuantizeReport, quantize

__all__ = ["ConfigError", "QuantConfig", "QuantizeReport", "WeightScheme", "load", "load_model", "quantize", "save", "__version__"]
