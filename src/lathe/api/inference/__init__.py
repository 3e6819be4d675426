"""OpenAI- and Anthropic-compatible inference on any base model or checkpoint.

The routers (`api/routers/openai_compat.py`, `api/routers/anthropic_compat.py`) speak the
providers' shapes; underneath, a request becomes the same `SampleRequest` as `/asample`, so it
is co-batched with RL sampling in the engine. `model_ref` turns a `model` string into a base
model and an adapter folder, `chat_template` renders messages as `transformers` does,
`params` checks the sampling parameters, `generation` runs the samples (`sampler_cache`
keeps their adapters loaded), `decoding` turns their tokens into text, and `errors` answers in
each provider's error shape.
"""
