"""The frontend runtime: building a frontend (tokenizer, model, KV cache, engine) with its experts in-process or
on an expert pool of Ray actors, its health and healing; used by the offline ``LLM`` and the Serve frontend."""
