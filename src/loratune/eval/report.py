"""report.json and report.md: every number with its sample count and confidence interval, models side by side.

report.json is the whole result as data (the config, the models and their fingerprints, every metric as
`{"value", "n", "ci": [low, high], "ci_method"}`, per subject and category, differences to the first
model, judge statistics, reward models' pairwise accuracies). report.md renders it for people: one table per task with a column per model
and one per difference to the first model, then examples. Both are written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from loratune.eval.store import write_text_atomic

MC_LABELS = {"acc": "acc (log-likelihood)", "acc_norm": "acc_norm (per character)", "acc_letter": "acc (answer letter)"}
GEN_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum", "bleu": "BLEU",
              "exact_match": "exact match %", "contains": "contains %"}
PPL_LABELS = {"perplexity": "perplexity (per token)", "bits_per_byte": "bits per byte", "word_perplexity": "perplexity (per word)"}


def _num(x: float | None, digits: int, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def cell(est: dict | None, digits: int = 3, sign: bool = False, count: bool = True) -> str:
    """`value [low, high] (n=N)`."""
    if not est:
        return ""
    low, high = est["ci"]
    ci = f" [{_num(low, digits, sign)}, {_num(high, digits, sign)}]" if low is not None else ""
    return f"{_num(est['value'], digits, sign)}{ci}" + (f" (n={est['n']})" if count else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _models_section(report: dict) -> list[str]:
    if not report["models"]:  # only reward tasks: their runs are listed in their sections
        return []
    rows = [[m["name"], f"`{m['path']}`", m["kind"], str(m["bits"]), f"`{m['fingerprint']}`"] for m in report["models"]]
    return ["## Models", "", *_table(["model", "path", "kind", "quantization.bits", "fingerprint"], rows)]


def _mc_section(name: str, task: dict, models: list[str]) -> list[str]:
    first, others = models[0], models[1:]
    lines = [f"## Multiple choice: {name}", "",
             f"{task['shots']}-shot, `{task['style']}` style, {task['questions']} questions in {task['subjects']} "
             f"subjects from `{task['path']}`. Intervals: Wilson (accuracies), bootstrap (macro averages, differences).", ""]
    header = ["metric", *models, *(f"{m} − {first}" for m in others)]
    rows = []
    metrics = list(dict.fromkeys(k for x in models for k in task["models"][x]["metrics"]))
    for m in metrics:
        for kind, label in (("metrics", MC_LABELS[m]), ("macro", MC_LABELS[m] + ", mean over subjects")):
            row = [label, *(cell(task["models"][x][kind].get(m)) or "n/a" for x in models)]
            if kind == "metrics":
                row += [cell(task["differences"][x].get(m), sign=True, count=False) for x in others]
            else:
                row += ["" for _ in others]
            rows.append(row)
    lines += _table(header, rows)
    notes: dict[str, list[str]] = {}
    for x in models:
        for n in task["models"][x]["notes"]:
            notes.setdefault(n, []).append(x)
    lines += [f"Note ({', '.join(who)}): {n}." for n, who in notes.items()] + ([""] if notes else [])
    truncated = {x: task["models"][x]["truncated"] for x in models if task["models"][x]["truncated"]}
    if truncated:
        lines += [f"Contexts cut from the left to fit: {', '.join(f'{x}: {n}' for x, n in truncated.items())}.", ""]
    main = metrics[0]
    for group in ("categories", "subjects"):
        keys = list(task["models"][first][group])
        if not keys:
            continue
        rows = [[k, *(cell(task["models"][x][group].get(k, {}).get(main)) for x in models)] for k in keys]
        table = _table([group[:-1] if group == "subjects" else "category", *(f"{x} {main}" for x in models)], rows)
        if group == "subjects":
            lines += ["<details><summary>Per subject</summary>", "", *table, "</details>", ""]
        else:
            lines += [f"Per category ({MC_LABELS[main]}):", "", *table]
    return lines


def _quote(text: str | None, limit: int = 400) -> str:
    text = (text or "").strip()
    text = text if len(text) <= limit else text[:limit] + " …"
    return "\n".join("> " + line for line in text.splitlines()) or "> (empty)"


def _generate_section(name: str, task: dict, models: list[str]) -> list[str]:
    first, others = models[0], models[1:]
    lines = [f"## Generation: {name}", "", f"{task['n']} prompts from `{task['path']}`; scores 0-100. "
             "Intervals: bootstrap (ROUGE, BLEU, differences), Wilson (rates).", ""]
    metrics = list(task["models"][first]["metrics"])
    rows = [[GEN_LABELS[m], *(cell(task["models"][x]["metrics"][m], 2) for x in models),
             *(cell(task["differences"][x].get(m), 2, sign=True, count=False) for x in others)] for m in metrics]
    rows.append(["answers cut at max_new_tokens", *(str(task["models"][x]["cut_at_max_tokens"]) for x in models),
                 *("" for _ in others)])
    lines += _table(["metric", *models, *(f"{m} − {first}" for m in others)], rows)
    for other in others:
        for kind in ("gains", "losses"):
            examples = task["examples"][other][kind]
            if not examples:
                continue
            lines += [f"### {other} vs {first}: largest {kind} ({examples[0]['metric']})", ""]
            for ex in examples:
                lines += [f"**{ex['source']} row {ex['row']}** ({ex['metric']} {ex['scores'][first]:.1f} → "
                          f"{ex['scores'][other]:.1f})", "", "Prompt:", "", _quote(ex["prompt"]), "", "Reference:", "",
                          _quote(ex["reference"]), "", f"{first}:", "", _quote(ex["answers"][first]), "", f"{other}:", "",
                          _quote(ex["answers"][other]), ""]
    return lines


def _perplexity_section(name: str, task: dict, models: list[str]) -> list[str]:
    lines = [f"## Perplexity: {name}", "", f"{task['documents']} documents from `{task['path']}`, windows of "
             f"{task['max_length']} tokens, stride {task['stride']}. Intervals: bootstrap over documents.", ""]
    rows = [[PPL_LABELS[m], *(cell(task["models"][x]["metrics"][m], 4) for x in models)] for m in PPL_LABELS]
    rows.append(["tokens", *(str(task["models"][x]["tokens"]) for x in models)])
    return lines + _table(["metric", *models], rows)


def _reward_section(name: str, task: dict) -> list[str]:
    models = list(task["models"])
    first, others = models[0], models[1:]
    left = f" ({task['identical']} more have the same chosen and rejected answers: left out)" if task["identical"] else ""
    lines = [f"## Reward models: {name}", "",
             f"{task['records'] - task['identical']} preference pairs from `{task['path']}`{left}. Rewards: a reward "
             "model's head, or a policy's implicit reward as its training reports it (the `reward` column below). "
             "Accuracy: the share "
             "of pairs whose chosen answer gets the higher reward (a tie counts as wrong), Wilson interval; margin: "
             "the mean of reward(chosen) - reward(rejected), bootstrap interval; differences: paired bootstrap over "
             "the pairs both scored.", ""]
    rows = [["pairwise accuracy", *(cell(task["models"][x]["accuracy"]) for x in models),
             *(cell(task["differences"][x]["accuracy"], sign=True, count=False) for x in others)],
            ["mean margin", *(cell(task["models"][x]["margin"], count=False) for x in models), *("" for _ in others)],
            ["mean reward chosen / rejected", *(f"{_num(task['models'][x]['mean_reward_chosen'], 3)} / "
                                                f"{_num(task['models'][x]['mean_reward_rejected'], 3)}" for x in models),
             *("" for _ in others)],
            ["ties", *(str(task["models"][x]["ties"]) for x in models), *("" for _ in others)],
            ["truncated to data.max_length", *(str(task["models"][x]["truncated"]) for x in models),
             *("" for _ in others)],
            ["dropped by the length limits", *(str(sum(task["models"][x]["dropped"].values())) for x in models),
             *("" for _ in others)]]
    lines += _table(["metric", *models, *(f"{m} − {first}" for m in others)], rows)
    lines += _table(["model", "path", "reward", "fingerprint"],
                    [[x, f"`{task['models'][x]['path']}`", task["models"][x]["reward"],
                      f"`{task['models'][x]['fingerprint']}`"] for x in models])
    for x in models:
        for kind, title in (("right", "most confident right"), ("wrong", "most confident wrong")):
            examples = task["models"][x]["examples"][kind]
            if not examples:
                continue
            lines += [f"### {x}: {title}", ""]
            for ex in examples:
                lines += [f"**{ex['source']} row {ex['row']}** (reward chosen {ex['reward_chosen']:.3f}, rejected "
                          f"{ex['reward_rejected']:.3f}, margin {ex['margin']:+.3f})", "", "Prompt:", "",
                          _quote(ex["prompt"]), "", "Chosen:", "", _quote(ex["chosen"]), "", "Rejected:", "",
                          _quote(ex["rejected"]), ""]
    return lines


def _judge_section(judge: dict) -> list[str]:
    players = judge["players"]
    elo = judge["elo"]
    ranked = sorted(players, key=lambda p: -elo[p]["mean"])
    lines = ["## Judge tournament", "",
             f"{judge['prompts']} prompts judged by `{judge['judge_model']}` at `{judge['base_url']}`; every pair in both "
             f"orders; Elo (K={judge['k']:g}, start {judge['initial']:g}) over {judge['orderings']} random orderings of "
             f"{judge['games']} games, mean and {judge['confidence']:.0%} interval.", ""]
    rows = [[p, f"{elo[p]['mean']:.0f} [{elo[p]['low']:.0f}, {elo[p]['high']:.0f}]", f"{elo[p]['median']:.0f}",
             str(sum(c['games'] for c in judge['win_rates'][p].values()))] for p in ranked]
    lines += _table(["model", "Elo", "median", "games"], rows)
    rows = [[p, *("—" if p == q else f"{judge['win_rates'][p][q]['rate']:.2f} ({judge['win_rates'][p][q]['games']})"
                  for q in ranked)] for p in ranked]
    lines += ["Win rate of the row model against the column model (ties count half; games):", "",
              *_table(["", *ranked], rows)]
    pos = judge["position"]
    same = pos["judgments"] - pos["asked"]
    lines += [f"Judgments: {pos['judgments']}" + (f" ({same} of identical answers, scored as ties without asking)" if same
                                                  else "") + f"; {pos['invalid']} without a verdict (left out). "
              f"The judge preferred the first answer in "
              f"{_num(pos['first_position_wins'], 2)} and the second in {_num(pos['second_position_wins'], 2)} of its "
              f"verdicts; both orders of a pair agreed in {_num(pos['orders_agree'], 2)} of {pos['pairs']} pairs.", ""]
    return lines


def markdown(report: dict) -> str:
    models = [m["name"] for m in report["models"]]
    lines = ["# Evaluation report", "", f"Written by loratune {report['loratune']} on {report['created']}. Every number "
             f"shows its {report['confidence']:.0%} confidence interval in brackets and its sample count.", ""]
    lines += _models_section(report)
    for name, task in report.get("mc", {}).items():
        lines += _mc_section(name, task, models)
    for name, task in report.get("generate", {}).items():
        lines += _generate_section(name, task, models)
    for name, task in report.get("perplexity", {}).items():
        lines += _perplexity_section(name, task, models)
    for name, task in report.get("reward", {}).items():
        lines += _reward_section(name, task)
    if report.get("judge"):
        lines += _judge_section(report["judge"])
    for plot in report.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    return "\n".join(lines).rstrip() + "\n"


def _json_safe(value):
    """NaN (a rate over no items) as null: report.json stays standard JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write(out_dir: Path, report: dict) -> tuple[Path, Path]:
    """Write report.json and report.md into `out_dir`; returns their paths."""
    js, md = out_dir / "report.json", out_dir / "report.md"
    write_text_atomic(js, json.dumps(_json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    write_text_atomic(md, markdown(report))
    return js, md


def console_summary(report: dict) -> str:
    """A few lines for the terminal: each task's main numbers per model, and where the full report is."""
    models = [m["name"] for m in report["models"]]
    lines = []
    for name, task in report.get("mc", {}).items():
        for m in task["models"][models[0]]["metrics"]:
            lines.append(f"{name} {m}: " + ", ".join(f"{x} {cell(task['models'][x]['metrics'][m], count=False)}"
                                                     for x in models))
    for name, task in report.get("generate", {}).items():
        for m in task["models"][models[0]]["metrics"]:
            lines.append(f"{name} {GEN_LABELS[m]}: " + ", ".join(
                f"{x} {cell(task['models'][x]['metrics'][m], 2, count=False)}" for x in models))
    for name, task in report.get("perplexity", {}).items():
        lines.append(f"{name} bits per byte: " + ", ".join(
            f"{x} {cell(task['models'][x]['metrics']['bits_per_byte'], 4, count=False)}" for x in models))
    for name, task in report.get("reward", {}).items():
        lines.append(f"{name} pairwise accuracy: " + ", ".join(
            f"{x} {cell(m['accuracy'])}" for x, m in task["models"].items()))
    if report.get("judge"):
        elo = report["judge"]["elo"]
        lines.append("Elo: " + ", ".join(f"{p} {elo[p]['mean']:.0f} [{elo[p]['low']:.0f}, {elo[p]['high']:.0f}]"
                                         for p in sorted(elo, key=lambda p: -elo[p]["mean"])))
    out_dir = report["config"]["output"]["dir"]
    return "\n".join([*lines, f"report: {Path(out_dir) / 'report.md'}"])
