"""Small MMLU-format benchmark files for the eval tests.

The same questions are written in the original release's layout (headerless `test/SUBJECT_test.csv` and
`dev/SUBJECT_dev.csv`) and as JSON Lines in the hub dataset's schema (`question`, `subject`, `choices`,
`answer` as a 0-based index), so readers of both layouts and lm-evaluation-harness see the same questions.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

# subject -> (test rows, dev rows); a row is (question, choices, answer index)
QUESTIONS = {
    "high_school_geography": (
        [("Which river flows through Cairo?", ["The Nile", "The Amazon", "The Danube", "The Thames"], 0),
         ("What is the capital of Japan?", ["Osaka", "Tokyo", "Kyoto", "Nagoya"], 1),
         ("Which continent is the largest by area?", ["Africa", "Europe", "Asia", "Oceania"], 2),
         ("Which ocean lies between Africa and Australia?", ["Atlantic", "Arctic", "Southern", "Indian"], 3),
         ("What is the longest mountain range on land?", ["The Andes", "The Alps", "The Urals", "The Rockies"], 0)],
        [("Which country has the largest population?", ["India", "Peru", "Chad", "Fiji"], 0),
         ("What is the capital of France?", ["Lyon", "Paris", "Nice", "Lille"], 1),
         ("Which desert is the largest hot desert?", ["Gobi", "Kalahari", "Sahara", "Mojave"], 2)],
    ),
    "college_mathematics": (
        [("What is 7 times 8?", ["54", "56", "58", "64"], 1),
         ("What is the derivative of x^2?", ["x", "2x", "x^2", "2"], 1),
         ("Which number is prime?", ["21", "27", "29", "33"], 2),
         ("What is the square root of 81?", ["7", "8", "9", "10"], 2)],
        [("What is 2 plus 2?", ["3", "4", "5", "6"], 1),
         ("What is 10 divided by 2?", ["2", "5", "10", "20"], 1),
         ("What is 3 squared?", ["6", "9", "12", "27"], 1)],
    ),
}


def write_mmlu(root: Path) -> Path:
    """The MMLU release layout under `root`: test/ and dev/ of headerless CSV files."""
    for subject, (test, dev) in QUESTIONS.items():
        for split, rows in (("test", test), ("dev", dev)):
            (root / split).mkdir(parents=True, exist_ok=True)
            with open(root / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                for q, choices, answer in rows:
                    w.writerow([q, *choices, "ABCD"[answer]])
    return root


def write_jsonl(root: Path) -> dict[str, dict[str, Path]]:
    """{subject: {split: file}} of JSON Lines in the hub dataset's schema."""
    out: dict[str, dict[str, Path]] = {}
    root.mkdir(parents=True, exist_ok=True)
    for subject, (test, dev) in QUESTIONS.items():
        for split, rows in (("test", test), ("dev", dev)):
            path = root / f"{subject}_{split}.jsonl"
            path.write_text("".join(json.dumps({"question": q, "subject": subject, "choices": c, "answer": a}) + "\n"
                                    for q, c, a in rows), encoding="utf-8")
            out.setdefault(subject, {})[split] = path
    return out
