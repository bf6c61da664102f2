"""`tunelab serve`: many tasks on one backbone over HTTP.

store.py (artifacts on one shared backbone) -> forward.py (mixed-task forward passes with
per-task cached heads, LoRA routing) and decode.py (mixed-task greedy generation) -> batcher.py
(gathering concurrent requests) -> app.py (the FastAPI endpoints; who may do what is in
access.py, the request and response bodies in schemas.py) -> cli.py (the command).
"""
