"""The vocabulary the API and the engine share: typed messages, loss specs, LoRA shapes.

Plain data only (no torch, nothing else of lathe): the API imports it without the engine, and
every message can be encoded for the channel to an engine in another process.
"""
