"""loratune's own decoder for the families it owns (Llama, Mistral, Qwen2/2.5/3, Gemma 1-3, Phi-3).

Ordinary `nn.Module`s built from the HF config (`config.decoder_config`) and the checkpoint's own tensors
(`load.build_decoder` / `load.decoder_from_hf`), with LoRA adapters that read and write PEFT files
(`peft_io`). Batches are token streams with their sample boundaries (`attention.Boundaries`); generation
uses `cache.KVCache`. Other architectures keep the HF + peft path.

    decoder = build_decoder(cfg)                    # cfg.model.path, cfg.quantization, cfg.adapter
    b = Boundaries.from_lengths([len(s) for s in samples], device)          # samples laid end to end
    with decoder.frozen_adapters():                 # one optimizer step's passes
        hidden = decoder.hidden_states(torch.cat(samples), b)               # [N, hidden]
        loss_sum, n = fused_linear_cross_entropy_sum(hidden, decoder.head.weight, next_token_labels,
                                                     softcap=decoder.head.softcap)
    save_adapter(decoder, folder, base_model_name_or_path=cfg.model.path)  # peft.PeftModel loads it
    load_adapter(decoder, folder)                   # or one peft saved
    cache = decoder.new_cache(batch=2, capacity=512)
    logits = decoder(torch.cat(prompts), cache.boundaries([len(p) for p in prompts]), cache=cache)
    logits = decoder(next_tokens[:, None], cache=cache)                     # one token per row
    tokens = greedy(decoder, prompt_ids, max_new_tokens=48, stop_ids={eos})  # greedy decoding on the cache
"""

from loratune.decoder.attention import Boundaries
from loratune.decoder.cache import KVCache
from loratune.decoder.config import DecoderConfig, RopeConfig, decoder_config
from loratune.decoder.generate import greedy
from loratune.decoder.load import build_decoder, decoder_from_hf, load_decoder
from loratune.decoder.lora import QLoRALinear
from loratune.decoder.model import Decoder
from loratune.decoder.peft_io import load_adapter, save_adapter

__all__ = ["Boundaries", "Decoder", "DecoderConfig", "KVCache", "QLoRALinear", "RopeConfig", "build_decoder",
           "decoder_config", "decoder_from_hf", "greedy", "load_adapter", "load_decoder", "save_adapter"]
