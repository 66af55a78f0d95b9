"""The OpenAI-compatible API (and vLLM's extensions): request and response models, and the endpoints built on them
(completions, chat completions with tools and structured output, tokenize / detokenize)."""
