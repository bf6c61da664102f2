"""Task data → prompt text → token ids: specs, readers, templates, verbalizers, demonstrations."""

from tunelab.tasks.spec import TaskSpec, load_task

__all__ = ["TaskSpec", "load_task"]
