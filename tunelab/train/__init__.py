"""The training loop, its config, distributed setup and resumable checkpoints.

`tunelab.train(task, ...)` is the Python API's train (tunelab/api.py): this package is callable,
because `tunelab.train` names the package once any of its modules is imported."""

import importlib
import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return importlib.import_module("tunelab.api").train(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(importlib.import_module("tunelab.api").train)


sys.modules[__name__].__class__ = _Callable
