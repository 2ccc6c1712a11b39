"""`loratune export`: merge into the dequantized base, save, verify, reload with plain transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratune.export.merge import ExportError, export
from run_folder import make_adapter_dir


@pytest.fixture(scope="module")
def q4_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter_dir(tiny_llama, tmp_path_factory.mktemp("exp") / "q4run", bits=4, seed=5, scale=0.2)


@pytest.fixture(scope="module")
def exported(q4_adapter: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("exported")
    report = export(q4_adapter, root / "merged", dtype="bf16", quantize_4bit=root / "merged-nf4", shard_size="100KB")
    return report, root / "merged", root / "merged-nf4"


def _dequantized_base(q4_adapter: Path):
    """The reference, built independently of the exporter: a fresh 4-bit base, dequantized to fp32."""
    from loratune.config import load_config
    from loratune.model.load import load_base

    cfg = load_config(q4_adapter / "loratune.yaml")
    return load_base(cfg).dequantize(dtype=torch.float32)


def test_folder_is_a_plain_sharded_checkpoint(exported, q4_adapter: Path) -> None:
    _, out, _ = exported
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "chat_template.jinja").read_text() == (q4_adapter / "chat_template.jinja").read_text()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 1 and gen["pad_token_id"] == 1  # llama3 tiny: <|eot_id|> is eos


def test_merged_weights_equal_dequantized_base_plus_lora_update(exported, q4_adapter: Path) -> None:
    """Recompute W_nf4 + (alpha/r) B A by hand for every adapted module and compare with the saved weights."""
    _, out, _ = exported
    base = _dequantized_base(q4_adapter).state_dict()
    merged = {}
    for shard in out.glob("model-*.safetensors"):
        merged.update(load_file(shard))
    lora = load_file(q4_adapter / "adapter_model.safetensors")
    cfg = json.loads((q4_adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    checked = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        expected = base[name] + scale * (b.float() @ a.float())
        got = merged[name].float()
        assert not torch.equal(got, base[name].to(torch.bfloat16).float())  # the merge changed the weight
        tol = expected.abs().max() * 2 ** -7  # bf16 rounding of the merged weight
        assert (got - expected).abs().max() <= tol, name
        checked += 1
    assert checked == 14  # 7 linear layers x 2 blocks


def test_report_numbers(exported, capsys) -> None:
    report, out, nf4 = exported
    assert report.merge.modules == 14 and report.merge.unchanged == 0
    assert report.merged_vs_adapter.top1 >= 0.9 and report.merged_vs_adapter.max_diff < 0.25
    assert report.reload_max_diff == 0.0
    assert report.adapter_dequant_vs_trained is not None and report.adapter_dequant_vs_trained.top1 >= 0.9
    added = report.quantized["vs_merged"]
    assert 0 < added["max_diff"] and added["mean_diff"] > report.merged_vs_adapter.mean_diff  # NF4 costs more
    saved = json.loads((out / "loratune_export.json").read_text())
    assert saved["merged_vs_adapter"]["top1"] == report.merged_vs_adapter.top1


def test_loads_and_generates_without_loratune(exported, q4_adapter: Path) -> None:
    """A fresh interpreter where `import loratune` fails: plain transformers loads both folders and chats."""
    _, out, nf4 = exported
    code = f"""
import sys, json
sys.modules["loratune"] = None  # prove nothing of loratune is needed
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for folder in ({str(out)!r}, {str(nf4)!r}):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    kinds = sorted({{type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}})
    print(json.dumps({{"new": out.shape[1] - ids["input_ids"].shape[1], "linear": kinds}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["linear"] == ["Linear"] and lines[1]["linear"] == ["Linear", "Linear4bit"]
    assert all(1 <= x["new"] <= 5 for x in lines)


def test_merged_logits_follow_the_adapter(exported, q4_adapter: Path) -> None:
    """Independent check: the reloaded export vs the adapter on an fp32 dequantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = exported
    ref_model = PeftModel.from_pretrained(_dequantized_base(q4_adapter), str(q4_adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base_only = _dequantized_base(q4_adapter).eval()
    ids = torch.tensor([list(range(2, 60))])
    with torch.no_grad():
        ref, got, base = (m(input_ids=ids).logits[0] for m in (ref_model, merged, base_only))
    assert (got - ref).abs().max() < 0.1  # bf16 weights vs fp32 reference
    assert (base - ref).abs().max() > 10 * (got - ref).abs().max()  # the adapter matters far more than rounding
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_sixteen_bit_base_in_fp32_is_exact(tiny_models, tmp_path: Path) -> None:
    adapter = make_adapter_dir(tiny_models["gemma"], tmp_path / "gemma-run", bits=16, family="gemma")
    report = export(adapter, tmp_path / "out", dtype="fp32")
    assert report.merged_vs_adapter.top1 == 1.0 and report.merged_vs_adapter.max_diff < 1e-4
    assert report.adapter_dequant_vs_trained is None and report.reload_max_diff == 0.0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True


def test_a_merge_that_changes_nothing_fails_loudly(tiny_llama: Path, tmp_path: Path) -> None:
    zero = make_adapter_dir(tiny_llama, tmp_path / "zero", scale=0.0)
    with pytest.raises(ExportError, match="update is zero"):
        export(zero, tmp_path / "o1")
    tiny = make_adapter_dir(tiny_llama, tmp_path / "tiny", scale=1e-9)
    with pytest.raises(ExportError, match=r"changed nothing in 14 of 14 modules.*--dtype fp32"):
        export(tiny, tmp_path / "o2", dtype="bf16")


def test_cli_errors_are_one_line(q4_adapter: Path, tmp_path: Path, capsys) -> None:
    from loratune.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(q4_adapter), "--out", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'full'} is not empty; pass --overwrite to write into it"
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "is not an adapter folder" in capsys.readouterr().err
    cases = [
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "o")], f"no such folder: {tmp_path / 'missing'}"),
        ([str(q4_adapter), "--out", str(tmp_path / "full" / "x")], f"{tmp_path / 'full' / 'x'} is a file; --out "
                                                                   "and --quantize-4bit name folders"),
        ([str(q4_adapter), "--out", str(tmp_path / "full" / "x" / "sub")],
         f"cannot create {tmp_path / 'full' / 'x' / 'sub'}: Not a directory"),
        ([str(q4_adapter), "--out", str(tmp_path / "o"), "--quantize-4bit", str(tmp_path / "o")],
         "--quantize-4bit needs a folder of its own, not --out"),
        ([str(tmp_path / "full" / "x"), "--out", str(tmp_path / "o")], f"{tmp_path / 'full' / 'x'} is a file, not an adapter folder"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_exporting_a_full_model_says_there_is_nothing_to_merge(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    from loratune.cli import main

    assert main(["export", str(tiny_llama), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tiny_llama} holds a full model, not an adapter") and "\n" not in err


def test_exported_folders_serve_through_the_engine(exported, q4_adapter: Path) -> None:
    """The merged 16-bit folder and the NF4 folder load as plain models in loratune's own engine."""
    from loratune.infer.engine import Delta
    from loratune.infer.load import load_engine
    from loratune.infer.sampling import SamplingParams

    _, out, nf4 = exported
    msgs = [{"role": "user", "content": "Hi"}]
    for folder, layer in ((out, "Linear"), (nf4, "Linear4bit")):
        eng = load_engine([str(folder)])
        assert type(eng.model.model.layers[0].mlp.up_proj).__name__ == layer
        events = list(eng.chat(msgs, SamplingParams(max_new_tokens=5)))
        assert events[-1].completion_tokens >= 1 and all(isinstance(e, Delta) for e in events[:-1])


def test_fp32_export_answers_exactly_like_the_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    from loratune.infer.engine import Delta
    from loratune.infer.load import load_engine
    from loratune.infer.sampling import SamplingParams

    adapter = make_adapter_dir(tiny_llama, tmp_path / "run", bits=16, seed=9)
    export(adapter, tmp_path / "out", dtype="fp32")
    msgs = [{"role": "user", "content": "Tell me about adapters"}]

    def answer(source: Path) -> list[int]:
        eng = load_engine([str(source)])
        return [e.token_id for e in eng.chat(msgs, SamplingParams(max_new_tokens=16)) if isinstance(e, Delta)]

    assert answer(tmp_path / "out") == answer(adapter)


def test_a_failed_verification_leaves_nothing_behind(q4_adapter: Path, tmp_path: Path, capsys) -> None:
    """Files are written and checked in staging folders; the destinations receive them only if they pass."""
    out, out4 = tmp_path / "merged", tmp_path / "merged-nf4"
    with pytest.raises(ExportError, match=f"agrees with the adapter on only .*nothing was written to {out}"):
        export(q4_adapter, out, dtype="bf16", quantize_4bit=out4, min_agreement=1.01)  # impossible to meet
    assert "exported to" in capsys.readouterr().out  # the report with the numbers is still printed
    assert not any(out.iterdir()) and not any(out4.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_overwrite_replaces_the_previous_export(exported, q4_adapter: Path) -> None:
    _, out, _ = exported
    (out / "stale.txt").write_text("from an earlier export")
    export(q4_adapter, out, dtype="bf16", shard_size="100KB", overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "loratune_export.json").is_file()
