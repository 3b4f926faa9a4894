"""``corda-kernels init`` end to end on a tiny LLaMA saved as a local model directory."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from corda_kernels.cli import main
from corda_kernels.cli.init import InitOptions, run_init
from corda_kernels.engine import data
from corda_kernels.engine.cache import CacheMismatchError
from corda_kernels.ops.damping import fix_covariance
from tests.conftest import rel_err
from tests.tiny_models import VOCAB


def options(tiny_dir: Path, out: Path, **kw) -> InitOptions:  # noqa: ANN003
    base = dict(model=str(tiny_dir), data="pydoc", samples=6, seq_len=48, rank=4, batch_size=4,
                out=str(out), progress=False, verify_tokens=32)
    base.update(kw)
    return InitOptions(**base)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_init_writes_loadable_peft_adapter(tiny_dir: Path, tmp_path: Path, mode: str) -> None:
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:  # PEFT has nothing to warn about while saving
        warnings.simplefilter("always")
        report = run_init(options(tiny_dir, tmp_path, mode=mode, alpha=8))
    assert not [str(w.message) for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    assert report.verify["logits_rel_err"] < 1e-5
    assert len(report.layers) == 14 and all(v["rank"] == 4 for v in report.layers.values())
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["stages"]) >= {"load", "calibrate", "decompose", "export", "verify"}
    assert saved["peak_rss_mib"] > 0
    covs = torch.load(tmp_path / "covariance.pt", weights_only=False)["data"]["covariances"]
    for name, row in saved["layers"].items():
        assert row["compactness"] == pytest.approx((row["shape"][0] * row["lambda_max"]) ** 0.5 / row["lambda_min"])
        assert ("truncation_bound" in row) == (mode == "kpm")
        # the Lanczos extremes against a float64 eigvalsh of the damped covariance
        C_fix = fix_covariance(covs[name][None], torch.tensor([row["damp"]], dtype=torch.float64))[0]
        ev = torch.linalg.eigvalsh(C_fix.double())
        assert row["lambda_min"] == pytest.approx(float(ev[0]), rel=1e-4)
        assert row["lambda_max"] == pytest.approx(float(ev[-1]), rel=1e-6)

    # the adapters themselves, not only the logits (which W_res + s·B·A = W makes right whatever the
    # triplets): B = U·diag(√(S/s)) with unit U, so s·‖B_i‖² must be the CO-SVD's singular values of
    # a float64 SVD of W·C_fix, and A = diag(√(S/s))·Vᵀ must give back W·C_fix's right vectors
    from safetensors.torch import load_file

    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    weights = dict(original.named_parameters())
    lora = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for name, row in saved["layers"].items():
        C_fix = fix_covariance(covs[name][None], torch.tensor([row["damp"]], dtype=torch.float64))[0].double()
        S = torch.linalg.svdvals(weights[f"{name}.weight"].double() @ C_fix)
        ref = S[:4] if mode == "ipm" else S[-4:]
        B = lora[f"base_model.model.{name}.lora_B.weight"].double()
        A = lora[f"base_model.model.{name}.lora_A.weight"].double()
        got = row["scaling"] * B.norm(dim=0) ** 2
        assert float(((got - ref).abs() / ref).max()) < 1e-6, name
        # A = diag(√(S/s))·V̂ᵀ with V̂ = C_fix⁻¹·v: A·C_fix has rows √(S/s)·vᵢᵀ, the vᵢ orthonormal
        Vt = (A @ C_fix) / (got / row["scaling"]).sqrt()[:, None]
        assert rel_err(Vt @ Vt.T, torch.eye(4, dtype=torch.float64)) < 1e-5, name

    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "residual")
    w0 = original.model.layers[0].mlp.down_proj.weight
    assert rel_err(residual.model.layers[0].mlp.down_proj.weight, w0) > 1e-4  # really the residual
    # the adapter names the residual as its base model, and loads onto it without a word from PEFT
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (tmp_path / "residual").resolve()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = PeftModel.from_pretrained(residual, tmp_path / "adapter")
    assert not [str(w.message) for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert rel_err(adapted(ids).logits, original(ids).logits) < 1e-5
    from peft import AutoPeftModelForCausalLM  # the adapter alone finds its base: the residual

    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(auto(ids).logits, original(ids).logits) < 1e-5


def cached_covariance(out: Path) -> dict:
    return torch.load(out / "covariance.pt", weights_only=False)


def test_init_resumes_from_cached_covariance(tiny_dir: Path, tmp_path: Path) -> None:
    """The covariance cache is keyed by content: the same calibration is reused, another one (other
    tokens, other text under the same path, other weights under the same path) is calibrated anew."""
    text = tmp_path / "text.txt"
    text.write_text(data.pydoc_text()[:60000])
    out = tmp_path / "out"
    run_init(options(tiny_dir, out, data=str(text)))
    first = cached_covariance(out)
    report = run_init(options(tiny_dir, out, data=str(text), mode="kpm"))  # same calibration: reused
    assert cached_covariance(out)["meta"] == first["meta"]
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(cached_covariance(out)["data"]["covariances"][name], first["data"]["covariances"][name])
    assert report.verify["logits_rel_err"] < 1e-5

    def recalibrated(**kw) -> dict:  # noqa: ANN003
        before = cached_covariance(out)
        run_init(options(tiny_dir, out, data=str(text), **kw))
        after = cached_covariance(out)
        assert after["meta"] != before["meta"]
        assert rel_err(after["data"]["covariances"][name], before["data"]["covariances"][name]) > 1e-3
        return after["meta"]

    assert recalibrated(samples=5)["tokens"] != first["meta"]["tokens"]
    text.write_text(data.pydoc_text()[60000:120000])  # new text, same path
    assert recalibrated()["tokens"] != first["meta"]["tokens"]
    changed = tmp_path / "changed-model"
    shutil.copytree(tiny_dir, changed)
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    model.save_pretrained(changed)  # new weights, same path as the run before
    run_init(options(changed, out, data=str(text)))
    before = cached_covariance(out)["meta"]
    model = AutoModelForCausalLM.from_pretrained(changed)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(2.0)
    model.save_pretrained(changed)
    run_init(options(changed, out, data=str(text)))
    assert cached_covariance(out)["meta"]["model_weights"] != before["model_weights"]


def test_cache_mismatch_message_is_whole(tmp_path: Path) -> None:
    """A mismatch names every differing entry in full (long values were cut at 117 characters)."""
    from corda_kernels.engine import cache

    long = "x" * 300
    cache.save_atomic(tmp_path / "c.pt", "covariance", {"model": long + "a", "in": {"l1": 4, "l2": 8}}, {})
    with pytest.raises(CacheMismatchError) as err:
        cache.load_checked(tmp_path / "c.pt", "covariance", {"model": long + "b", "in": {"l1": 4, "l2": 16}})
    message = str(err.value)
    assert long + "a" in message and long + "b" in message
    assert "in['l2']=8, this run has 16" in message and "l1" not in message


def test_init_nf4_residual(tiny_dir: Path, tmp_path: Path) -> None:
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from corda_kernels import nf4_dequantize

    report = run_init(options(tiny_dir, tmp_path, quantize="nf4"))
    tensors = load_file(report.outputs["residual_nf4"])
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "residual")
    name = "model.layers.1.self_attn.o_proj.weight"
    state = bnbf.QuantState.from_dict(
        {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}, device=torch.device("cpu")
    )
    W = dict(residual.named_parameters())[name]
    deq = nf4_dequantize(tensors[name], state)
    assert deq.shape == W.shape
    assert rel_err(deq, W) < 0.15  # 4-bit: a coarse but faithful copy of the residual
    # byte for byte what bitsandbytes makes of the same residual, for every adapted layer
    weights = dict(residual.named_parameters())
    layers = [k[: -len(".weight")] for k in tensors if k.endswith(".weight")]
    assert len(layers) == len(report.layers) > 0
    for layer in layers:
        ref, ref_state = bnbf.quantize_4bit(weights[f"{layer}.weight"].detach(), blocksize=64, quant_type="nf4",
                                            compress_statistics=False)  # fmt: skip
        assert torch.equal(tensors[f"{layer}.weight"], ref), layer
        assert torch.equal(tensors[f"{layer}.weight.absmax"], ref_state.absmax), layer


def test_cli_errors(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["init", "--model", str(tiny_dir), "--targets", "nope_proj", "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and "matched no" in capsys.readouterr().err
    code = main(["init", "--model", str(tmp_path / "missing"), "--out", str(tmp_path), "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["init", "--model", str(tiny_dir), "--rank", "500", "--out", str(tmp_path), "--no-progress",
                 "--samples", "2", "--seq-len", "16"])
    assert code == 2 and "rank 500" in capsys.readouterr().err


def test_bench_init_table_ratios() -> None:
    """The end-to-end table: speed-up against PEFT of the same mode, cost beyond each floor."""
    from corda_kernels.cli.bench import table

    def row(variant: str, mode: str, **stages: float) -> dict:
        return {"variant": variant, "mode": mode, "stages": stages, "peak_rss_mib": 1000.0}

    rows = [
        row("bare-b1", "-", forward=40.0, total=40.0),
        row("bare-batched", "-", forward=32.0, total=32.0),
        row("bare-backbone", "-", forward=25.0, total=25.0),
        row("peft", "ipm", calibrate=100.0, decompose=20.0, init=0.0, total=120.0),
        row("ours", "ipm", calibrate=50.0, decompose=10.0, init=0.0, total=60.0),
        row("ours-backbone", "ipm", calibrate=40.0, decompose=10.0, init=0.0, total=50.0),
    ]
    lines = {line.split(" | ")[1]: line for line in table(rows).splitlines()[2:]}
    assert "| 2.00× | 50% | 88% |" in lines["ours"]  # 120/60; (60-40)/40; (60-32)/32
    assert "| 2.40× | 25% | 100% |" in lines["ours-backbone"]
    assert "| 1.00× | 200% | 200% |" in lines["peft"]


def test_report_is_strict_json(tmp_path: Path) -> None:
    """An estimate without history (``inf``) or a NaN must not reach report.json as ``Infinity``/``NaN``."""
    from corda_kernels.cli.init import Report, write_report

    report = Report(options={})
    report.layers["l0"] = {"sv_change_est": math.inf, "bound": 1e-5, "rows": [1.0, -math.inf, math.nan]}
    text = write_report(report, tmp_path).read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert saved["layers"]["l0"] == {"sv_change_est": None, "bound": 1e-5, "rows": [1.0, None, None]}


@pytest.mark.parametrize("command", ["init", "study", "bench"])
def test_every_subcommand_is_registered(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"corda-kernels {command}" in capsys.readouterr().out


def test_bad_inputs_are_one_line_errors_before_anything_is_written(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Binary data, a broken config.json, rank 0: exit 2, one line naming the argument, no traceback,
    and --out untouched (a previous output stays as it was)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a previous run's output")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_dir, broken)
    (broken / "config.json").write_text("{ not json")
    base = ["init", "--out", str(out), "--no-progress", "--samples", "2", "--seq-len", "16"]
    cases = [
        (["--model", str(tiny_dir), "--data", str(binary)], "--data"),
        (["--model", str(broken)], "--model"),
        (["--model", str(tiny_dir), "--rank", "0"], "--rank"),
        (["--model", str(tiny_dir), "--samples", "100000"], "--data"),
    ]
    for extra, flag in cases:
        code = main(base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("corda-kernels init: error:") and flag in err, (extra, err)
        assert "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="--model"):
        main(base + ["--model", str(broken), "--debug"])


def test_default_targets_are_every_linear_layer(tmp_path: Path) -> None:
    """--targets defaults to PEFT's all-linear: a GPT-2 (Conv1D) model needs no --targets."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        model_dir
    )
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(model_dir)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 200 + 1}" for i in range(3000)))
    report = run_init(InitOptions(model=str(model_dir), data=str(text), samples=6, seq_len=40, rank=4,
                                  out=str(tmp_path / "out"), progress=False, verify_tokens=16))  # fmt: skip
    assert set(report.options["targets"]) == {"c_attn", "c_proj", "c_fc"}
    assert len(report.layers) == 8 and report.verify["logits_rel_err"] < 1e-5


def load_adapted(out: Path):  # noqa: ANN201
    """The adapter of ``out`` on its residual, as a user loads it, and the rank the report claims."""
    from peft import PeftModel

    residual = AutoModelForCausalLM.from_pretrained(out / "residual")
    adapted = PeftModel.from_pretrained(residual, out / "adapter")
    report = json.loads((out / "report.json").read_text())
    return adapted, report["options"]["rank"]


@pytest.mark.parametrize("point", ["load", "calibrate", "decompose", "export", "verify", "publish"])
def test_killed_at_a_stage_boundary_leaves_a_whole_output(tiny_dir: Path, tmp_path: Path, point: str) -> None:
    """A rank-4 rerun SIGKILLed at each stage boundary (and between the two renames of the swap):
    --out is the previous complete rank-8 output or the new rank-4 one, its adapter on its residual
    reproduces the original logits, and the next run finishes."""
    import subprocess
    import sys

    out = tmp_path / "out"
    run_init(options(tiny_dir, out, rank=8))
    args = ["--model", str(tiny_dir), "--data", "pydoc", "--samples", "6", "--seq-len", "48", "--batch-size", "4",
            "--out", str(out), "--no-progress"]  # fmt: skip
    env = dict(os.environ, CORDA_KERNELS_FAULT=point)
    proc = subprocess.run([sys.executable, "-m", "corda_kernels", "init", "--rank", "4", *args], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ids = torch.randint(0, VOCAB, (2, 20))
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    from corda_kernels.cli.init import recover

    for expect in ((8,) if point != "publish" else (4, 8), (4,)):  # what the kill left, then after a rerun
        recover(out)  # what the next run does first
        adapted, rank = load_adapted(out)
        assert adapted.peft_config["default"].r == rank and rank in expect, (rank, expect)
        with torch.no_grad():
            assert rel_err(adapted(ids).logits, original(ids).logits) < 1e-5
        run_init(options(tiny_dir, out, rank=4))


def test_second_run_on_the_same_out_refuses(tiny_dir: Path, tmp_path: Path) -> None:
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds it
        with pytest.raises(ValueError, match="another corda-kernels init is writing"):
            run_init(options(tiny_dir, out))
    assert not out.exists()
    run_init(options(tiny_dir, out))  # released: runs


def test_rank_zero_on_an_existing_output_leaves_it_intact(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_init(options(tiny_dir, out, rank=8))
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["init", "--model", str(tiny_dir), "--rank", "0", "--out", str(out), "--no-progress"]) == 2
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    adapted, rank = load_adapted(out)
    assert rank == 8


def test_load_output_checks_what_the_report_describes(tiny_dir: Path, tmp_path: Path) -> None:
    """report.json records every output file's hash; load_output refuses a directory that no longer
    matches it (another run's residual copied in, a file added or removed) and loads a matching one."""
    from corda_kernels import load_output

    out, other = tmp_path / "out", tmp_path / "other"
    run_init(options(tiny_dir, out, rank=8))
    run_init(options(tiny_dir, other, rank=4))
    ids = torch.randint(0, VOCAB, (2, 20))
    original = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        assert rel_err(load_output(out)(ids).logits, original(ids).logits) < 1e-5
    shutil.copy2(other / "residual" / "model.safetensors", out / "residual" / "model.safetensors")
    with pytest.raises(ValueError, match="residual/model.safetensors differ"):
        load_output(out)
    (out / "adapter" / "extra.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="adapter/extra.bin"):
        load_output(out)
