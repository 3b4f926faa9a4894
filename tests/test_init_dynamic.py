"""``corda-kernels init --dynamic`` end to end on a tiny LLaMA with an offline word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WORDS = [f"w{i}" for i in range(90)]


def _tiny_model_dir(root: Path, seed: int) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.tiny_models import tiny_llama

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model = tiny_llama(seed, vocab=len(vocab), intermediate=128, max_positions=64)
    path = root / "tiny"
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_init_dynamic_tiny(mode: str, tmp_path: Path, gen: torch.Generator) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from corda_kernels.cli.init import InitOptions, run_init

    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    model_dir = _tiny_model_dir(tmp_path, seed)
    text = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (600,), generator=gen))
    (tmp_path / "text.txt").write_text(text)
    opts = InitOptions(
        model=str(model_dir),
        data=str(tmp_path / "text.txt"),
        mode=mode,
        rank=4,
        alpha=8.0,
        samples=9,
        seq_len=24,
        batch_size=3,
        dynamic=True,
        rounds=3,
        out=str(tmp_path / "out"),
        progress=False,
        verify_tokens=24,
    )
    report = run_init(opts)
    assert report.verify["logits_rel_err"] < 1e-5
    extra = report.extra["corda++"]
    widths = [sum(r["shape"]) for r in extra["layers"]]
    assert abs(extra["used_params"] - extra["budget_params"]) < max(widths)
    assert extra["rounds"] == 3 and {r["candidate"] for r in extra["layers"]} <= {0, 1, 2}
    ranks = {r["name"]: r["rank"] for r in extra["layers"]}
    assert len(set(ranks.values())) > 1  # the allocation is not uniform on random layers
    # the adapter directory loads onto the residual model and reproduces the original logits
    original = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "residual").eval()
    loaded = PeftModel.from_pretrained(residual, tmp_path / "out" / "adapter").eval()
    ids = torch.randint(1, len(WORDS) + 1, (2, 20), generator=gen)
    with torch.no_grad():
        ref = original(ids).logits
        got = loaded(ids).logits
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    cfg = loaded.peft_config["default"]
    for name, r in ranks.items():
        lora = [m for n, m in loaded.named_modules() if n.endswith(name) and hasattr(m, "lora_A")]
        if r == 0:
            assert not lora  # no adapter on rank-0 layers
        else:
            assert lora and lora[0].r["default"] == r
            assert lora[0].scaling["default"] == pytest.approx(8.0 / 4)
    assert set(cfg.target_modules) == {n for n, r in ranks.items() if r > 0}
    # the adapters themselves against a float64 CO-SVD of each layer's chosen candidate covariance:
    # s·‖B_i‖² are the cropped singular values of W·C_fix (B = U·diag(√(S/s)) with unit U)
    from safetensors.torch import load_file

    from corda_kernels.ops.damping import fix_covariance

    stored = torch.load(tmp_path / "out" / "covariance.pt", weights_only=False)["data"]
    lora_w = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    weights = dict(original.named_parameters())
    chosen = {r["name"]: r["candidate"] for r in extra["layers"]}
    checked = 0
    for name, r in ranks.items():
        if r == 0:
            continue
        C = stored["covariances"][name] if chosen[name] < 0 else stored["candidates"][name][chosen[name]]
        row = report.layers[name]
        C_fix = fix_covariance(C[None].float(), torch.tensor([row["damp"]], dtype=torch.float64))[0].double()
        S = torch.linalg.svdvals(weights[f"{name}.weight"].double() @ C_fix)
        ref = S[:r] if mode == "ipm" else S[-r:]
        B = lora_w[f"base_model.model.{name}.lora_B.weight"].double()
        got = row["scaling"] * B.norm(dim=0) ** 2
        assert float(((got - ref).abs() / ref).max()) < 1e-6, name
        checked += 1
    assert checked == sum(1 for r in ranks.values() if r > 0) > 0
