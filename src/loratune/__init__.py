"""loratune: QLoRA fine-tuning from a YAML config (NF4 base, LoRA adapters, paged optimizers)."""

__version__ = "0.1.0"
