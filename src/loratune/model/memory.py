"""Memory planning: the peak memory of a training run, estimated from the model's config before loading it.

Why: an out-of-memory error an hour into a run (or after ten minutes of loading and tokenizing) is the
most common way a fine-tune fails. Everything that decides the peak is known before a single weight is
read: the architecture (config.json), the precision, the adapters, the optimizer, the micro-batch. So
`loratune plan` and the start of every `loratune train` print the estimate component by component,
`train.batch_size: auto` picks the largest micro-batch that fits, and a run that would not fit stops
with a message saying what to change. `estimate()` is a pure function (the benchmark calls it to put
"planned" beside "measured"); `plan_run()` is the part that looks at the machine.

The estimate is of `torch.cuda.max_memory_allocated` (what the benchmark measures), in bytes, with
T the tokens of the largest micro-batch: train.tokens_per_batch for padding-free batches (auto: batch_size x
max_length), batch_size x max_length for padded ones (the worst case: padding to the longest row),
n = the parameters of the decoder's linear layers, H hidden, I intermediate, q/kv the query and
key-value widths, V vocabulary, L layers, a = bytes of the compute dtype, e = of the 16/32-bit weights:

  weights      NF4: n/2, plus constants per 64-value block: fp32 absmax (4 B), or with double
               quantization a uint8 absmax (1 B) + one fp32 absmax per 256 blocks + a 256-entry code;
               HQQ (quantization.method hqq): n x bits / 8 (3-bit: ten per int32) + scale and zero per group, e each;
               8-bit: n + fp32 row scales; 16/32-bit: n x e. Embedding V x H x e, head the same unless
               tied; the decoder's frozen input embedding in host memory (model.embedding_on_host,
               `embed_on_host`) is none of the GPU's.
  adapters     LoRA: r (d_in + d_out) per adapted layer (+ d_out for DoRA), fp32 weights and gradients,
               AdamW states 8 B/param (2 B for the 8-bit variants). Full fine-tuning: every parameter,
               fp32 weights + gradients + states.
  activations  with checkpointing: the saved input of each layer, L x T x H x e, plus the working set
               of one layer's recompute and backward pass: T x a x (4H + 3q + 3kv + m I + 7r) with m = 4
               for the fused SwiGLU (gate and up, whose gradients its backward writes over them, their
               product and its gradient) or 6 for the plain MLP, plus
               dropout outputs and masks (T x d_in x (a + 1) per adapted layer) when adapter dropout > 0,
               plus the largest dequantized weight (d_in x d_out x a). Without checkpointing every layer
               keeps its saved tensors, L x T x (H e + a (3H + 3q + 3kv + (m-1) I + 7r)), and the working
               set is the gradient in flight, T x a x 2 (H + I).
  loss         (loratune.kernels.loss) rows in chunks of CHUNK_ELEMENTS / V: fp32 logits of one chunk,
               the previous chunk's (still referenced while the next is computed) and logsumexp's
               temporary, 3 x rows x V x 4 (2x with one chunk); plus 4 hidden-sized tensors (the final
               norm's input and output, the rows kept for the head, d(hidden)): 4 T H a.
  stock        the transformers + peft fallback runs the libraries' own modules (no fused kernel): the plain
               MLP (m = 6 above) and, per layer, peft's update of the largest adapted output (the base
               output's clone and the scaled update, 2 T d_out a) and the plain RMSNorms' fp32 copies (two
               norms, their fp32 input and normalised input: 16 T H). Counted from the modules' code, not yet
               measured on a GPU.
  attention    loratune's decoder on CPU attends through SDPA over the whole stream with a dense [T, T]
               sample mask (loratune.decoder.attention): the mask (T^2 bytes) and one layer's scores
               (heads x T^2 x a). On CUDA FlexAttention's block mask is made from a dense [T, T] bool mask
               while the first layer runs, and rows of one length repeat the kv heads for SDPA's causal
               kernel: max(T^2, 2 T q a) + T q a (the last term fitted on the measured peaks).
  overhead     cuBLAS workspaces and small buffers on CUDA; the Python process itself on CPU.

  graph pool   when micro-batches are replayed as CUDA graphs: the trainable parameters' gradients (held
               through the whole capture) + GRAPH_POOL x T x H x a (measured, below).

peak = weights + adapters + saved activations + max(loss, layer working set) + graph pool + overhead: the loss
(end of the forward pass) and the first layer's backward pass do not overlap; the larger is the peak.

Calibrated on peaks measured on a GPU with a transformers path whose modules loratune's fused kernels
replaced (removed since: loratune's decoder runs those kernels in its own modules; docs/benchmarks.md,
"Figures behind the source's design notes"; tests/model/test_memory.py replays them): the estimate errs on
the safe side, within +5%. The same formulas with the fused kernels plan loratune's decoder; the stock
transformers + peft fallback adds the `stock` term above. loratune's decoder (the default model code) is planned with
the same formulas, its embedding on the GPU and its attention's working set on CUDA (`_stream_attention`),
calibrated on its eager peaks measured on the H200 (Llama-3-8B shape, 2 x 2048 and 1 x 16384, tests/model/
test_memory_decoder.py replays them): also within +5%. Where its streams are graphed (`Resolved.graphs`) the
graph pool is the term measured on that earlier transformers path, not yet on the decoder. Not modelled: the
paged optimizers' states live in managed memory and can spill to the host (counted as if on the GPU);
architectures without Llama-style fields (hidden_size, intermediate_size, ...) are refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loratune.config import Config
from loratune.errors import ConfigError, LoratuneError, ModelError
from loratune.kernels.graphs import graphs_wanted
from loratune.kernels.loss import CHUNK_ELEMENTS
from loratune.model.hqq_base import PACKED_BITS, bytes_per_weight
from loratune.model.resolve import Resolved, checkpointing_on, decide

log = logging.getLogger(__name__)

GiB = 2**30
NF4_BLOCK = 64  # values per absmax (bitsandbytes' 4-bit blocksize)
DQ_BLOCK = 256  # absmax values per second-level absmax (double quantization)
# A micro-batch replayed as a CUDA graph (loratune.kernels.graphs) peaks higher than the same micro-batch
# run eagerly. What is alive at the two peaks (benchmarks/memory_peak.py): during
# the capture every trainable parameter's gradient exists from the start (the graph accumulates into fixed
# tensors; eagerly they appear layer by layer in the backward pass), plus a few activation-sized buffers the
# capture keeps: fitted on measured graphed peaks (docs/benchmarks.md), between 4.2 and 5.2 x tokens x hidden x
# 2 bytes beyond the gradients; 5 is used.
GRAPH_POOL = 5
CUDA_OVERHEAD = 96 * 2**20  # cuBLAS/cuBLASLt workspaces, rotary tables, small buffers (calibrated)
CPU_OVERHEAD = 1 * GiB  # the Python process with torch and transformers imported
SAFETY = 0.90  # batch_size auto keeps the estimate under this fraction of the free memory
MAX_AUTO_BATCH = {"cuda": 256, "cpu": 8}  # CPU: larger micro-batches give no more tokens/s
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class WouldNotFit(LoratuneError):
    """The run's estimated peak memory exceeds what the device has free; `plan` says where it goes."""

    def __init__(self, message: str, plan: MemoryPlan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True)
class Shape:
    """The architecture facts the estimate needs, read from a transformers config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    attention_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear layer of one decoder layer (Llama-style attention + gated MLP)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in need if getattr(c, k, None) is None]
        if missing:
            raise ModelError(f"cannot plan memory for model type {getattr(c, 'model_type', '?')!r}: its config has "
                             f"no {', '.join(missing)} (the planner knows Llama-style decoders)")
        heads = c.num_attention_heads
        return cls(vocab=c.vocab_size, hidden=c.hidden_size, intermediate=c.intermediate_size,
                   layers=c.num_hidden_layers, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   tied=bool(getattr(c, "tie_word_embeddings", False)),
                   attention_bias=bool(getattr(c, "attention_bias", False)))


@dataclass(frozen=True)
class Component:
    name: str
    bytes: int
    detail: str
    counted: bool = True  # False: a transient that is not live at the peak (the other one is larger)


@dataclass(frozen=True)
class MemoryPlan:
    components: tuple[Component, ...]
    batch_size: int
    seq_len: int
    device: str
    tokens: int = 0  # the micro-batch's tokens (0: batch_size x seq_len)
    padding_free: bool = False

    @property
    def shape_text(self) -> str:
        """'4 x 256 tokens' (padded), '4 x 256 tokens, padding-free' (the same budget laid end to end) or
        '3,000 tokens, padding-free' (an explicit train.tokens_per_batch)."""
        tokens = self.tokens or self.batch_size * self.seq_len
        if not self.padding_free:
            return f"{self.batch_size} x {self.seq_len:,} tokens"
        if tokens == self.batch_size * self.seq_len:
            return f"{self.batch_size} x {self.seq_len:,} tokens, padding-free"
        return f"{tokens:,} tokens, padding-free"

    @property
    def total(self) -> int:
        return sum(c.bytes for c in self.components if c.counted)

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def get(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


# ------------------------------------------------------------------------------------------ pieces


def _dtype_bytes(name: str, device: str) -> int:
    """Bytes of the compute dtype: `auto` is bf16 on a GPU and fp32 on CPU (as loratune.model.quant)."""
    if name == "auto":
        return 2 if device == "cuda" else 4
    return {"bf16": 2, "fp16": 2, "fp32": 4}[name]


def nf4_bytes(n: int, double_quant: bool) -> tuple[int, int]:
    """(packed 4-bit values, quantization constants) in bytes for one weight of n values."""
    blocks = math.ceil(n / NF4_BLOCK)
    code = 16 * 4  # the 16-entry NF4 code, fp32
    if not double_quant:
        return math.ceil(n / 2), blocks * 4 + code
    return math.ceil(n / 2), blocks + math.ceil(blocks / DQ_BLOCK) * 4 + 256 * 4 + 4 + code


def adapted_layers(cfg: Config, shape: Shape) -> dict[str, tuple[int, int]]:
    """The linear layers of one decoder layer that get LoRA adapters (all of them for unknown names)."""
    linears = shape.linears()
    targets = cfg.adapter.target_modules
    names = list(linears) if targets == "all-linear" else [n for n in linears if n in targets]
    if targets != "all-linear" and any(t not in linears for t in targets):
        names = list(linears)  # names this planner does not know: assume the worst case
    return {n: linears[n] for n in names if n not in cfg.adapter.exclude_modules}


def lora_params(cfg: Config, shape: Shape) -> int:
    """r (d_in + d_out) per adapted layer (+ d_out magnitudes for DoRA), over all layers."""
    per_layer = sum(cfg.adapter.rank * (i + o) + (o if cfg.adapter.dora else 0)
                    for i, o in adapted_layers(cfg, shape).values())
    return per_layer * shape.layers


def _weights(cfg: Config, shape: Shape, device: str, embed_on_host: bool, e: int) -> list[Component]:
    q, full = cfg.quantization, cfg.adapter.type in ("none", "freeze")  # freeze: planned as full (an upper bound)
    mats = [i * o for i, o in shape.linears().values()]
    n = sum(mats) * shape.layers
    if q.method == "hqq" and q.bits <= 8 and not full:  # packed values + a scale and zero per group, compute dtype
        per = bytes_per_weight(q.bits, q.group_size, e)
        dec = [Component("decoder weights", int(n * PACKED_BITS[q.bits] / 8),
                         f"{q.bits}-bit HQQ, {_count(n)} parameters"),
               Component("quantization constants", int(n * (per - PACKED_BITS[q.bits] / 8)),
                         f"{8 * e}-bit scale and zero per {q.group_size} values")]
    elif q.bits == 4 and not full:
        packed = consts = 0
        for m in mats:
            p, c = nf4_bytes(m, q.double_quant)
            packed, consts = packed + p, consts + c
        kind = f"{q.quant_type.upper()} 4-bit"
        consts_detail = f"absmax per {NF4_BLOCK} values, " + ("double-quantized (8-bit + fp32 per 256 blocks)"
                                                               if q.double_quant else "fp32")
        dec = [Component("decoder weights", packed * shape.layers, f"{kind}, {_count(n)} parameters"),
               Component("quantization constants", consts * shape.layers, consts_detail)]
    elif q.bits == 8 and not full:
        rows = sum(o for _, o in shape.linears().values()) * shape.layers
        dec = [Component("decoder weights", n, f"int8 (LLM.int8), {_count(n)} parameters"),
               Component("quantization constants", rows * 4, "fp32 scale per output row")]
    else:
        dec = [Component("decoder weights", n * e, f"{8 * e}-bit, {_count(n)} parameters")]
    emb = shape.vocab * shape.hidden
    bias = shape.layers * (shape.q_dim + 2 * shape.kv_dim) if shape.attention_bias else 0
    other = ((2 * shape.layers + 1) * shape.hidden + bias) * e
    emb_detail = f"{shape.vocab:,} x {shape.hidden:,}, {8 * e}-bit"
    return dec + [
        Component("embedding", 0 if embed_on_host else emb * e,
                  emb_detail + (f"; in host memory ({_size(emb * e)} there)" if embed_on_host else "")),
        Component("output head", 0 if shape.tied else emb * e, "tied to the embedding" if shape.tied else emb_detail),
        Component("norms and biases", other, f"{8 * e}-bit"),
    ]


def _trainable(cfg: Config, shape: Shape) -> tuple[list[Component], int, str]:
    """Adapter (or full) weights, gradients and optimizer states; returns also the count and its detail."""
    eight_bit = cfg.train.optimizer in ("paged_adamw_8bit", "adamw_8bit")
    state = 2 if eight_bit else 8
    if cfg.adapter.type in ("none", "freeze"):
        emb = shape.vocab * shape.hidden * (1 if shape.tied else 2)
        n = sum(i * o for i, o in shape.linears().values()) * shape.layers + emb + (2 * shape.layers + 1) * shape.hidden
        what = f"full fine-tuning: all {_count(n)} parameters, fp32"
        comps = [Component("trainable weights (fp32 master copy)", 0, "counted as the decoder weights above")]
    else:
        n = lora_params(cfg, shape)
        k = len(adapted_layers(cfg, shape))
        what = f"LoRA r={cfg.adapter.rank} on {k} layers x {shape.layers}: {_count(n)} parameters, fp32"
        comps = [Component("adapter weights", n * 4, what)]
    opt = cfg.train.optimizer + (" (managed memory, can spill to host)" if cfg.train.optimizer.startswith("paged") else "")
    grads, states, detail = n * 4, n * state, f"{opt}: {'2 x 8-bit' if eight_bit else '2 x fp32'}"
    if cfg.adapter.type in ("none", "freeze") and cfg.train.optimizer in ("galore_adamw", "apollo_adamw",
                                                                         "adam_mini", "badam"):
        grads, states, detail = _memory_efficient_states(cfg, shape, n)
    comps += [Component("gradients", grads, "fp32"), Component("optimizer states", states, detail)]
    return comps, n, what


def _memory_efficient_states(cfg: Config, shape: Shape, n: int) -> tuple[int, int, str]:
    """(gradient bytes, optimizer state bytes, detail) of full fine-tuning with train.optimizer galore_adamw,
    apollo_adamw (the attention/MLP matrices' moments in rank r: 2 x r x max(d_in, d_out), plus the r x
    min(d_in, d_out) projection; 2 x fp32 for the rest), adam_mini (one fp32 moment per weight, the second
    per head or neuron) or badam (one decoder layer: its fp32 copy, gradients and 2 x fp32 moments)."""
    t, mats = cfg.train, shape.linears().values()
    per_layer = sum(i * o for i, o in mats)
    if t.optimizer == "adam_mini":
        return n * 4, n * 4, "adam_mini: 1 x fp32 (the second moment per head / neuron, negligible)"
    if t.optimizer == "badam":
        layer = per_layer + 2 * shape.hidden
        return layer * 8, layer * 12, f"badam: one decoder layer ({_count(layer)}): fp32 copy + 2 x fp32"
    r = t.optim_rank
    low = sum(2 * r * max(i, o) + r * min(i, o) for i, o in mats) * shape.layers
    return n * 4, (low + 2 * (n - per_layer * shape.layers)) * 4, (
        f"{t.optimizer}: rank-{r} moments of the attention/MLP matrices, 2 x fp32 of the rest")


def _activations(cfg: Config, shape: Shape, tokens: int, a: int, e: int, fused_mlp: bool,
                 checkpointing: bool) -> tuple[Component, Component]:
    """(saved activations, working set of one layer's forward + backward)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    adapted = adapted_layers(cfg, shape) if cfg.adapter.type == "lora" else {}
    r = cfg.adapter.rank * len(adapted)  # the rank-r projections xa saved by each adapted layer
    drop = sum(d_in for d_in, _ in adapted.values()) * (a + 1) if cfg.adapter.dropout > 0 else 0
    m = 4 if fused_mlp else 6
    mlp = "fused SwiGLU" if fused_mlp else "plain MLP"
    largest = max(d_in * d_out for d_in, d_out in shape.linears().values())
    dequant = largest * a if cfg.quantization.bits <= 8 and cfg.adapter.type == "lora" else 0
    if checkpointing:
        saved = Component("saved activations", shape.layers * tokens * h * e,
                          f"checkpointing: the input of each layer, {shape.layers} x {tokens:,} tokens x {h:,}")
        per_token = a * (4 * h + 3 * q + 3 * kv + m * i + r) + drop
        return saved, Component("layer recompute + backward", tokens * per_token + dequant,
                                f"one layer's tensors and gradients ({mlp}"
                                + (", adapter dropout" if drop else "") + ")" + (", a dequantized weight" if dequant else ""))
    per_layer = e * h + a * (3 * h + 3 * q + 3 * kv + (m - 1) * i + r) + drop
    saved = Component("saved activations", shape.layers * tokens * per_layer,
                      f"no checkpointing: every layer's tensors, {shape.layers} x {tokens:,} tokens ({mlp})")
    return saved, Component("layer backward", tokens * a * 2 * (h + i) + dequant, "the gradient in flight")


def _loss(shape: Shape, tokens: int, a: int, head_trained: bool, chunk_elements: int = CHUNK_ELEMENTS) -> Component:
    rows = max(1, min(tokens, chunk_elements // shape.vocab))
    chunks = math.ceil(tokens / rows)
    logits = (2 if chunks == 1 else 3) * rows * shape.vocab * 4
    grad_w = shape.vocab * shape.hidden * 4 if head_trained else 0
    return Component("logits / loss", logits + 4 * tokens * shape.hidden * a + grad_w,
                     f"{chunks} chunk(s) of {rows:,} rows x {shape.vocab:,} fp32 logits, d(hidden)"
                     + (", fp32 head gradient" if grad_w else ""))


def _dense_attention(shape: Shape, tokens: int, a: int) -> Component:
    return Component("attention mask + scores", tokens * tokens * (1 + shape.heads * a),
                     f"SDPA over the stream: at most a [{tokens:,}, {tokens:,}] sample mask and one layer's scores")


def _stream_attention(shape: Shape, tokens: int, a: int) -> Component:
    """loratune's decoder on CUDA: FlexAttention's block mask is made from a dense [T, T] bool mask (T^2 bytes,
    while the first layer runs), rows of one length repeat the kv heads for SDPA (2 T q a): the larger, plus
    T q a (fitted: the decoder's measured peaks, docs/benchmarks.md 2026-12-02)."""
    return Component("attention (decoder)", max(tokens * tokens, 2 * tokens * shape.q_dim * a) + tokens * shape.q_dim * a,
                     f"FlexAttention's [{tokens:,}, {tokens:,}] mask build, or SDPA rows' repeated kv heads")


def fused_mlp_default(cfg: Config, device: str) -> bool:
    """Whether the SwiGLU MLPs run the fused kernel (loratune.kernels.norm_swiglu): loratune's decoder on CUDA with
    model.kernels on (`Resolved.fused_mlp` says it for a run)."""
    return device == "cuda" and cfg.model.kernels in ("auto", True)


def _stock_modules(cfg: Config, shape: Shape, tokens: int, a: int) -> Component:
    """What the transformers + peft fallback's own modules hold beyond the fused path's working set (module
    docstring, `stock`): counted from their code, not measured."""
    outs = [o for _, o in adapted_layers(cfg, shape).values()] if cfg.adapter.type == "lora" else []
    update = 2 * tokens * max(outs) * a if outs else 0
    return Component("stock modules", update + 16 * tokens * shape.hidden,
                     "transformers + peft as shipped: peft's update of the widest adapted layer, the plain RMSNorms' "
                     "fp32 copies (not measured)")


def _graph_pool(shape: Shape, tokens: int, a: int, grad_bytes: int) -> Component:
    return Component("CUDA graph pool", grad_bytes + GRAPH_POOL * tokens * shape.hidden * a,
                     f"the captured micro-batch beyond the eager peak: all gradients held through the capture, "
                     f"{GRAPH_POOL} x T x H x a buffers (measured)")


# -------------------------------------------------------------------------------------------- estimate


def estimate(cfg: Config, model_config: Any, batch_size: int, seq_len: int, device: str, embed_on_host: bool = False,
             fused_mlp: bool | None = None, graphs: bool | None = None,
             chunk_elements: int = CHUNK_ELEMENTS, *, tokens: int | None = None, padding_free: bool = False,
             dense_attention: bool = False, stream_attention: bool = False, stock: bool = False) -> MemoryPlan:
    """The estimated peak memory of training `cfg` on `device` ("cuda" or "cpu") at batch_size x seq_len.

    `model_config`: a transformers config (or a `Shape`). `fused_mlp`: the fused SwiGLU is in use; `graphs`:
    micro-batches are replayed as CUDA graphs (defaults: as `loratune train` would decide on this device);
    `chunk_elements`: the loss's logit chunk (loratune.kernels.loss; other values to replay older runs).
    `tokens`: the micro-batch's tokens when it is not batch_size x seq_len (a padding-free token budget);
    `dense_attention`: attention materialises a [tokens, tokens] mask and scores (loratune's decoder on CPU);
    `stream_attention`: loratune's decoder on CUDA (FlexAttention or SDPA rows, `_stream_attention`);
    `stock`: the transformers + peft fallback's own modules (`_stock_modules`; it also runs the plain MLP and no
    graphs, which `plan_for` passes). `embed_on_host`: the decoder's frozen input embedding in host memory
    (model.embedding_on_host): counted as host memory, none on the GPU.
    Pure: reads no weights, touches no device. `plan_for` gives the plan of a run's `Resolved` decisions.
    """
    shape = model_config if isinstance(model_config, Shape) else Shape.from_config(model_config)
    fused = fused_mlp_default(cfg, device) if fused_mlp is None else fused_mlp
    a = _dtype_bytes(cfg.quantization.compute_dtype, device)
    full = cfg.adapter.type in ("none", "freeze")
    e = 4 if (full or cfg.quantization.bits == 32) else a  # 16/32-bit weights: as loratune.model.load
    tokens = batch_size * seq_len if tokens is None else tokens
    trainable, _, _ = _trainable(cfg, shape)
    saved, layer = _activations(cfg, shape, tokens, a, e, fused, checkpointing_on(cfg))
    extra = [(_dense_attention if dense_attention else _stream_attention)(shape, tokens, a)] \
        if dense_attention or stream_attention else []
    extra += [_stock_modules(cfg, shape, tokens, a)] if stock else []
    for c in extra:
        layer = dataclasses.replace(layer, bytes=layer.bytes + c.bytes, detail=f"{layer.detail}; {c.detail}")
    head_trained = full or any("lm_head" in m for m in cfg.adapter.modules_to_save)
    loss = _loss(shape, tokens, a, head_trained, chunk_elements)
    loss_peak = loss.bytes >= layer.bytes
    overhead = Component("CUDA overhead" if device == "cuda" else "process overhead",
                         CUDA_OVERHEAD if device == "cuda" else CPU_OVERHEAD,
                         "cuBLAS workspaces, small buffers" if device == "cuda" else "Python, torch, transformers")
    graphed = graphs_wanted(cfg, device) if graphs is None else graphs
    grads = sum(c.bytes for c in trainable if c.name == "gradients")
    pool = _graph_pool(shape, tokens, a, grads) if graphed else Component("CUDA graph pool", 0, "")
    comps = [*_weights(cfg, shape, device, embed_on_host, e), *trainable, saved,
             dataclasses.replace(layer, counted=not loss_peak), dataclasses.replace(loss, counted=loss_peak),
             pool, overhead]
    return MemoryPlan(tuple(c for c in comps if c.bytes or c.name in ("embedding", "output head")),
                      batch_size, seq_len, device, tokens, padding_free)


def plan_for(cfg: Config, shape: Any, r: Resolved) -> MemoryPlan:
    """The plan of the decisions `r` (its batch size resolved): the model code, kernels, graphs and micro-batch
    `loratune train` will use."""
    return estimate(cfg, shape, r.batch_size, r.max_length, r.device, r.embedding_on_host and r.device == "cuda",
                    r.fused_mlp, r.graphs,
                    tokens=r.tokens, padding_free=r.padding_free, dense_attention=r.decoder and r.device == "cpu",
                    stream_attention=r.decoder and r.device == "cuda", stock=not r.decoder)


def _size(n: int) -> str:
    """Bytes for a sentence: GiB from 1 GiB up, else MiB."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def render(plan: MemoryPlan, title: str = "") -> str:
    """The plan as a plain-text table, one component a line, the total last (MiB for plans under 4 GiB)."""
    unit, scale = ("GiB", GiB) if plan.total >= 4 * GiB else ("MiB", 2**20)
    width = max(len(c.name) for c in plan.components) + 2
    lines = [title or f"memory plan: micro-batch {plan.shape_text} on {plan.device}",
             f"  {'component':<{width}}{unit:>9}  detail"]
    for c in plan.components:
        value = f"{c.bytes / scale:.2f}" if unit == "GiB" else f"{c.bytes / scale:.1f}"
        note = c.detail + ("" if c.counted else "; not at the peak: the other transient is larger")
        lines.append(f"  {c.name:<{width}}{value if c.counted else '(' + value + ')':>9}  {note}")
    total = f"{plan.total / scale:.2f}" if unit == "GiB" else f"{plan.total / scale:.1f}"
    lines.append(f"  {'estimated peak':<{width}}{total:>9}" + (f"  ({_size(plan.total)})" if unit == "MiB"
                                                              and plan.total >= GiB else ""))
    return "\n".join(lines)


def fit_batch_size(plan_for: Callable[[int], MemoryPlan], budget: int, cap: int) -> tuple[int, MemoryPlan]:
    """The largest batch size in [1, cap] whose plan is within `budget` bytes (1 when none is)."""
    lo, best = 1, plan_for(1)
    if best.total > budget:
        return 1, best
    hi = cap
    while lo < hi:  # estimates grow with the batch: bisect for the last one that fits
        mid = (lo + hi + 1) // 2
        p = plan_for(mid)
        if p.total <= budget:
            lo, best = mid, p
        else:
            hi = mid - 1
    return lo, best


# ------------------------------------------------------------------------------------- the machine


def load_model_config(cfg: Config) -> Any:
    """The base model's transformers config: from a folder, a config.json file or a hub id (config.json only;
    the demo model is built once if needed)."""
    from transformers import AutoConfig

    from loratune.model.hub import locate
    from loratune.model.load import resolve_model_path

    source = resolve_model_path(cfg.model.path)
    where = locate(source, cfg.model.revision, config_file_ok=True)  # a bare config.json is enough here
    try:
        hf = AutoConfig.from_pretrained(where.path, revision=cfg.model.revision,
                                        local_files_only=where.local_files_only,
                                        trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the model config of {source!r}: {e}".splitlines()[0]) from None
    from loratune.model.rope_scaling import apply_rope_scaling

    return apply_rope_scaling(hf, cfg.model.rope_scaling)  # the plan sees the context the run trains at


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_budget(device: str) -> int | None:
    """Free bytes on `device`: the GPU's free memory, or the host's available memory on CPU."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _advice(cfg: Config, plan_for: Callable[[int], MemoryPlan], batch: int, r: Resolved) -> str:
    tips = []
    if r.padding_free and cfg.train.tokens_per_batch != "auto":
        tips.append(f"lower train.tokens_per_batch (now {r.tokens_per_batch}; at least data.max_length)")
    elif batch > 1:
        tips.append(f"lower train.batch_size (now {batch}; 1 would need {_size(plan_for(1).total)}, "
                    "or use auto)")
    tips.append(f"lower data.max_length (now {cfg.data.max_length})")
    if not checkpointing_on(cfg):
        tips.append("set train.gradient_checkpointing=true")
    if cfg.quantization.bits > 4 and cfg.adapter.type == "lora":
        tips.append("quantize the base with quantization.bits=4")
    return "; ".join(tips)


@dataclass(frozen=True)
class RunPlan:
    cfg: Config  # with train.batch_size resolved to an int
    plan: MemoryPlan
    budget: int | None
    note: str  # how the batch size was chosen
    resolved: Resolved | None = None  # every decision of the run, the batch size included
    context: str = ""  # data.max_length against the model's context (RoPE scaling included)


def plan_run(cfg: Config, device: str | None = None, budget: int | None = None,
             saved_batch_size: int | None = None) -> RunPlan:
    """Resolve the run's decisions (`loratune.model.resolve.decide`) and its batch size, and estimate it; raise
    `WouldNotFit` when it exceeds `budget`.

    `budget` (bytes) defaults to the free memory of `device` (`device_budget`). `saved_batch_size`: a
    resumed run keeps its checkpoint's batch size when the config says auto (same data order). Padding-free
    batches with an explicit train.tokens_per_batch plan that many tokens whatever the batch size; batch_size
    auto is then tokens_per_batch // max_length samples, the padded micro-batch of the same size.
    """
    model_config = load_model_config(cfg)
    shape = Shape.from_config(model_config)
    decided = decide(cfg, device or default_device(), model_config)
    device, seq, tokens = decided.device, cfg.data.max_length, cfg.train.tokens_per_batch

    def plan_for_batch(b: int) -> MemoryPlan:
        return plan_for(cfg, shape, decided.with_batch(b, tokens))

    budget = device_budget(device) if budget is None else budget
    batch, note = cfg.train.batch_size, "set in the config"
    if batch == "auto":
        if saved_batch_size is not None:
            batch, note = saved_batch_size, "auto: the batch size of the checkpoint this run resumes"
        elif decided.padding_free and tokens != "auto":
            batch = max(1, tokens // seq)
            note = f"auto: {batch}, the samples of max_length that fill train.tokens_per_batch ({tokens:,})"
        elif budget is None:
            raise ConfigError("train.batch_size auto needs to know the free memory; give a budget")
        else:
            cap = MAX_AUTO_BATCH.get(device, 8)
            batch, fit = fit_batch_size(plan_for_batch, int(SAFETY * budget), cap)
            more = f"; {batch + 1} would need {_size(plan_for_batch(batch + 1).total)}" if batch < cap else \
                f" (the most auto picks on {device})"
            note = (f"auto: {batch}, the largest micro-batch whose estimate ({_size(fit.total)}) is within "
                    f"{SAFETY:.0%} of the {_size(budget)} free{more}")
    resolved = decided.with_batch(batch, tokens)
    plan = plan_for(cfg, shape, resolved)
    if budget is not None and plan.total > budget:
        where = "on the GPU" if device == "cuda" else "in host memory"
        raise WouldNotFit(f"this run would not fit: estimated peak {_size(plan.total)} > {_size(budget)} "
                          f"free {where} (micro-batch {plan.shape_text}). To fit: "
                          f"{_advice(cfg, plan_for_batch, batch, resolved)}. The plan above shows where the memory "
                          "goes", plan)
    resolved_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
    return RunPlan(resolved_cfg, plan, budget, note, resolved, context_note(cfg, model_config))


def context_note(cfg: Config, model_config: Any) -> str:
    """One line: the sequence length planned (data.max_length) against the model's context, RoPE scaling
    included; a warning when the samples may run past what the model was made for."""
    from loratune.model.rope_scaling import context_length

    ctx = context_length(model_config)
    if ctx is None:
        return ""
    rs = cfg.model.rope_scaling
    scaled = f" (RoPE {rs.type} x{rs.factor:g})" if rs is not None else ""
    text = f"context: data.max_length {cfg.data.max_length:,} tokens of the model's {ctx:,}{scaled}"
    if cfg.data.max_length > ctx:
        text += "; warning: longer than the model's context, set model.rope_scaling to stretch it"
    return text


def describe(rp: RunPlan, cfg: Config) -> str:
    """The table plus the batch-size note and the free memory, as printed by `plan` and `train`."""
    title = f"memory plan: {cfg.model.path}, micro-batch {rp.plan.shape_text}, on {rp.plan.device}"
    text = render(rp.plan, title) + f"\n  batch size: {rp.note}"
    if rp.resolved is not None:
        text += f"\n  {rp.resolved.describe()}"
    if rp.context:
        text += f"\n  {rp.context}"
    if rp.budget is not None:
        text += f"\n  free: {_size(rp.budget)} ({100 * rp.plan.total / max(rp.budget, 1):.0f}% of it planned)"
    return text
