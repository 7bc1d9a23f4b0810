"""A tiny Llama: tokenizer, model, training, and generation with and without a KV cache."""
