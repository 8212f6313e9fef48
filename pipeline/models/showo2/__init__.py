"""Show-o2 (showlab/Show-o, ``show-o2/``): Qwen2.5 + Wan2.1 VAE + dual-path visual tokenizer +
flow head. The registry reads :mod:`.spec`; :mod:`.model` holds the adapter."""
