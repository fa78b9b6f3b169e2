"""signround: SignRound weight quantization for Hugging Face causal language models.

    import signround
    report = signround.run("smollm2-135m", "out", signround.QuantConfig(scheme="W4A16"))  # open, tune, save
    model = signround.load("out")

In memory, for a model you already hold:

    report = signround.quantize(model, signround.QuantConfig(scheme="W4A16"), tokenizer=tokenizer)
    signround.save(model, "out", tokenizer)
"""

__version__ = "0.1.0"

from .checkpoint import load, save
from .config import ConfigError, QuantConfig, RunConfig, WeightScheme
from .models import load as load_model
from .pipeline import QuantizeReport, quantize
from .runner import run

__all__ = ["ConfigError", "QuantConfig", "QuantizeReport", "RunConfig", "WeightScheme", "load", "load_model", "quantize", "run", "save",
           "__version__"]
