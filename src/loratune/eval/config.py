"""The `loratune eval` configuration: one typed schema, loaded from YAML plus `dotted.key=value` overrides.

It is built by the same machinery as the training config (`loratune.config`: `_f` fields whose `help` is
the documentation, `_build` with did-you-mean errors for unknown keys and type errors naming the key,
`read_yaml` for the file and the command line's overrides), so an eval file fails exactly as a training file
does (and `reference_markdown` generates docs/eval-config.md as docs/config.md is generated):

    error: unknown config key 'mc.0.shot': did you mean 'mc.0.shots'? allowed here: name, path, ...

A file lists the models to compare side by side and the tasks to run on each of them:

    models:
      - {name: base, path: demo://llama}
      - {name: tuned, path: outputs/quickstart}
    mc:
      - {name: mmlu, path: data/mmlu, shots: 5}
    generate:
      - {name: summaries, path: data/test.jsonl, metrics: [rouge, bleu]}
    perplexity:
      - {name: heldout, path: data/heldout.txt}
    reward:
      - {name: pairs, path: data/pairs.jsonl, models: [{name: rm, path: outputs/rm}]}
    judge:
      prompts: data/prompts.jsonl
      model: gpt-4o
    output:
      dir: outputs/eval

Optional sections are never `null`-able dataclasses (a mistyped key inside one would then be reported as
a type error of the whole section): the judge is off while `judge.prompts` is unset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union


from loratune.config import REQUIRED, ColumnsConfig, _build, _f, read_yaml, schema_markdown
from loratune.errors import ConfigError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # model and task names become folder names
TEXT_FORMATS = Literal["auto", "messages", "alpaca", "sharegpt", "input_output", "prompt_completion", "oasst"]


@dataclass
class EvalModelConfig:
    name: str = _f(REQUIRED, "Column name of this model in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "An adapter folder from `loratune train` (its base, precision and chat template come "
                             "from it), a merged export or any model folder, a hub id, or `demo://llama`.")
    bits: Union[Literal[4, 8, 16, 32], None] = _f(
        None, "Load the base in this precision instead of the one the adapter was trained with (a plain model: "
              "instead of 16-bit).")


@dataclass
class MCColumnsConfig:
    """Where a record of a JSON/JSONL/parquet/CSV-with-header benchmark keeps each field."""

    question: str = _f("question", "Key of the question text.")
    choices: Union[str, list[str]] = _f(
        "choices", "Key of the list of choices, or the keys of the choices one by one (e.g. `[A, B, C, D]`).")
    answer: str = _f("answer", "Key of the answer: a 0-based index into the choices or a letter (A, B, ...).")
    subject: str = _f("subject", "Key of the subject (optional in the records; default: the file's name).")
    id: str | None = _f(None, "Key of a unique question id (default: subject and position).")


@dataclass
class MCTaskConfig:
    name: str = _f(REQUIRED, "Name of the benchmark in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "The questions: the MMLU release folder (holding `test/` and `dev/` with "
                             "`SUBJECT_test.csv`, headerless: question, choices, answer letter), a folder of "
                             "such CSVs, a .csv/.json/.jsonl/.parquet file (see `columns`), or a hub dataset "
                             "(needs a network and `datasets`).")
    split: str = _f("test", "Split evaluated: the folder `SPLIT/` and files `*_SPLIT.csv` of the MMLU layout, or "
                            "the hub split.")
    dev_path: str | None = _f(None, "Where the few-shot examples come from (same forms as `path`); default: the "
                                    "`dev` split next to `path` (MMLU layout or hub).")
    dev_split: str = _f("dev", "Split the few-shot examples are taken from.")
    hub_config: str | None = _f(None, "Hub dataset configuration (e.g. `all` for cais/mmlu).")
    format: Literal["auto", "mmlu_csv", "records"] = _f(
        "auto", "`mmlu_csv`: headerless CSV rows (question, one column per choice, answer letter) as in the "
                "original MMLU release; `records`: one record per question with the keys of `columns`; `auto`: "
                "mmlu_csv for a .csv whose first row does not name the question column, else records.")
    columns: MCColumnsConfig = field(default_factory=MCColumnsConfig, metadata={
        "help": "Key names of a record (`records` format): question, choices, answer, subject, id."})
    shots: int = _f(0, "Few-shot examples put before each question: the first N of its subject's dev split, as "
                       "lm-evaluation-harness does (MMLU: 5).")
    style: Literal["letters", "cloze"] = _f(
        "letters", "`letters`: the choices are listed as `A. ...` and scored as the continuations ` A`, ` B`, ... "
                   "(lm-evaluation-harness's `mmlu`); `cloze`: `Question: ...\\nAnswer:` scored by each choice's "
                   "own text (lm-evaluation-harness's `mmlu_continuation`).")
    description: str | None = _f(
        None, "Text before the shots; `{subject}` is replaced by the subject (underscores as spaces). Default: "
              "lm-evaluation-harness's MMLU description of the style.")
    subjects: list[str] = _f([], "Evaluate only these subjects (default: all).")
    categories: dict[str, str] = _f({}, "Category of each subject, for the per-category averages (MMLU's 57 "
                                        "subjects have theirs built in: stem, humanities, social_sciences, other).")
    limit: int = _f(0, "Evaluate at most the first N questions of each subject; 0: all.")
    max_length: int = _f(0, "Longest context + answer in tokens (contexts are cut from the left beyond it, as "
                            "lm-evaluation-harness does); 0: the model's context length.")


@dataclass
class GenerateTaskConfig:
    name: str = _f(REQUIRED, "Name of the test set in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "Prompt/reference pairs in any data format training reads (a file, a folder or a hub "
                             "dataset): the reference is the last assistant message, the prompt everything before.")
    format: TEXT_FORMATS = _f("auto", "Record format, as in training's `data.datasets[].format`.")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={
        "help": "Key names of the records where they differ from the defaults, as in training."})
    split: str = _f("test", "Split to load from a hub dataset.")
    system: str | None = _f(None, "System message given to every prompt that has none.")
    limit: int = _f(0, "Use at most the first N pairs; 0: all.")
    chat: bool = _f(True, "Render the prompt with the model's chat template (as `loratune chat` does); false: the "
                          "text of the last user message alone, as plain text.")
    metrics: list[Literal["rouge", "bleu", "exact_match", "contains"]] = _f(
        ["rouge", "bleu"], "Scores: `rouge` (ROUGE-1/2/L/Lsum F1 by rouge-score), `bleu` (corpus BLEU by "
                           "sacrebleu), `exact_match` and `contains` (after lowercasing and removing punctuation, "
                           "articles and extra spaces).")
    rouge_stemmer: bool = _f(True, "Porter-stem words before ROUGE matching (rouge-score's use_stemmer).")
    max_new_tokens: int = _f(256, "New tokens per answer.")
    temperature: float = _f(0.0, "Sampling temperature; 0 is greedy.")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    seed: int = _f(0, "Seed of the sampling (used when temperature > 0).")
    stop: list[str] = _f([], "Extra stop strings (the template's end of turn always ends an answer).")


@dataclass
class PerplexityTaskConfig:
    name: str = _f(REQUIRED, "Name of the text set in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "Held-out text: .txt (one document per blank-line-separated paragraph) or records "
                             "with a text key (`text_key`), a file, a folder or a hub dataset.")
    text_key: str = _f("text", "Key of the text in .json/.jsonl/.csv/.parquet records.")
    split: str = _f("test", "Split to load from a hub dataset.")
    limit: int = _f(0, "Use at most the first N documents; 0: all.")
    max_length: int = _f(0, "Tokens per window; 0: the model's context length (at most 4096).")
    stride: int = _f(0, "New tokens scored per window after the first (each conditioned on up to max_length - "
                        "stride earlier ones); 0: max_length (disjoint windows, as lm-evaluation-harness).")


@dataclass
class RewardModelConfig:
    name: str = _f(REQUIRED, "Column name of this reward model in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "Output folder of a `loratune train` run, loaded as training built it: a reward model "
                             "(`train.method: rm`, scored by its head), or a policy (dpo, kto, simpo, orpo, sft: "
                             "scored by the implicit reward its training reports; for DPO beta x the log-ratio of "
                             "the policy to its base).")


@dataclass
class RewardTaskConfig:
    name: str = _f(REQUIRED, "Name of the preference set in the report (letters, digits, `.`, `_`, `-`).")
    path: str = _f(REQUIRED, "Held-out preference pairs in any form preference training reads (prompt/chosen/"
                             "rejected as texts or message lists, Anthropic HH conversations): a file, a folder "
                             "or a hub dataset.")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={
        "help": "Key names of the records where they differ from the defaults (`prompt`, `chosen`, `rejected`, "
                "...), as in training."})
    split: str = _f("test", "Split to load from a hub dataset.")
    system: str | None = _f(None, "System message given to every pair whose prompt has none.")
    limit: int = _f(0, "Use at most the first N records; 0: all.")
    models: list[RewardModelConfig] = _f([], "Runs scoring the pairs (reward models, policies), side by side (the "
                                             "first is the reference of the differences shown).")


@dataclass
class JudgeConfig:
    prompts: str | None = _f(None, "Prompts the models answer, in any data format training reads (each record's "
                                   "messages up to its last user turn); unset: no judge.")
    format: TEXT_FORMATS = _f("auto", "Record format of the prompts file.")
    columns: ColumnsConfig = field(default_factory=ColumnsConfig, metadata={
        "help": "Key names of the prompt records where they differ from the defaults."})
    limit: int = _f(0, "Use at most the first N prompts; 0: all.")
    models: list[str] = _f([], "Names (from `models`) of the players; default: all models.")
    base_url: str = _f("https://api.openai.com/v1", "OpenAI-compatible API of the judge (a hosted API, vLLM, "
                                                   "`loratune serve`): `POST {base_url}/chat/completions`.")
    model: str | None = _f(None, "The judge model's name at that endpoint (required with prompts).")
    api_key_env: str = _f("OPENAI_API_KEY", "Environment variable holding the API key (sent as a bearer token; "
                                            "none is sent when it is unset).")
    template: str | None = _f(None, "A file replacing the built-in judge prompt; it must contain `{question}`, "
                                    "`{answer_a}` and `{answer_b}`, and ask for a verdict `[[A]]`, `[[B]]` or `[[C]]` (tie).")
    system: str | None = _f(None, "System message sent to the judge before the prompt.")
    temperature: float = _f(0.0, "Judge sampling temperature.")
    max_tokens: int = _f(1024, "Longest judge reply.")
    concurrency: int = _f(4, "Judge requests in flight at once.")
    timeout: float = _f(120.0, "Seconds to wait for one judge reply.")
    retries: int = _f(5, "Retries of a judge request after a timeout, 429 or 5xx (exponential backoff).")
    orderings: int = _f(10000, "Random orderings of the games the Elo ratings are computed over (the QLoRA paper: 10,000).")
    elo_k: float = _f(32.0, "Elo K-factor.")
    elo_initial: float = _f(1000.0, "Initial Elo rating.")
    answer_max_new_tokens: int = _f(512, "New tokens per model answer.")
    answer_temperature: float = _f(0.0, "Sampling temperature of the model answers; 0 is greedy.")
    answer_seed: int = _f(0, "Seed of the answers' sampling.")


@dataclass
class EvalOutputConfig:
    dir: str = _f("outputs/eval", "Output folder: report.md, report.json, plots, and the per-item caches that let "
                                  "a stopped eval continue.")
    examples: int = _f(5, "Examples shown per generation task and pair of models (largest gains and losses).")
    plots: bool = _f(True, "Draw plots (Elo ratings, per-category accuracy) next to the report (needs matplotlib).")


@dataclass
class EvalConfig:
    models: list[EvalModelConfig] = _f([], "Models compared side by side (the first is the reference of the "
                                           "differences shown).")
    mc: list[MCTaskConfig] = _f([], "Multiple-choice benchmarks.")
    generate: list[GenerateTaskConfig] = _f([], "Generate-and-score test sets.")
    perplexity: list[PerplexityTaskConfig] = _f([], "Held-out text for perplexity and bits per byte.")
    reward: list[RewardTaskConfig] = _f([], "Pairwise accuracy of reward models (`train.method: rm` runs) and "
                                            "policies (implicit rewards), listed per task, on held-out preference "
                                            "pairs.")
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={
        "help": "Pairwise judgments of the models' answers by an OpenAI-compatible model, and Elo ratings."})
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig, metadata={"help": "Where the report goes."})
    batch_size: int = _f(8, "Questions (multiple choice), prompts (generation), windows (perplexity) or pairs "
                            "(reward) per forward pass.")
    implementation: Union[Literal["auto", "loratune", "transformers"], None] = _f(
        None, "Which model code answers, as `model.implementation` in training: null (as each adapter was trained, "
              "or LORATUNE_IMPLEMENTATION), `auto` (loratune's decoder where it covers the model, else transformers "
              "+ peft), `loratune`, `transformers` (everything on transformers, a reference). Log-likelihoods "
              "(multiple choice, perplexity) are scored on loratune's decoder wherever it covers the model, unless "
              "`transformers`.")
    seed: int = _f(1234, "Seed of the bootstrap intervals and of the Elo orderings.")
    bootstrap: int = _f(1000, "Bootstrap resamples behind the intervals of means (ROUGE, BLEU, perplexity, macro "
                              "averages, differences); accuracies use exact Wilson intervals.")
    confidence: float = _f(0.95, "Confidence level of every interval.")


def load_eval_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> EvalConfig:
    """Read an eval YAML file, apply `dotted.key=value` overrides, validate, and return the typed config."""
    cfg = _build(EvalConfig, read_yaml(path, overrides))
    validate(cfg)
    return cfg


def reference_markdown() -> str:
    """docs/eval-config.md: every key of the eval schema, its type, default and meaning."""
    return schema_markdown(EvalConfig, "Eval configuration reference", [
        "Generated from `src/loratune/eval/config.py` by `loratune config-docs --eval`; do not edit by hand.",
        "The file `loratune eval CONFIG.yaml` reads. Every key can be set in the YAML file or overridden on the "
        "command line as `key=value` (`mc.0.shots=0`); list items are numbered from 0."])


def validate(cfg: EvalConfig) -> None:
    """Reject values and combinations that cannot work, naming the keys involved."""
    tasks = [*cfg.mc, *cfg.generate, *cfg.perplexity]
    checks = [
        (not cfg.models and (tasks or cfg.judge.prompts or not cfg.reward),
         "models: name at least one model to evaluate"),
        (not tasks and not cfg.judge.prompts and not cfg.reward,
         "nothing to evaluate: add an mc, generate, perplexity or reward task, or judge.prompts"),
        (cfg.batch_size < 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.bootstrap < 0, f"bootstrap must be >= 0, got {cfg.bootstrap}"),
        (not 0 < cfg.confidence < 1, f"confidence must be in (0, 1), got {cfg.confidence}"),
        (cfg.output.examples < 0, f"output.examples must be >= 0, got {cfg.output.examples}"),
        *_names("models", [m.name for m in cfg.models]),
        *_names("tasks", [t.name for t in [*tasks, *cfg.reward]]),
        *_mc_checks(cfg.mc),
        *_generate_checks(cfg.generate),
        *_perplexity_checks(cfg.perplexity),
        *_reward_checks(cfg.reward),
        *_judge_checks(cfg),
    ]
    for bad, message in checks:
        if bad:
            raise ConfigError(message)


def _names(what: str, names: list[str]) -> list[tuple[bool, str]]:
    bad = [n for n in names if not NAME.match(n)]
    dupes = sorted({n for n in names if names.count(n) > 1})
    return [(bool(bad), f"{what}: name {bad[0] if bad else ''!r} may hold only letters, digits, '.', '_' and '-' "
                        "(it names a folder)"),
            (bool(dupes), f"{what}: names must be unique, {', '.join(dupes)} repeats")]


def _mc_checks(tasks: list[MCTaskConfig]) -> list[tuple[bool, str]]:
    checks = []
    for i, t in enumerate(tasks):
        checks += [(t.shots < 0, f"mc.{i}.shots must be >= 0, got {t.shots}"),
                   (t.limit < 0, f"mc.{i}.limit must be >= 0, got {t.limit}"),
                   (t.max_length < 0, f"mc.{i}.max_length must be >= 0, got {t.max_length}"),
                   (isinstance(t.columns.choices, list) and len(t.columns.choices) < 2,
                    f"mc.{i}.columns.choices must name at least two keys, got {t.columns.choices}")]
    return checks


def _generate_checks(tasks: list[GenerateTaskConfig]) -> list[tuple[bool, str]]:
    checks = []
    for i, t in enumerate(tasks):
        checks += [(t.limit < 0, f"generate.{i}.limit must be >= 0, got {t.limit}"),
                   (not t.metrics, f"generate.{i}.metrics is empty; name at least one of rouge, bleu, exact_match, contains"),
                   (t.max_new_tokens < 1, f"generate.{i}.max_new_tokens must be >= 1, got {t.max_new_tokens}"),
                   (not 0 <= t.temperature <= 2, f"generate.{i}.temperature must be in [0, 2], got {t.temperature}"),
                   (not 0 < t.top_p <= 1, f"generate.{i}.top_p must be in (0, 1], got {t.top_p}"),
                   (any(not s for s in t.stop), f"generate.{i}.stop holds an empty string")]
    return checks


def _perplexity_checks(tasks: list[PerplexityTaskConfig]) -> list[tuple[bool, str]]:
    checks = []
    for i, t in enumerate(tasks):
        checks += [(t.limit < 0, f"perplexity.{i}.limit must be >= 0, got {t.limit}"),
                   (t.max_length < 0 or t.max_length == 1, f"perplexity.{i}.max_length must be 0 or >= 2, got {t.max_length}"),
                   (t.stride < 0, f"perplexity.{i}.stride must be >= 0, got {t.stride}"),
                   (t.max_length > 0 and t.stride > t.max_length,
                    f"perplexity.{i}.stride ({t.stride}) must not exceed max_length ({t.max_length})")]
    return checks


def _reward_checks(tasks: list[RewardTaskConfig]) -> list[tuple[bool, str]]:
    checks = []
    for i, t in enumerate(tasks):
        checks += [(not t.models, f"reward.{i}.models: name at least one run to score the pairs (a reward model "
                                  "of train.method rm, or a policy)"),
                   (t.limit < 0, f"reward.{i}.limit must be >= 0, got {t.limit}"),
                   *_names(f"reward.{i}.models", [m.name for m in t.models])]
    return checks


def _judge_checks(cfg: EvalConfig) -> list[tuple[bool, str]]:
    j = cfg.judge
    if not j.prompts:
        return []
    known = [m.name for m in cfg.models]
    unknown = [m for m in j.models if m not in known]
    players = j.models or known
    return [
        (not j.model, "judge.model is required with judge.prompts: the judge model's name at judge.base_url"),
        (bool(unknown), f"judge.models: {', '.join(unknown)} not among the models ({', '.join(known)})"),
        (len(set(players)) < 2, "the judge needs at least two models to compare"),
        (j.limit < 0, f"judge.limit must be >= 0, got {j.limit}"),
        (j.concurrency < 1, f"judge.concurrency must be >= 1, got {j.concurrency}"),
        (j.retries < 0, f"judge.retries must be >= 0, got {j.retries}"),
        (j.timeout <= 0, f"judge.timeout must be > 0, got {j.timeout}"),
        (j.orderings < 1, f"judge.orderings must be >= 1, got {j.orderings}"),
        (j.elo_k <= 0, f"judge.elo_k must be > 0, got {j.elo_k}"),
        (j.max_tokens < 1, f"judge.max_tokens must be >= 1, got {j.max_tokens}"),
        (j.answer_max_new_tokens < 1, f"judge.answer_max_new_tokens must be >= 1, got {j.answer_max_new_tokens}"),
        (not 0 <= j.answer_temperature <= 2, f"judge.answer_temperature must be in [0, 2], got {j.answer_temperature}"),
    ]
