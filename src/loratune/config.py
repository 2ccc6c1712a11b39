"""The run configuration: one typed schema in sections, loaded from YAML plus `dotted.key=value` overrides.

Every field is a dataclass field whose `help` metadata is its documentation: `docs/config.md` is
generated from it (`loratune config-docs`), and a test fails if the two drift. Loading is strict, as
qlora.py was not: an unknown key, a wrong type or an impossible combination raises `ConfigError`
naming the key, what was given and what is allowed. Defaults follow the QLoRA paper (Dettmers et al.
2023) where it has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from loratune.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with documentation; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


REQUIRED = "<required>"


@dataclass
class RopeScalingConfig:
    """RoPE scaling for contexts longer than the base was pretrained on (see loratune.model.rope_scaling)."""

    type: Literal["linear", "dynamic", "yarn", "llama3"] = _f(
        "linear", "`linear` (position interpolation: positions divided by factor), `dynamic` (NTK: the base grows "
                  "with a sample's length past the pretraining length; nothing changes below it), `yarn` (NTK-by-parts "
                  "interpolation plus an attention factor) or `llama3` (Llama 3.1's wavelength-dependent scaling).")
    factor: float = _f(0.0, "How many times longer than the pretraining length the context becomes (> 1); "
                                 "max_position_embeddings becomes original x factor (dynamic keeps it).")
    original_max_position_embeddings: int = _f(0, "The pretraining context length; 0 reads the model's "
                                                  "max_position_embeddings.")
    low_freq_factor: float = _f(1.0, "llama3 only: wavelengths longer than original / low_freq_factor are scaled "
                                     "by factor.")
    high_freq_factor: float = _f(4.0, "llama3 only: wavelengths shorter than original / high_freq_factor stay "
                                      "unscaled (in between they are blended).")
    beta_fast: float = _f(32.0, "yarn only: rotations at which the interpolation ramp starts (high frequencies "
                                "stay unscaled).")
    beta_slow: float = _f(1.0, "yarn only: rotations at which the ramp ends (low frequencies fully interpolated).")
    attention_factor: float = _f(0.0, "yarn only: scale of cos/sin (attention temperature); 0 uses "
                                      "0.1 ln(factor) + 1, as the YaRN paper.")


@dataclass
class ModelConfig:
    path: str = _f(REQUIRED, "Base model: a local folder or a hub id (or `demo://llama` for the built-in offline demo model).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base model.")
    tokenizer: str | None = _f(None, "Tokenizer folder or hub id, if not the model's own.")
    add_tokens: list[str] = _f([], "Tokens added to the vocabulary (e.g. domain words): the embedding and the output "
                                   "head grow to the new vocabulary (new rows at the mean of the old ones) and are "
                                   "trained in full (adapter.type lora: saved in the adapter as modules_to_save); the "
                                   "tokenizer is saved with the run. Trains through transformers + peft. "
                                   "loratune.model.new_tokens")
    add_special_tokens: list[str] = _f([], "Special tokens added the same way (never split; left out of decoded "
                                           "answers), e.g. new chat markers.")
    trust_remote_code: bool = _f(False, "Run Python code shipped with the model. Off by default: only enable it for models you trust.")
    rope_scaling: RopeScalingConfig | None = _f(
        None, "Stretch the base's RoPE to train and run on longer sequences than it was pretrained on, e.g. "
              "`{type: yarn, factor: 4}`; written into the model's config (transformers and loratune's decoder "
              "both compute it) and kept by the adapter's run, its exports and the memory plan, which plans "
              "data.max_length tokens. Only for a base whose RoPE is not scaled already.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = _f(
        "auto", "Attention kernel passed to transformers; `auto` lets transformers pick the best one the architecture "
                "supports (PyTorch SDPA for most, eager for Gemma 2, whose soft-capped attention has no SDPA path).")
    kernels: Union[Literal["auto"], bool] = _f(
        "auto", "loratune's own Triton kernels in loratune's decoder on a CUDA GPU (loratune.kernels): 4-bit weights "
                "dequantized in one pass, RMSNorm and SwiGLU in one kernel per direction, the loss's cross-entropy "
                "rows turned into their gradient in place. `auto` (or true) uses them; false runs their plain-PyTorch "
                "references instead (same math, slower; for checking numbers). No effect on CPU. The transformers + "
                "peft fallback always runs as transformers and peft ship and ignores this key.")
    cuda_graphs: Union[Literal["auto"], bool] = _f(
        "auto", "On a CUDA GPU, capture the forward and backward pass of loratune's decoder on its fixed-shape "
                "padding-free micro-batches once as a CUDA graph and replay it (no Python per launch): `auto` (or "
                "true) does so where it is exact (SFT, train.batching padding_free, bf16/fp32 compute, not "
                "deterministic, no NEFTune, no adapter dropout) and measured faster than eager; true also with adapter "
                "dropout (its masks reseeded per micro-batch and replayed; not yet measured on a GPU); false never. The transformers + peft "
                "fallback always runs eagerly. See loratune.kernels.graphs.")
    embedding_on_host: Union[Literal["auto"], bool] = _f(
        False, "Keep loratune's decoder's frozen input embedding in host memory while training on a CUDA GPU "
                "(default false until measured on a GPU): "
                "each micro-batch's rows are gathered on the host and copied to the GPU without blocking (about "
                "1 GiB less GPU memory for a 128k vocabulary at hidden size 4096 in bf16). `auto` does so on CUDA "
                "when the output head is not tied to the embedding (a tied head needs it on the GPU) and train.strategy "
                "is not fsdp; true also on CPU (the same numbers; for tests), an error for a "
                "tied head; false never. The memory plan counts it as host memory. The transformers + peft "
                "fallback ignores this key. loratune.decoder.model.TokenEmbedding")
    implementation: Literal["auto", "loratune", "transformers"] = _f(
        "auto", "Which model code trains: `loratune` is loratune's own decoder (loratune.decoder: Llama, Mistral, "
                "Qwen2/2.5/3, Gemma 1-3, Phi-3; LoRA adapters on a 4-, 16- or 32-bit base), `transformers` the "
                "transformers model with peft's adapters. `auto` takes loratune's decoder where it covers the "
                "architecture and the settings, and transformers + peft otherwise (8-bit bases, DoRA, "
                "modules_to_save, full fine-tuning, other architectures); the start of a run says which, in one "
                "line. The adapter written is the same PEFT adapter either way. The environment variable "
                "LORATUNE_IMPLEMENTATION (loratune or transformers), when set, replaces `auto` (to run a test suite "
                "on either path).")


@dataclass
class QuantizationConfig:
    bits: Literal[2, 3, 4, 8, 16, 32] = _f(4, "Precision of the frozen base: 4 (QLoRA), 8 (LLM.int8), 16 (plain LoRA in `compute_dtype`) or 32; 2 and 3 with quantization.method hqq only.")
    method: Literal["bitsandbytes", "hqq"] = _f(
        "bitsandbytes", "How a 2/4/8-bit base is quantized when it loads. `bitsandbytes`: NF4/FP4 (QLoRA) or LLM.int8. "
                        "`hqq`: HQQ (half-quadratic quantization, the `hqq` package: pip install 'loratune[hqq]'), 2, 3, "
                        "4 or 8 bits in groups of quantization.group_size weights, pure PyTorch, on CPU too; it trains "
                        "through transformers + peft. quant_type and double_quant apply to bitsandbytes only.")
    group_size: int = _f(64, "HQQ only: weights per group sharing one scale and zero point (smaller: more accurate, more "
                             "bytes); must divide each layer's input size.")
    quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit data type; NF4 is the QLoRA paper's NormalFloat.")
    double_quant: bool = _f(True, "Quantize the quantization constants too (saves about 0.37 bits per weight).")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f("auto", "Dtype of matmuls and of 16-bit weights. auto: bf16 on a GPU that has it (the paper), fp16 on older GPUs, fp32 on CPU.")


@dataclass
class AdapterConfig:
    type: Literal["lora", "none", "freeze"] = _f(
        "lora", "`lora` trains adapters on a frozen base; `none` is full fine-tuning (needs bits 16 or 32); `freeze` "
                "is freeze-tuning: the last adapter.freeze_layers decoder layers and adapter.freeze_modules trained "
                "in full, the rest frozen (bits 16 or 32; the whole model is written, as with `none`).")
    rank: int = _f(64, "LoRA rank r (paper: 64).")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r (or alpha/sqrt(r) with rslora). Paper: 16.")
    dropout: float = _f(0.1, "Dropout on the adapter input (paper: 0.1 up to 13B, 0.05 for 33B and 65B).")
    target_modules: Union[Literal["all-linear"], list[str]] = _f("all-linear", "`all-linear` (every linear layer but the output head, found from the model) or a list of module name suffixes.")
    exclude_modules: list[str] = _f([], "Module name suffixes never to adapt, applied after target_modules.")
    rslora: bool = _f(False, "Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    modules_to_save: list[str] = _f([], "Modules trained in full and saved with the adapter (e.g. `lm_head` after adding tokens).")
    init: str = _f(
        "default", "How the LoRA weights start (loratune.model.lora_init): `default` (A Kaiming-uniform, B zero: "
                   "the adapter starts as a no-op), `gaussian` (A ~ N(0, 1/r)), `pissa` (the top-r singular "
                   "directions of each weight move into the adapter; the base keeps the residual), "
                   "`pissa_niter_N` (the same by a randomized SVD of N iterations, faster on large weights), "
                   "`olora` (QR-based), both on a 16- or 32-bit base, their saved adapters converted to plain "
                   "LoRA of rank 2r on the original base; or `loftq` on a 4-bit base (the adapter starts at the "
                   "rank-r SVD of the quantization error W - Q(W), W read from the checkpoint's safetensors); or "
                   "`eva` on any base (A from the top-r principal directions of each layer's inputs on the first "
                   "32 training samples, B zero).")
    eva_rho: float = _f(2.0, "adapter.init eva: rank redistribution (peft's EvaConfig.rho, >= 1): each layer may take up "
                             "to round(rank x rho) components, and the total rank (rank x adapted layers) goes to the "
                             "components that explain the largest share of their layer's input variance, so layers "
                             "get different ranks (some none; alpha scales with the rank; the saved adapter says so "
                             "in rank_pattern/alpha_pattern). 1: every layer keeps adapter.rank.")
    freeze_layers: int = _f(2, "adapter.type freeze: how many decoder layers, the last ones, train in full.")
    freeze_modules: list[str] = _f([], "adapter.type freeze: more modules trained in full, by name suffix (e.g. "
                                       "`embed_tokens`, `norm`, `lm_head`, or `mlp` for every layer's MLP).")


@dataclass
class ColumnsConfig:
    """Which key of a record holds each field, for files whose keys differ from the standard names."""

    messages: str | None = _f(None, "Key of the message list (messages / sharegpt formats); default `messages`, or `conversations` for sharegpt.")
    role: str | None = _f(None, "Key of a message's role; default `role` (messages) or `from` (sharegpt).")
    content: str | None = _f(None, "Key of a message's text; default `content` (messages) or `value` (sharegpt).")
    system: str | None = _f(None, "Key of a per-record system prompt; default `system`.")
    tools: str | None = _f(None, "Key of a per-record tool list (JSON schemas, passed to the chat template); default `tools`.")
    instruction: str | None = _f(None, "Key of the instruction (alpaca); default `instruction`.")
    input: str | None = _f(None, "Key of the optional input (alpaca) or the prompt (input_output); default `input`.")
    output: str | None = _f(None, "Key of the response (alpaca, input_output); default `output`.")
    history: str | None = _f(None, "Key of earlier [instruction, response] pairs (alpaca); default `history`.")
    prompt: str | None = _f(None, "Key of the prompt (prompt_completion); default `prompt`.")
    completion: str | None = _f(None, "Key of the completion (prompt_completion); default `completion`.")
    text: str | None = _f(None, "Key of the text (text and oasst formats); default `text`.")
    chosen: str | None = _f(None, "Key of the preferred answer (preference methods: a text, a message list, or the whole "
                                  "conversation as in Anthropic HH); default `chosen`.")
    rejected: str | None = _f(None, "Key of the dispreferred answer (preference methods); default `rejected`.")
    label: str | None = _f(None, "Key of a completion's desirable (true) / undesirable (false) label (train.method kto); "
                                 "default `label`.")


@dataclass
class DatasetConfig:
    path: str = _f(REQUIRED, "A file (.json, .jsonl, .csv, .tsv, .parquet, .txt), a folder of them, or a hub dataset name (needs a network).")
    format: Literal["auto", "messages", "alpaca", "sharegpt", "input_output", "prompt_completion", "text", "oasst"] = _f(
        "auto", "Record format; auto detects it from the records. `text` trains on every token; `oasst` parses "
                "`### Human: ... ### Assistant: ...` text into turns.")
    columns: ColumnsConfig | None = _f(None, "Key names of this dataset's records where they differ from the defaults, "
                                             "e.g. `{instruction: question, output: answer}`; keys: messages, role, content, "
                                             "system, tools, instruction, input, output, history, prompt, completion, text; "
                                             "for preference data also chosen, rejected, label.")
    split: str = _f("train", "Split to load from a hub dataset (ignored for local files).")
    max_samples: int = _f(0, "Read at most this many records (the first ones in file order); 0 reads all.")
    weight: float = _f(1.0, "Mixing weight: the dataset contributes round(weight x its size) samples per epoch "
                           "(0.5: a seeded random half; 2: every sample twice).")
    system: str | None = _f(None, "System message given to every conversation of this dataset that has none.")


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = _f([], "Training datasets, mixed by their weights.")
    eval_datasets: list[DatasetConfig] = _f([], "Held-out evaluation datasets (instead of eval_split).")
    eval_split: float = _f(0.0, "Hold out this fraction (0 < x < 1) or this many samples (x >= 1) of the training data "
                                "for evaluation, chosen with train.seed; 0 for none.")
    template: str = _f("auto", "Chat template: `auto` (the tokenizer's own; for a tokenizer without one, chatml when its markers are tokens of the vocabulary, else guanaco's plain-text markers), a built-in name (llama3, chatml, "
                               "mistral, gemma, phi3, zephyr, plain, alpaca, vicuna, guanaco), or a path to a .jinja file.")
    template_variables: dict[str, Union[str, int, float, bool]] = _f(
        {}, "Extra variables the chat template reads, as `apply_chat_template(**kwargs)` passes them (e.g. "
            "`enable_thinking: false` for Qwen3, `date_string: 26 Jul 2024` for Llama 3.2, whose template otherwise "
            "writes today's date); saved with the run and used by chat and serve too.")
    max_length: int = _f(1024, "Cutoff length in tokens of one training sequence (and of a packed row).")
    source_max_length: int = _f(0, "qlora.py's source_max_len: keep at most this many prompt tokens (those before the "
                                   "first trained token; the ones nearest the answer are kept); 0: no separate limit.")
    target_max_length: int = _f(0, "qlora.py's target_max_len: keep at most this many tokens from the first trained token "
                                   "on (the end is cut); 0: no separate limit.")
    truncation: Literal["prompt_first", "end", "drop"] = _f(
        "prompt_first", "Samples longer than max_length: `prompt_first` shortens the prompt (keeping BOS and at least "
                        "max_length/4 of it) then cuts the end; `end` cuts the end; `drop` drops them. Counts are reported.")
    train_on: Literal["assistant", "all", "last"] = _f("assistant", "Which tokens carry loss: assistant turns, every token, or the last assistant turn.")
    pack: bool = _f(False, "Pack several samples into each row of up to max_length tokens; attention never crosses samples.")
    group_by_length: bool = _f(False, "Unpacked alternative to packing: batch samples of similar length together (less padding).")
    cache: bool = _f(True, "Cache tokenized datasets in $LORATUNE_CACHE/data, keyed by file contents, config and tokenizer.")
    num_proc: int = _f(0, "Processes used to render and tokenize large datasets; 0 picks automatically, 1 disables.")
    streaming: bool = _f(False, "Hub datasets: stream records instead of downloading the dataset first (local files are always read row by row).")


@dataclass
class BenchmarkEvalConfig:
    """A multiple-choice benchmark scored during training (train.eval_benchmark), as `loratune eval` scores it."""

    path: Union[str, None] = _f(None, "The questions: the MMLU release folder (`test/`, `dev/` with "
                                      "`SUBJECT_test.csv`), a folder of such CSVs, a .csv/.json/.jsonl/.parquet file, "
                                      "or a hub dataset (as `loratune eval`'s `mc[].path`); null: no benchmark.")
    name: str = _f("benchmark", "Name of the benchmark in metrics.jsonl, the summary and the model card.")
    split: str = _f("test", "Split scored: the folder `SPLIT/` and files `*_SPLIT.csv` of the MMLU layout, or the hub "
                            "split.")
    dev_split: str = _f("dev", "Split the few-shot examples come from (next to `path`).")
    hub_config: Union[str, None] = _f(None, "Hub dataset configuration (e.g. `all` for cais/mmlu).")
    format: Literal["auto", "mmlu_csv", "records"] = _f(
        "auto", "`mmlu_csv`: headerless CSV rows (question, choices, answer letter); `records`: one record per "
                "question with the keys of `columns`; `auto`: as `loratune eval` decides.")
    columns: dict[str, Union[str, list[str]]] = _f(
        {}, "Key names of a record where they differ from question, choices, answer, subject, id (as "
            "`loratune eval`'s `mc[].columns`).")
    shots: int = _f(5, "Few-shot examples before each question: the first N of its subject's dev split (paper: MMLU "
                       "5-shot).")
    style: Literal["letters", "cloze"] = _f(
        "letters", "`letters`: choices listed as `A. ...`, scored as ` A`, ` B`, ...; `cloze`: each choice's own "
                   "text (lm-evaluation-harness's `mmlu` and `mmlu_continuation`).")
    limit: int = _f(0, "Score at most the first N questions of each subject; 0: all.")
    every: int = _f(0, "Score every N optimizer steps; 0: whenever the eval loss is evaluated (train.eval_every, "
                       "else at each checkpoint). Always at the start of a fresh run and at the end.")
    batch_size: int = _f(8, "Contexts scored together.")
    max_length: int = _f(0, "Longest context + answer in tokens (contexts cut from the left beyond it); 0: the "
                            "model's context length.")


@dataclass
class TrainConfig:
    method: Literal["sft", "dpo", "orpo", "simpo", "kto", "rm"] = _f(
        "sft", "Training objective: `sft` (supervised: next-token loss on the trained turns), or a preference method on "
               "pairs of a prompt with a chosen and a rejected answer, `dpo` (with its variants, preference.loss), `orpo`, "
               "`simpo`; or `kto` on completions labelled desirable or not; or `rm`, a reward model (a scalar head on the "
               "base + LoRA, pairwise loss, saved beside the adapter as reward_head.safetensors). Options in the "
               "`preference` section. The reference policy of dpo and kto is the base model with the adapter disabled (no second copy). The loss "
               "is normalised per pair (per completion for kto) over each optimizer step.")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 to run `epochs` epochs.")
    batch_size: Union[Literal["auto"], int] = _f(
        1, "Samples per micro-batch with train.batching padded. With padding_free batching (the default) it sets "
           "how many samples an optimizer step trains on (batch_size x grad_accum) and, with "
           "train.tokens_per_batch auto, the token budget of a micro-batch (batch_size x data.max_length). `auto`: "
           "the largest that fits, from the memory plan printed at the start (`loratune plan`): on a GPU the "
           "estimate stays under 90% of its free memory; on CPU under 90% of the available RAM, at most 8 (larger "
           "CPU batches give no more tokens/s). A resumed run keeps its checkpoint's batch size.")
    grad_accum: int = _f(16, "An optimizer step trains on batch_size x grad_accum samples (paper: effective batch 16). "
                             "Padded batching: micro-batches accumulated per step. Padding-free: the step's samples "
                             "are cut into micro-batches of at most train.tokens_per_batch tokens, so a step runs as "
                             "many micro-batches as their tokens need (often fewer than grad_accum).")
    devices: Union[Literal["auto"], int] = _f(
        "auto", "Processes (GPUs) training together, data parallel. auto: as many as the launcher started "
                "(`torchrun --nproc-per-node N -m loratune train ...` or `accelerate launch --multi_gpu --num_processes "
                "N -m loratune train ...`), 1 without one. A number must equal the launched world size. Each process takes "
                "grad_accum of the step's index lists: a step trains on batch_size x grad_accum x devices samples, the "
                "same samples in the same order, normalised the same, as one process with grad_accum x devices. "
                "docs/multi-gpu.md")
    strategy: Literal["auto", "ddp", "fsdp"] = _f(
        "auto", "How several processes share the work. `ddp`: each holds a full copy of the (quantized) base, the "
                "adapters' gradients are all-reduced once per step. `fsdp`: FSDP2 shards the 4-bit base, adapters, "
                "gradients and optimizer states over the processes (loratune's decoder, train.method sft). auto: ddp "
                "when a full 4-bit copy and the activations fit one GPU (the memory plan), else fsdp. docs/multi-gpu.md")
    fsdp_offload: bool = _f(
        False, "With train.strategy fsdp: keep each process's shards of the weights, their gradients and the optimizer "
               "states in host memory (PyTorch's CPUOffloadPolicy; the optimizer steps on the CPU). Less GPU memory, "
               "slower steps.")
    batching: Literal["padding_free", "padded"] = _f(
        "padding_free", "How a step's samples reach the model. Either way an optimizer step trains on batch_size x "
                        "grad_accum samples (the effective batch), in the same order, with the loss normalised per "
                        "supervised token over the whole step. `padding_free`: the step's samples are laid end to end "
                        "with their boundaries (attention and labels never cross samples) in micro-batches of at most "
                        "train.tokens_per_batch tokens, so no compute goes to padding. `padded`: micro-batches of "
                        "batch_size samples, each padded to the longest.")
    tokens_per_batch: Union[Literal["auto"], int] = _f(
        "auto", "Padding-free batching only: the token budget of one micro-batch (its memory is planned for this "
                "many tokens). `auto`: batch_size x data.max_length, the size of the padded micro-batch it replaces. "
                "At least data.max_length. It decides how a step's samples are cut into micro-batches (memory and "
                "speed), not which samples a step trains on (batch_size x grad_accum). Ignored with train.batching "
                "padded.")
    lr: float = _f(2e-4, "Peak learning rate (paper: 2e-4 for 7B and 13B, 1e-4 for 33B and 65B).")
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw", "galore_adamw", "apollo_adamw",
                       "adam_mini", "badam"] = _f(
        "paged_adamw_32bit", "Optimizer; paged variants spill state to host memory under memory pressure (paper: paged "
                             "AdamW 32-bit). For full fine-tuning (adapter.type none; freeze too, except badam), the "
                             "memory-efficient ones, each from its package (`pip install 'loratune[optim]'`): "
                             "`galore_adamw` (GaLore: Adam on a rank-train.optim_rank SVD projection of each "
                             "attention/MLP weight's gradient), `apollo_adamw` (APOLLO: a random projection's Adam "
                             "gives the gradient a per-channel scale), `adam_mini` (Adam-mini: one second moment per "
                             "head or neuron), `badam` (BAdam: one decoder layer trains at a time, the next every "
                             "train.badam_switch_every steps). loratune.train.memopt")
    optim_rank: int = _f(16, "galore_adamw, apollo_adamw: rank of the gradient projection.")
    optim_update_proj_gap: int = _f(200, "galore_adamw, apollo_adamw: steps between recomputations of the "
                                         "projection (GaLore paper: 200).")
    optim_scale: Union[Literal["auto"], float] = _f(
        "auto", "galore_adamw, apollo_adamw: scale of the projected update; auto: 0.25 for GaLore (paper), 1.0 for "
                "APOLLO.")
    optim_modules: list[str] = _f(["self_attn", "mlp"], "galore_adamw, apollo_adamw: the 2-D weights inside modules "
                                                        "of these names (a part of the parameter's dotted name) are "
                                                        "projected; the other parameters step as plain AdamW.")
    apollo_scale_type: Literal["channel", "tensor"] = _f("channel", "apollo_adamw: one gradient scale per channel "
                                                                    "(APOLLO) or per tensor (APOLLO-Mini, with "
                                                                    "optim_rank 1).")
    badam_switch_every: int = _f(50, "badam: optimizer steps between switches of the trained decoder layer.")
    badam_switch_mode: Literal["descending", "ascending"] = _f("descending", "badam: the order in which the decoder "
                                                                             "layers take turns (descending: last "
                                                                             "layer first).")
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to biases and norms).")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    scheduler: Literal["constant", "linear", "cosine"] = _f("constant", "Learning-rate schedule after warmup (paper: constant).")
    warmup_ratio: float = _f(0.03, "Fraction of steps spent warming the learning rate up from 0 (paper: 0.03).")
    warmup_steps: int = _f(0, "Warmup in optimizer steps; when > 0 it replaces warmup_ratio.")
    loraplus_ratio: float = _f(0.0, "LoRA+: learning rate of the B matrices = lr x this ratio (e.g. 16); 0 disables.")
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (paper: 0.3); 0 disables clipping.")
    gradient_checkpointing: Union[Literal["auto"], bool] = _f("auto", "Non-reentrant activation checkpointing: true, false, or auto (on for 4- and 8-bit bases).")
    seed: int = _f(42, "Seed for weights init, data order and dropout.")
    neftune_alpha: float = _f(0.0, "NEFTune (Jain et al. 2023; train.method sft): uniform noise of magnitude "
                                   "alpha/sqrt(L x hidden) (L: the sample's length) added to the input embeddings "
                                   "in training only, never at evaluation, sampling, chat or serve; paper: 5. "
                                   "0 disables.")
    s2_attn: bool = _f(False, "Shifted sparse attention (S²-Attn, LongLoRA: Chen et al. 2023) in training only: "
                              "each sample attends within groups of train.s2_attn_group tokens, half of the heads "
                              "with the groups shifted by half a group (so information flows between groups); "
                              "evaluation, sampling, chat and serve use full attention. Cuts attention work on "
                              "long samples. Needs loratune's decoder (refused on the transformers fallback); "
                              "runs eagerly (no CUDA graphs). loratune.decoder.s2_attn")
    s2_attn_group: float = _f(0.25, "S²-Attn's group size: a fraction in (0, 1] of each sample's length (LongLoRA: "
                                    "1/4), or a whole number of tokens >= 2; a sample no longer than its group "
                                    "attends with plain causal attention.")
    log_every: int = _f(10, "Log metrics every N optimizer steps.")
    max_nonfinite: int = _f(5, "Stop after this many optimizer steps in a row skipped for a NaN/inf loss or gradient.")
    eval_every: int = _f(0, "Evaluate the loss on the eval split every N optimizer steps; 0: at each checkpoint and at the end. "
                            "Needs data.eval_split or data.eval_datasets.")
    early_stopping_patience: int = _f(0, "Stop after this many evaluations in a row that do not lower the best eval loss "
                                         "by early_stopping_min_delta; 0 disables early stopping.")
    early_stopping_min_delta: float = _f(0.0, "Smallest decrease of the eval loss that counts as an improvement.")
    save_every: int = _f(200, "Save a resumable checkpoint to output.dir/checkpoints every N optimizer steps (always at "
                              "the end too); 0: only at the end.")
    keep_last: int = _f(2, "Keep only the newest N checkpoints (the one with the best eval loss is kept besides); 0 keeps all.")
    resume: Union[Literal["auto", "off"], bool, str] = _f(
        "auto", "`auto` (or true): continue an unfinished run in output.dir from its newest complete checkpoint, else "
                "start; `off` (or false): always start afresh; or the path of a checkpoint (or of a run folder) to continue from.")
    allow_config_change: bool = _f(False, "Resume even though the config or the training data differ from the checkpoint's "
                                          "(the differences are printed).")
    deterministic: bool = _f(False, "Use only deterministic algorithms (torch.use_deterministic_algorithms): runs and "
                                    "resumed runs give bit-identical adapters on CPU; slower on GPU.")
    tensorboard: bool = _f(False, "Also write TensorBoard logs to output.dir/tensorboard (needs the tensorboard package).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(
        [], "Trackers that get every metrics.jsonl row (same steps, TensorBoard's names such as `train/loss`), the "
            "config and, at the end, the sample answers: `tensorboard` (as train.tensorboard), `wandb` (Weights & "
            "Biases; WANDB_MODE=offline keeps the run in output.dir/wandb), `mlflow` (MLFLOW_TRACKING_URI, else a "
            "local store in output.dir). wandb and mlflow need `pip install 'loratune[trackers]'`; one that "
            "cannot start is a warning. loratune.train.trackers")
    tracker_project: str = _f("loratune", "The wandb project and the MLflow experiment of train.report_to; the run "
                                          "is named after output.dir's folder.")
    plot: bool = _f(True, "Draw output.dir/loss.png (train and eval loss) at each evaluation and at the end (needs matplotlib).")
    eval_benchmark: BenchmarkEvalConfig = field(default_factory=BenchmarkEvalConfig, metadata={
        "help": "A multiple-choice benchmark scored during training, as the QLoRA paper did with MMLU (5-shot): its "
                "accuracies go to metrics.jsonl, loss.png, the summary and the model card. Off unless "
                "train.eval_benchmark.path is set; its keys are below."})


@dataclass
class PreferenceConfig:
    """Options of the preference methods (train.method dpo, orpo, simpo, kto); sources in loratune/pref/losses.py."""

    beta: Union[Literal["auto"], float] = _f(
        "auto", "The method's temperature: `auto` takes the paper default, DPO/IPO 0.1 (Rafailov et al. 2023; Azar et al. "
                "2023, their tau), KTO 0.1 (Ethayarajh et al. 2024), ORPO 0.1 (Hong et al. 2024, their lambda), SimPO 2.0 "
                "(Meng et al. 2024).")
    loss: Literal["sigmoid", "ipo", "robust"] = _f(
        "sigmoid", "DPO's loss (train.method dpo): `sigmoid` is DPO (conservative DPO with label_smoothing > 0), `ipo` "
                   "IPO (log-ratios averaged per token), `robust` robust DPO (Chowdhury et al. 2024; label_smoothing is the "
                   "assumed rate of flipped labels).")
    label_smoothing: float = _f(0.0, "Assumed probability that a pair's preference is flipped, in [0, 0.5): cDPO/robust DPO "
                                     "and SimPO; 0 for none.")
    simpo_gamma: float = _f(1.0, "SimPO's target reward margin gamma (the paper tunes gamma/beta near 0.5).")
    reference: Literal["adapter_disabled", "precomputed"] = _f(
        "adapter_disabled", "The reference log-probabilities of dpo and kto: `adapter_disabled` computes them in each "
                            "step (one more forward pass without gradient, the base with the adapter off); "
                            "`precomputed` computes them once for every sample before training (the same base, kept "
                            "in memory, recomputed when a run resumes), saving that pass in every later step.")
    desirable_weight: float = _f(1.0, "KTO: weight of the desirable completions' losses (paper: 1.0; raise it when "
                                      "desirable examples are rarer, keeping weight x count ratios within 1 to 4/3).")
    undesirable_weight: float = _f(1.0, "KTO: weight of the undesirable completions' losses (paper: 1.0).")


@dataclass
class OutputConfig:
    dir: str = _f("outputs/run", "Output folder: adapter, tokenizer, resolved config, metrics.")
    overwrite: bool = _f(False, "Allow writing into a non-empty output folder.")
    sample_prompts: list[str] = _f([], "Prompts answered (greedy, with the training chat template) before training starts and after it ends, to show what changed; printed and written to output.dir/samples.json. A resumed run keeps its first answers.")
    sample_max_new_tokens: int = _f(48, "New tokens generated per sample prompt.")
    adapter: Literal["last", "best"] = _f("last", "Weights written to output.dir at the end: the last step's, or the "
                                                  "checkpoint with the lowest eval loss (a checkpoint is then also saved "
                                                  "at each evaluation that improves it).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (dicts become dataclasses)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        suggestion = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean {suggestion[0]!r}?)" if suggestion else ""
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
        return [_coerce(v, get_args(tp)[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
        return {str(k): _coerce(v, get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
        return _build(tp, value, key)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{key}': {hint}allowed here: {', '.join(names)}")
        kwargs[k] = _coerce(v, hints[k], key)
    for f in dataclasses.fields(cls):  # absent sections are built from {} so their required keys are checked
        if f.name not in kwargs and dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], {}, f"{prefix}.{f.name}" if prefix else f.name)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        if getattr(obj, f.name) == REQUIRED:
            raise ConfigError(f"config key '{prefix + '.' if prefix else ''}{f.name}' is required: {f.metadata['help']}")
    return obj


def apply_override(data: dict, override: str) -> None:
    """Apply one `dotted.key=value` override to the raw mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form dotted.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{'.'.join(parts[:i])}' has no item {part}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
    value = yaml.safe_load(raw) if raw.strip() else ""
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) > len(node):
            raise ConfigError(f"override '{dotted}': index {last} is out of range")
        node[int(last):int(last) + 1] = [value]
    else:
        node[last] = value


def read_yaml(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The raw mapping of a YAML config file (empty without one) with `dotted.key=value` overrides applied; shared
    by every config loaded the same way (`load_config`, `loratune.eval.config.load_eval_config`)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply overrides, validate, and return the typed `Config`."""
    cfg = _build(Config, read_yaml(path, overrides))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values and combinations that cannot work, naming the keys involved."""
    if cfg.model.rope_scaling is not None:
        from loratune.model.rope_scaling import check_rope_scaling

        check_rope_scaling(cfg.model.rope_scaling)
    q, a, t, d = cfg.quantization, cfg.adapter, cfg.train, cfg.data
    from loratune.model.lora_init import check_init

    check_init(a.init, q.bits, a.type, t.method, t.strategy)
    checks = [
        (q.bits in (2, 3) and q.method != "hqq", f"quantization.bits {q.bits} needs quantization.method hqq"),
        (q.method == "hqq" and q.bits > 8, f"quantization.method hqq needs quantization.bits 2, 3, 4 or 8, got {q.bits}"),
        (q.group_size < 1, f"quantization.group_size must be >= 1, got {q.group_size}"),
        (a.init == "loftq" and q.method == "hqq", "adapter.init loftq absorbs bitsandbytes' NF4 quantization error: "
                                                  "it needs quantization.method bitsandbytes"),
        (q.method == "hqq" and q.bits <= 8 and t.strategy == "fsdp",
         "quantization.method hqq does not run under train.strategy fsdp (HQQ's packed weights are not sharded): use "
         "train.strategy ddp"),
        (a.type == "none" and q.bits in (2, 3, 4, 8),
         f"adapter.type 'none' (full fine-tuning) needs quantization.bits 16 or 32, got {q.bits}: quantized weights cannot be trained"),
        (a.eva_rho < 1, f"adapter.eva_rho must be >= 1, got {a.eva_rho}"),
        (a.type == "freeze" and q.bits in (2, 3, 4, 8),
         f"adapter.type 'freeze' (freeze-tuning) needs quantization.bits 16 or 32, got {q.bits}: quantized weights cannot be trained"),
        (a.type == "freeze" and (a.freeze_layers < 0 or (a.freeze_layers == 0 and not a.freeze_modules)),
         f"adapter.type 'freeze' needs adapter.freeze_layers > 0 or adapter.freeze_modules, got {a.freeze_layers} and "
         f"{a.freeze_modules}"),
        (a.rank < 1, f"adapter.rank must be >= 1, got {a.rank}"),
        (a.alpha <= 0, f"adapter.alpha must be > 0, got {a.alpha}"),
        (not 0 <= a.dropout < 1, f"adapter.dropout must be in [0, 1), got {a.dropout}"),
        (isinstance(a.target_modules, list) and not a.target_modules, "adapter.target_modules is an empty list; use 'all-linear' or name modules"),
        (t.lr <= 0, f"train.lr must be > 0, got {t.lr}"),
        (t.batch_size != "auto" and t.batch_size < 1, f"train.batch_size must be >= 1 or auto, got {t.batch_size}"),
        (t.grad_accum < 1, f"train.grad_accum must be >= 1, got {t.grad_accum}"),
        (t.devices != "auto" and t.devices < 1, f"train.devices must be >= 1 or auto, got {t.devices}"),
        (t.max_steps == 0 or (t.max_steps < 0 and t.epochs <= 0), "set train.max_steps > 0 or train.epochs > 0"),
        (not 0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}"),
        (t.max_grad_norm < 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}"),
        (t.warmup_steps < 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}"),
        (t.loraplus_ratio < 0, f"train.loraplus_ratio must be >= 0, got {t.loraplus_ratio}"),
        (t.loraplus_ratio > 0 and a.type != "lora", "train.loraplus_ratio needs LoRA adapters (adapter.type lora)"),
        (t.max_nonfinite < 1, f"train.max_nonfinite must be >= 1, got {t.max_nonfinite}"),
        (t.neftune_alpha < 0, f"train.neftune_alpha must be >= 0, got {t.neftune_alpha}"),
        (not (0 < t.s2_attn_group <= 1 or (t.s2_attn_group > 1 and float(t.s2_attn_group).is_integer())),
         f"train.s2_attn_group must be a fraction in (0, 1] of the sample length or a whole number of tokens >= 2, "
         f"got {t.s2_attn_group}"),
        (t.log_every < 1, f"train.log_every must be >= 1, got {t.log_every}"),
        (t.tokens_per_batch != "auto" and t.tokens_per_batch < d.max_length,
         f"train.tokens_per_batch must be auto or at least data.max_length ({d.max_length}, the longest sample), "
         f"got {t.tokens_per_batch}"),
        *_train_checks(cfg),
        *_memopt_checks(cfg),
        *_preference_checks(cfg),
        (d.max_length < 8, f"data.max_length must be >= 8, got {d.max_length}"),
        *_data_checks(d),
    ]
    for bad, message in checks:
        if bad:
            raise ConfigError(message)


def _train_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Impossible values in the train section's evaluation, checkpoint and resume keys."""
    t, has_eval = cfg.train, cfg.data.eval_split > 0 or bool(cfg.data.eval_datasets)
    return [
        *[(getattr(t, k) < 0, f"train.{k} must be >= 0, got {getattr(t, k)}")
          for k in ("eval_every", "early_stopping_patience", "early_stopping_min_delta", "save_every", "keep_last")],
        (t.early_stopping_patience > 0 and not has_eval,
         "train.early_stopping_patience needs an eval split: set data.eval_split or data.eval_datasets"),
        (cfg.output.adapter == "best" and not has_eval,
         "output.adapter 'best' needs an eval split: set data.eval_split or data.eval_datasets"),
        (isinstance(t.resume, str) and not t.resume.strip(), "train.resume must be auto, off, or a path"),
        *_benchmark_checks(t.eval_benchmark),
    ]


def _memopt_checks(cfg: Config) -> list[tuple[bool, str]]:
    """The memory-efficient optimizers' keys and combinations (loratune.train.memopt)."""
    from loratune.train.memopt import check_memory_efficient

    t = cfg.train
    return [
        *[(getattr(t, k) < 1, f"train.{k} must be >= 1, got {getattr(t, k)}")
          for k in ("optim_rank", "optim_update_proj_gap", "badam_switch_every")],
        (t.optim_scale != "auto" and t.optim_scale <= 0, f"train.optim_scale must be > 0 or auto, got {t.optim_scale}"),
        (not t.optim_modules, "train.optim_modules is empty: name the modules whose weights are projected"),
        *check_memory_efficient(t.optimizer, cfg.adapter.type, t.strategy),
    ]


def _benchmark_checks(b: BenchmarkEvalConfig) -> list[tuple[bool, str]]:
    """Impossible values in train.eval_benchmark."""
    if b.path is None:
        return []
    keys = {"question", "choices", "answer", "subject", "id"}
    return [
        *[(getattr(b, k) < 0, f"train.eval_benchmark.{k} must be >= 0, got {getattr(b, k)}")
          for k in ("shots", "limit", "every", "max_length")],
        (b.batch_size < 1, f"train.eval_benchmark.batch_size must be >= 1, got {b.batch_size}"),
        *[(k not in keys, f"train.eval_benchmark.columns: unknown key {k!r}; expected some of {', '.join(sorted(keys))}")
          for k in b.columns],
    ]


def _preference_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Impossible values for the preference methods."""
    p, m = cfg.preference, cfg.train.method
    if m == "sft":
        return []
    return [
        (p.beta != "auto" and p.beta <= 0, f"preference.beta must be > 0 or auto, got {p.beta}"),
        (not 0 <= p.label_smoothing < 0.5, f"preference.label_smoothing must be in [0, 0.5), got {p.label_smoothing}"),
        (p.desirable_weight <= 0 or p.undesirable_weight <= 0, "preference.desirable_weight and undesirable_weight "
                                                                "must be > 0"),
        (cfg.data.pack, f"data.pack does not apply to train.method {m}: each pair (or completion) is laid out with "
                        "its own boundaries already; set data.pack false"),
        (m in ("dpo", "kto") and cfg.adapter.type != "lora",
         f"train.method {m} needs a reference policy, the base with the adapter disabled: use adapter.type lora"),
        *[(ds.format != "auto", f"data.{g}.{i}.format is {ds.format!r}: preference data is read by its keys "
                                "(prompt/chosen/rejected, or prompt/completion/label for kto); leave format auto")
          for g in ("datasets", "eval_datasets") for i, ds in enumerate(getattr(cfg.data, g))],
    ]


def _data_checks(d: DataConfig) -> list[tuple[bool, str]]:
    """Impossible combinations in the data section."""
    checks = [
        (d.eval_split < 0, f"data.eval_split must be >= 0, got {d.eval_split}"),
        (d.eval_split >= 1 and d.eval_split != int(d.eval_split),
         f"data.eval_split must be a fraction below 1 or a whole number of samples, got {d.eval_split}"),
        (d.eval_split > 0 and bool(d.eval_datasets), "set either data.eval_split or data.eval_datasets, not both"),
        (d.source_max_length < 0, f"data.source_max_length must be >= 0, got {d.source_max_length}"),
        (d.target_max_length < 0, f"data.target_max_length must be >= 0, got {d.target_max_length}"),
        (d.pack and d.group_by_length, "data.pack and data.group_by_length exclude each other: packed rows are all "
                                       "about max_length long; choose one"),
        (d.num_proc < 0, f"data.num_proc must be >= 0, got {d.num_proc}"),
    ]
    for group, items in (("datasets", d.datasets), ("eval_datasets", d.eval_datasets)):
        for i, ds in enumerate(items):
            checks += [(ds.weight <= 0, f"data.{group}.{i}.weight must be > 0, got {ds.weight}"),
                       (ds.max_samples < 0, f"data.{group}.{i}.max_samples must be >= 0, got {ds.max_samples}")]
    return checks


def to_dict(cfg: Any) -> dict:
    """The config as plain data (for YAML output and hashing)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------- reference


def reference_markdown() -> str:
    """Markdown reference of every key, its type, default and meaning, generated from the schema."""
    return schema_markdown(Config, "Configuration reference", [
        "Generated from `src/loratune/config.py` by `loratune config-docs`; do not edit by hand.",
        "Every key can be set in the YAML file or overridden on the command line as `section.key=value`."])


def schema_markdown(root: type, title: str, intro: list[str]) -> str:
    """Markdown reference of a config schema `root` (a dataclass of sections, or of keys and sections): one
    table per section, nested sections after their parent."""
    lines = [f"# {title}", "", *intro, ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        nested = []
        lines.extend([f"## `{prefix}`" if prefix else "## Top level", "", "| key | type | default | meaning |",
                      "|---|---|---|---|"])
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = get_args(tp)[0] if get_origin(tp) is list else tp
            if dataclasses.is_dataclass(inner):
                nested.append((inner, (f"{prefix}.{f.name}" if prefix else f.name) + ("[]" if inner is not tp else "")))
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = "(below)" if dataclasses.is_dataclass(default) else "required" if default == REQUIRED else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
            lines.append(f"| `{f.name}` | {_type_name(tp)} | {shown} | {f.metadata.get('help', '')} |")
        lines.append("")
        for cls_, pre in nested:
            section(cls_, pre)

    hints = typing.get_type_hints(root)
    if all(dataclasses.is_dataclass(hints[f.name]) for f in dataclasses.fields(root)):  # sections only (training)
        for f in dataclasses.fields(root):
            section(hints[f.name], f.name)
    else:  # keys and sections at the top level (eval)
        section(root, "")
    return "\n".join(lines)
