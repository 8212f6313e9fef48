"""What the model families share: the Qwen2.5 config, text targets and losses, greedy decoding
with a KV cache, the saved model directory, tokenizer lookup, weights I/O and presets."""
