"""`tunelab serve`: many tasks on one backbone over HTTP.

store.py (artifacts on one shared backbone) -> forward.py (mixed-task forward passes with
per-task cached heads, LoRA routing) and decode.py (mixed-task greedy generation) -> batcher.py
(gathering concurrent requests) -> app.py (the FastAPI endpoints) -> cli.py (the command).
"""
