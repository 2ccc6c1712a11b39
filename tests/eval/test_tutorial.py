"""The tutorial workflow on CPU: fine-tune the demo model on a small summarisation set, then compare the base
and the tuned adapter with ROUGE and BLEU through `loratune eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

DOCS = [
    ("The council met on Monday and approved a new budget for the city's parks, adding money for trees and benches.",
     "Council approves bigger parks budget."),
    ("Heavy rain flooded several streets downtown overnight; no injuries were reported and roads reopened by noon.",
     "Overnight rain floods streets, no injuries."),
    ("The local team won the final 3-1 after two late goals, lifting the trophy for the first time in ten years.",
     "Local team wins first trophy in ten years."),
    ("A new library opened in the north district with a reading room, a cafe and free classes for children.",
     "New library opens in north district."),
    ("Scientists found that the lake's water is cleaner this year, thanks to new rules on farm runoff.",
     "Lake water cleaner after runoff rules."),
    ("The bakery on Main Street will close next month after forty years, its owners said on Friday.",
     "Main Street bakery to close after forty years."),
]


@pytest.mark.slow
def test_train_then_compare_base_and_tuned_with_rouge(tmp_path: Path) -> None:
    from loratune.config import load_config
    from loratune.eval.config import load_eval_config
    from loratune.eval.run import run_eval
    from loratune.train.run import train

    data = tmp_path / "news.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Summarise in one line: " + d, "output": s}) + "\n"
                            for d, s in DOCS))
    (tmp_path / "train.yaml").write_text(f"""
model: {{path: demo://llama-test}}
quantization: {{bits: 16}}
adapter: {{rank: 8, alpha: 16, dropout: 0.0}}
data: {{datasets: [{{path: '{data}'}}], max_length: 128}}
train: {{max_steps: 60, batch_size: 3, grad_accum: 1, lr: 5.0e-3, warmup_ratio: 0.0, max_grad_norm: 1.0,
         save_every: 0, plot: false}}
output: {{dir: '{tmp_path / "run"}'}}
""")
    train(load_config(tmp_path / "train.yaml"))
    (tmp_path / "eval.yaml").write_text(f"""
models: [{{name: base, path: 'demo://llama-test'}}, {{name: tuned, path: '{tmp_path / "run"}'}}]
generate: [{{name: news, path: '{data}', metrics: [rouge, bleu], max_new_tokens: 24}}]
output: {{dir: '{tmp_path / "eval"}', plots: false}}
""")
    rep = run_eval(load_eval_config(tmp_path / "eval.yaml"))
    news = rep["generate"]["news"]
    base, tuned = (news["models"][m]["metrics"] for m in ("base", "tuned"))
    assert base["rougeL"]["value"] < 10 < 50 < tuned["rougeL"]["value"]  # random base; the tuned one learnt the set
    assert news["differences"]["tuned"]["rougeL"]["ci"][0] > 0  # the gain's interval excludes zero
    assert tuned["bleu"]["value"] > base["bleu"]["value"]
    assert news["examples"]["tuned"]["gains"] and "| ROUGE-L |" in (tmp_path / "eval" / "report.md").read_text()
