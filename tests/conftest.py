"""Test set-up: Triton runs through its CPU interpreter, so this must precede any triton import."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against ``ref``, computed in float64."""
    ref64 = ref.double()
    denom = ref64.norm()
    assert denom > 0, "reference is zero: the comparison would be meaningless"
    return float((a.double() - ref64).norm() / denom)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly, randomly seeded generator; its seed is printed (pytest shows it on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _torch_backend_default():
    import corda_kernels as ck

    before = ck.get_backend()
    yield
    ck.set_backend(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):  # noqa: ANN001, ANN201
    """A tiny LLaMA and a word-level tokenizer over pydoc's most frequent words, saved as a model directory."""
    from tests.tiny_models import VOCAB, tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    save_word_tokenizer(path, VOCAB)
    tiny_llama(seed=3).save_pretrained(path)
    return path


def save_word_tokenizer(path, size: int) -> None:  # noqa: ANN001
    """A word-level tokenizer of ``size`` ids over pydoc's most frequent words (id 0 unknown), saved in ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from corda_kernels.engine import data

    words: dict[str, int] = {}
    for w in data.pydoc_text().split():
        words[w] = words.get(w, 0) + 1
    vocab = {"[UNK]": 0}
    for w, _ in sorted(words.items(), key=lambda kv: -kv[1])[: size - 1]:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(path)
