"""The processes s1serve runs and what each one holds; the layer above all others.

- cli.py: the `s1serve` command (s1serve/cli.py forwards to it for the console script).
- llm.py: `LLM`, the offline API: one engine in this process (rank 0 of a TP/EP group it starts).
- engine.py: `build_engine`: the runner a ParallelConfig asks for (s1serve.distributed), handed to an Engine.
- api_server.py: `s1serve serve api_server` topologies: one process (engine thread + HTTP), the TP/EP driver
  with its follower processes or Ray actors, a --headless node of followers, one api_server process per DP rank.
"""
