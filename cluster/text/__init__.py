"""Text in and out: tokenizers (mistral-common and Hugging Face), streaming detokenization, chat formats and
templates, and tool calls in the model's output."""
