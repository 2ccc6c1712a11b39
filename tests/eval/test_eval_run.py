"""`loratune eval` end to end on CPU: base vs tuned on every kind of task, the report, and a rerun from the cache."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "infer"))
from fake_openai import FakeJudge  # noqa: E402
from mmlu_files import write_mmlu  # noqa: E402
from run_folder import make_adapter_dir  # noqa: E402

from loratune.eval import run as eval_run  # noqa: E402
from loratune.eval.cli import add_eval  # noqa: E402

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loratune")
    add_eval(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    args.overrides = [*args.overrides, *rest]  # as loratune.cli.parse_args gathers overrides after options
    return args


@pytest.fixture(scope="module")
def setup(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-e2e")
    tuned = make_adapter_dir(tiny_llama, root / "tuned", seed=5)
    other = make_adapter_dir(tiny_llama, root / "other", seed=6)
    write_mmlu(root / "mmlu")
    (root / "test.jsonl").write_text("".join(
        json.dumps({"instruction": f"Summarise: item {i} is small.", "output": f"Item {i} is small."}) + "\n"
        for i in range(4)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Hello?", "Name a fruit."]))
    (root / "held.txt").write_text("A held out paragraph of text.\n\nAnother one, a little longer than the first.\n")
    return {"root": root, "base": tiny_llama, "tuned": tuned, "other": other}


def _config(setup: dict[str, Path], judge_url: str, models: list[tuple[str, Path]]) -> Path:
    root = setup["root"]
    lines = ["models:", *(f"  - {{name: {n}, path: '{p}'}}" for n, p in models), f"""
mc:
  - {{name: mmlu, path: '{root / "mmlu"}', shots: 1}}
generate:
  - {{name: summaries, path: '{root / "test.jsonl"}', metrics: [rouge, bleu, exact_match], max_new_tokens: 8}}
perplexity:
  - {{name: held, path: '{root / "held.txt"}', max_length: 8}}
judge:
  prompts: '{root / "prompts.jsonl"}'
  base_url: '{judge_url}'
  model: fake-judge
  orderings: 200
  answer_max_new_tokens: 6
output: {{dir: '{root / "out"}', examples: 2}}
batch_size: 3
bootstrap: 200
"""]
    path = root / "eval.yaml"
    path.write_text("\n".join(lines))
    return path


def test_base_vs_tuned_report_and_rerun(setup: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    models = [("base", setup["base"]), ("tuned", setup["tuned"])]
    with FakeJudge() as fake:
        config = _config(setup, fake.url, models)
        args = _parse(["eval", str(config), "judge.orderings=100"])
        assert args.overrides == ["judge.orderings=100"]
        assert args.handler(args) == 0
        asked = len(fake.requests)
        assert 0 < asked <= 2 * 2  # 2 prompts x 1 pair x 2 orders, less identical answers
        out = setup["root"] / "out"
        rep = json.loads((out / "report.json").read_text())
        assert [m["name"] for m in rep["models"]] == ["base", "tuned"]
        assert [m["kind"] for m in rep["models"]] == ["model", "adapter"]

        def check(est: dict, n: int) -> None:
            assert est["n"] == n and est["ci"][0] is not None and est["ci"][0] <= est["value"] <= est["ci"][1]

        mmlu = rep["mc"]["mmlu"]
        for m in ("base", "tuned"):
            assert "acc_letter" not in mmlu["models"][m]["metrics"]  # the tiny tokenizer splits ` D` in two
            assert "more than one token" in mmlu["models"][m]["notes"][0]
            for k in ("acc", "acc_norm"):
                check(mmlu["models"][m]["metrics"][k], 9)
                check(mmlu["models"][m]["macro"][k], 9)
            check(mmlu["models"][m]["categories"]["stem"]["acc"], 4)
            check(mmlu["models"][m]["subjects"]["high_school_geography"]["acc"], 5)
        assert mmlu["differences"]["tuned"]["acc"]["n"] == 9
        gen = rep["generate"]["summaries"]
        assert set(gen["models"]["tuned"]["metrics"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "exact_match"}
        check(gen["models"]["base"]["metrics"]["rougeL"], 4)
        assert set(gen["differences"]["tuned"]) >= {"rougeL", "bleu", "exact_match"}
        check(rep["perplexity"]["held"]["models"]["tuned"]["metrics"]["bits_per_byte"], 2)
        judge = rep["judge"]
        assert judge["orderings"] == 100 and set(judge["elo"]) == {"base", "tuned"}
        assert judge["elo"]["base"]["mean"] + judge["elo"]["tuned"]["mean"] == pytest.approx(2000)
        md = (out / "report.md").read_text()
        for heading in ("## Multiple choice: mmlu", "## Generation: summaries", "## Perplexity: held",
                        "## Judge tournament", "| tuned − base |", "(n=9)", "Note (base, tuned): acc_letter is not defined"):
            assert heading in md
        assert (out / "mc_mmlu.png").is_file() and (out / "elo.png").is_file()
        printed = capsys.readouterr().out
        assert "mmlu acc: base" in printed and f"report: {out / 'report.md'}" in printed

        def no_load(group):  # everything is cached: nothing may be loaded, nothing asked
            raise AssertionError(f"loaded {group}")

        monkeypatch.setattr(eval_run, "load", no_load)
        assert args.handler(args) == 0
        assert len(fake.requests) == asked
        assert json.loads((out / "report.json").read_text())["mc"] == rep["mc"]

        # one more model: only it is loaded, and only its pairs are judged
        monkeypatch.undo()
        loaded: list[list[str]] = []
        real_load = eval_run.load
        monkeypatch.setattr(eval_run, "load", lambda g, impl: loaded.append([s.spec.name for s in g]) or real_load(g, impl))
        config = _config(setup, fake.url, [*models, ("other", setup["other"])])
        args = _parse(["eval", str(config)])
        assert args.handler(args) == 0
        assert loaded == [["base", "tuned", "other"]]  # one engine: the base's cache is complete but shares it
        rep3 = json.loads((out / "report.json").read_text())
        new_pairs = [j for j in rep3["judge"]["judgments"] if "other" in (j["first"], j["second"])]
        assert len(new_pairs) == 2 * 2 * 2  # 2 prompts x 2 new pairs x 2 orders
        assert len(fake.requests) - asked == sum(j["asked"] for j in new_pairs)  # nothing else was asked again
        assert set(rep3["judge"]["elo"]) == {"base", "tuned", "other"}
        assert rep3["mc"]["mmlu"]["models"]["base"] == rep["mc"]["mmlu"]["models"]["base"]


def test_bad_inputs_fail_before_loading(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loratune.errors import ConfigError, DataError

    bad = tmp_path / "bad.csv"
    bad.write_text('"Q?",a,b,c,d,Z\n')
    config = tmp_path / "e.yaml"
    config.write_text(f"models: [{{name: base, path: '{setup['base']}'}}]\nmc: [{{name: x, path: '{bad}'}}]\n"
                      f"output: {{dir: '{tmp_path / 'out'}'}}\n")
    monkeypatch.setattr(eval_run, "load", lambda g, impl: pytest.fail("loaded a model before reading the data"))
    args = _parse(["eval", str(config)])
    with pytest.raises(DataError, match=r"bad.csv: row 1: column 6 \(the answer\): got 'Z'"):
        args.handler(args)
    template = tmp_path / "judge.txt"
    template.write_text("Which is better, {answer_a} or {answer_b}?")
    config.write_text(f"models: [{{name: a, path: '{setup['base']}'}}, {{name: b, path: '{setup['tuned']}'}}]\n"
                      f"judge: {{prompts: '{setup['root'] / 'prompts.jsonl'}', model: m, template: '{template}'}}\n"
                      f"output: {{dir: '{tmp_path / 'out'}'}}\n")
    with pytest.raises(ConfigError, match=r"judge.template .*judge.txt: missing \{question\}"):
        args.handler(args)


def test_registered_in_the_cli(setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture) -> None:
    """Through `loratune.cli.main`: the subcommand is registered (one line in its COMMANDS list)."""
    from loratune import cli

    assert add_eval in cli.COMMANDS
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    assert "report.md and report.json" in capsys.readouterr().out
    config = tmp_path / "e.yaml"
    config.write_text(f"models: [{{name: base, path: '{setup['base']}'}}]\n"
                      f"mc: [{{name: m, path: '{setup['root'] / 'mmlu'}'}}]\n")
    assert cli.main(["eval", str(config), "mc.0.shot=2"]) == 2
    assert capsys.readouterr().err == ("error: unknown config key 'mc.0.shot': did you mean 'mc.0.shots'? allowed here: "
                                       "name, path, split, dev_path, dev_split, hub_config, format, columns, shots, "
                                       "style, description, subjects, categories, limit, max_length\n")
