"""loratune's fused CUDA kernels, each with its plain-PyTorch reference beside it, for loratune's own decoder.

The decoder (`loratune.decoder`) calls them directly from its own modules; nothing here touches a
transformers or peft object (the transformers + peft fallback runs as those libraries ship):
- `lora_linear`: a LoRA linear layer over a 4-bit or 16-bit base as one autograd function (products in the
  compute dtype, the adapters' compute-dtype casts made once per optimizer step by `AdapterCasts`);
  `lora_group`: layers that share an input (q/k/v, gate/up) as one node;
- `nf4`: NF4/FP4 dequantization of a bitsandbytes 4-bit weight (one Triton kernel on CUDA);
- `norm_swiglu`: RMSNorm with a frozen weight and the SiLU-gated product (one Triton kernel per direction);
- `loss`: linear cross-entropy in row chunks with the gradient computed in the forward pass (every run's
  loss, on any device, both model codes: it reads only the final hidden states and the head's weight);
- `graphs`: CUDA graph replay of the decoder's fixed-shape padding-free micro-batches;
- decoding (`loratune.infer`): `nf4_matvec` (a 4-bit linear for a few rows, LoRA update included) and
  `decode_attention` (one new token per row over the decoder's KV cache).
Off CUDA every kernel runs its plain-PyTorch reference.
"""
