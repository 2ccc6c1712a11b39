"""Evaluation: `loratune eval` compares models side by side on benchmarks, generations, judges and perplexity.

    config (eval/config.py) ─► models (models.py: base, adapters, merged exports; one engine at a time)
      ├─ mc.py          multiple choice: per-choice log-likelihood (decoder_loglik.py on loratune's decoder over
      │                 the loaded base, decoder_view.py: padding-free streams, shared prefixes; loglik.py on
      │                 transformers for other architectures), acc / acc_norm (lm-evaluation-harness) and
      │                 answer-letter accuracy (qlora.py)
      ├─ generate.py    answers from the one inference engine, scored by textmetrics.py (ROUGE, BLEU, EM)
      ├─ perplexity.py  held-out text: perplexity and bits per byte
      └─ judge.py       pairwise judgments by an OpenAI-compatible model ─► elo.py ratings and win rates
    ─► report.py (report.md + report.json, every number with its count and interval: stats.py)

Every per-item result is cached in the output folder as it is computed (store.py), so a stopped eval
continues where it stopped. `evaluate_mc` scores a model already in memory, loratune's decoder or a transformers model (the training
loop's hook).
"""
