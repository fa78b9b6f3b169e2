import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so a pass or a failure repeats on the next run."""
    import torch

    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """signround's cache (GGUF metadata) in a folder of this test run's own, not the user's."""
    os.environ["SIGNROUND_CACHE"] = str(tmp_path_factory.mktemp("signround-cache"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():  # a user's clone: the rest of the suite runs on data the tests make or ship
        pytest.skip(f"{SHARED} is absent: this test reads the shared data (CI has it beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from signround.models import load_metadata, resolve

    return load_metadata(resolve("smollm2-135m"))[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random LLaMA saved as an ordinary Hugging Face folder, with SmolLM2's real tokenizer."""
    from tiny_models import make

    folder = tmp_path_factory.mktemp("tiny-llama")
    model = make("llama", vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A small GPT-2 style byte-level BPE (as SmolLM2's), trained here so that GGUF round trips stay fast."""
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    text = ["The capital of France is Paris, said the assistant. " * 20, "Quantization keeps the model small and fast. " * 20]
    bpe.train_from_iterator(text, vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
