"""Engine clients: how the API hands work to the engine and gets results back.

One interface (`base.EngineClient`), two ways to run the engine behind it: on a thread of
this process (`in_process`, for tests that look inside the engine) or in a process of its own
(`own_process`, what `lathe serve` runs), so that the API never imports torch and stays
responsive while the engine computes.
"""
