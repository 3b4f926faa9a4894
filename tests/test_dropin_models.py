"""The drop-in and ``corda-kernels init`` on models beyond a plain causal LM in memory: a LLaVA-style
vision-language model (targets in its language model; the drop-in's ``run_model`` feeding images and
text, init calibrating on text) and a model whose layers accelerate keeps offloaded to disk
(``device_map``)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from corda_kernels.engine.offload import Offload
from corda_kernels.peft import preprocess_corda, target_modules, weights_key
from tests.conftest import rel_err
from tests.test_peft_parity import adapter_values, float64_truth, lora_config
from tests.tiny_models import LLAMA_TARGETS, llama_config, sequences, tiny_llama

IMAGE_TOKEN = 299
LANGUAGE_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def tiny_llava(seed: int) -> LlavaForConditionalGeneration:
    """CLIP vision tower (16×16 images, 8×8 patches: 4 image tokens) and a 64-wide LLaMA."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    text = llama_config(vocab=300)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def image_samples(gen: torch.Generator, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` samples: 4 image tokens then text of random length, with their image."""
    out = []
    for s in sequences(gen, n, lo=8, hi=30):
        ids = torch.cat([torch.full((4,), IMAGE_TOKEN), s]).unsqueeze(0)
        out.append({"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=gen)})
    return out


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_llava_language_model_matches_peft(method: str, gen: torch.Generator) -> None:
    base = tiny_llava(int(torch.randint(0, 1000, (1,), generator=gen)))
    samples = image_samples(gen, 12)
    probe = image_samples(gen, 1)[0]
    with torch.no_grad():
        before = base(**probe).logits

    theirs = copy.deepcopy(base)
    cfg_peft = lora_config(LANGUAGE_TARGETS, method, prune_temporary_fields=False)
    peft_preprocess(theirs, cfg_peft, run_model=lambda: [theirs(**x) for x in samples])
    ours = copy.deepcopy(base)
    cfg = lora_config(LANGUAGE_TARGETS, method, prune_temporary_fields=False)
    preprocess_corda(ours, cfg, run_model=lambda: [ours(**x) for x in samples])

    mods, peft_mods = target_modules(ours, cfg), target_modules(theirs, cfg_peft)
    assert mods and all(".language_model." in name for name in mods)
    assert not any(hasattr(m, "eigens") for n, m in ours.named_modules() if "vision" in n or "projector" in n)
    originals = dict(base.named_modules())
    for name, module in mods.items():
        assert module.sample_count == peft_mods[name].sample_count == len(samples), name
        assert rel_err(module.covariance_matrix, peft_mods[name].covariance_matrix) < 1e-6, name
        r = module.eigens.S_WC.numel()
        _, B_t, _ = float64_truth(originals[name], module.covariance_matrix, method, r, 16 / r)
        got = module.eigens.S_WC.double() / (16 / r)  # S over the scaling: B's column norms squared
        assert float(((got - adapter_values(B_t)).abs() / adapter_values(B_t)).max()) < 1e-6, name
    adapted = get_peft_model(ours, cfg)
    with torch.no_grad():
        assert rel_err(adapted(**probe).logits, before) < 1e-5


@pytest.mark.parametrize(("method", "targets"), [("ipm", "all-linear"), ("kpm", "q_proj,v_proj")])
def test_init_adapts_the_language_model_of_llava(method: str, targets: str, tmp_path, gen: torch.Generator) -> None:  # noqa: ANN001
    """``corda-kernels init`` on a LLaVA directory: only the language model's layers are targets (also
    when a suffix names layers of the vision tower too), its covariances are PEFT's on the same token
    blocks, the adapters are the float64 CO-SVD of them, and the vision tower and projector stay as
    they were."""
    from safetensors.torch import load_file

    from corda_kernels.cli.init import InitOptions, run_init
    from corda_kernels.engine import data
    from corda_kernels.engine.outputs import load_output
    from tests.conftest import save_word_tokenizer

    base = tiny_llava(int(torch.randint(0, 1000, (1,), generator=gen)))
    model_dir = tmp_path / "llava"
    base.save_pretrained(model_dir)
    save_word_tokenizer(model_dir, IMAGE_TOKEN)  # ids below the image token
    opts = InitOptions(
        model=str(model_dir), data="pydoc", mode=method, rank=4, samples=6, seq_len=24, batch_size=4,
        targets=tuple(targets.split(",")), out=str(tmp_path / "out"), progress=False,
    )  # fmt: skip
    report = run_init(opts)

    suffixes = LLAMA_TARGETS if targets == "all-linear" else targets.split(",")
    expected = {n for n, _ in base.named_modules() if ".language_model." in n and n.rsplit(".", 1)[-1] in suffixes}
    assert set(report.layers) == expected and len(expected) == 2 * len(suffixes)
    assert any(n.rsplit(".", 1)[-1] in suffixes for n, _ in base.model.vision_tower.named_modules())

    ids = data.token_blocks(AutoTokenizer.from_pretrained(model_dir), data.load_text("pydoc"), 6, 24)
    theirs = copy.deepcopy(base)
    regex = r".*language_model.*\.(" + "|".join(suffixes) + ")"
    cfg_peft = lora_config(regex, method, prune_temporary_fields=False)
    peft_preprocess(theirs, cfg_peft, run_model=lambda: [theirs(ids[i : i + 1]) for i in range(ids.shape[0])])
    cached = torch.load(tmp_path / "out" / "covariance.pt", weights_only=False)["data"]["covariances"]
    adapter = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    originals = dict(base.named_modules())
    for name, module in target_modules(theirs, cfg_peft).items():
        assert rel_err(cached[name], module.covariance_matrix) < 1e-6, name
        B = adapter[f"base_model.model.{name}.lora_B.weight"]
        _, B_t, _ = float64_truth(originals[name], cached[name], method, 4, 1.0)
        err = (adapter_values(B) - adapter_values(B_t)).abs() / adapter_values(B_t)
        assert float(err.max()) < 1e-6, name
    adapted = load_output(tmp_path / "out")
    residual = adapted.get_base_model().state_dict()
    kept = [key for key in base.state_dict() if "vision_tower" in key or "multi_modal_projector" in key]
    assert kept and all(torch.equal(residual[key], base.state_dict()[key]) for key in kept)
    probe = ids[:1]
    with torch.no_grad():
        assert rel_err(adapted(probe).logits, base(probe).logits) < 1e-5


def test_disk_offloaded_model(gen: torch.Generator, tmp_path) -> None:  # noqa: ANN001
    """Calibrated and decomposed with one decoder layer offloaded to disk: the same weights key, the
    same eigens as in memory, bit for bit; the cache it writes initializes the model in memory (PEFT's
    ``get_peft_model`` cannot write CorDA's residual into offloaded weights)."""
    base = tiny_llama(int(torch.randint(0, 1000, (1,), generator=gen)))
    base.save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert Offload(offloaded).block_of("model.layers.1.mlp.down_proj") is not None
    assert weights_key(offloaded) == weights_key(base)

    seqs = sequences(gen, 10)
    cache_file = tmp_path / "eigens.pt"
    cfg = lora_config(LLAMA_TARGETS, "kpm", cache_file=str(cache_file))
    preprocess_corda(offloaded, cfg, run_model=lambda: [offloaded(s.unsqueeze(0)) for s in seqs])
    in_memory = copy.deepcopy(base)
    cfg_mem = lora_config(LLAMA_TARGETS, "kpm")
    preprocess_corda(in_memory, cfg_mem, run_model=lambda: [in_memory(s.unsqueeze(0)) for s in seqs])
    mem_mods = target_modules(in_memory, cfg_mem)
    for name, module in target_modules(offloaded, cfg).items():
        for a, b in zip(
            (module.eigens.U_WC, module.eigens.S_WC, module.eigens.V_WC),
            (mem_mods[name].eigens.U_WC, mem_mods[name].eigens.S_WC, mem_mods[name].eigens.V_WC),
        ):
            assert a.device.type == "cpu" and torch.equal(a, b), name

    model = copy.deepcopy(base)
    preprocess_corda(model, lora_config(LLAMA_TARGETS, "kpm", cache_file=str(cache_file)))  # from the cache
    adapted = get_peft_model(model, cfg)
    probe = seqs[0].unsqueeze(0)
    with torch.no_grad():
        assert rel_err(adapted(probe).logits, base(probe).logits) < 1e-5
