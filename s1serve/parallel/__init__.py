"""The plain data of parallelism that every layer below `distributed` receives.

- config.py: ParallelConfig, the allowed shapes and their flags (read by the engine, the runners, the launcher).
- context.py: ParallelContext, what a rank's layers split and over which group, and the collectives they call.
"""
