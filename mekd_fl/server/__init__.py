"""The server side of the project's own app: the ServerApp, its run folder and what reads it back.

Layers inside: `app` (the ServerApp: teacher, oracle, strategy, checkpoints) and `saved_run` (a run
folder read back: status, evaluate) -> `results`, `summary` (the typed summary.json), `aggregation`,
`preflight`. A Flower user's own app needs none of it: `strategies.MEKD` is the plug-in.
"""
