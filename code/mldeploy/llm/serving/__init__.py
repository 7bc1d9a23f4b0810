"""Serving the course's Llama: a batching engine (continuous or static) behind an OpenAI-style API.

- ``engine``: one worker thread steps a batch of running sequences, each with its own KV cache.
- ``api``: FastAPI ``/v1/completions`` (streamed as server-sent events), ``/metrics`` etc.
- ``loadgen``: concurrent streaming clients that measure TTFT, TPOT and tokens/s.
"""
