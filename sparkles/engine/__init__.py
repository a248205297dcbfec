"""The inference engine: chat sessions with a reused KV cache, batched answering, token-by-token decoding."""
