"""Methods side by side on one task: run each in its own process, record, report, advise.

`tunelab.compare(task, ...)` is the Python API's compare (tunelab/api.py): this package is
callable, because `tunelab.compare` names the package once any of its modules is imported."""

import importlib
import sys
import types


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return importlib.import_module("tunelab.api").compare(*args, **kwargs)

    @property
    def __signature__(self):
        import inspect

        return inspect.signature(importlib.import_module("tunelab.api").compare)


sys.modules[__name__].__class__ = _Callable
