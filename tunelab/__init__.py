"""tunelab: prompt tuning versus fine-tuning, measured on your own data.

The Python API (tunelab/api.py), imported on first use so that `import tunelab` stays light:

    task = tunelab.load_task("examples/tasks/sst2.yaml")
    run = tunelab.train(task, method="prompt-tuning", out="runs/x", steps=100)
    model = tunelab.load("runs/x")
"""

__version__ = "0.1.0"

API = ("load_task", "load", "advise", "TrainResult", "CompareResult", "Advice")
__all__ = ["train", "compare", *API, "TunelabError", "SettingError"]


def __getattr__(name: str):
    import importlib

    if name in API:
        return getattr(importlib.import_module("tunelab.api"), name)
    if name in ("train", "compare"):  # the packages, which are callable (see train/__init__.py)
        return importlib.import_module(f"tunelab.{name}")
    if name in ("TunelabError", "SettingError"):
        return getattr(importlib.import_module("tunelab.errors"), name)
    raise AttributeError(f"module 'tunelab' has no attribute {name!r}")


def callable_package(package: str, function: str) -> None:
    """Make the subpackage `package` callable as `tunelab.api.<function>`: `tunelab.train` and
    `tunelab.compare` name the API's functions and also subpackages, and Python binds the name
    to the subpackage once any of its modules is imported."""
    import importlib
    import sys
    import types

    def api_function():
        return getattr(importlib.import_module("tunelab.api"), function)

    class _Callable(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return api_function()(*args, **kwargs)

        @property
        def __signature__(self):
            import inspect

            return inspect.signature(api_function())

    sys.modules[package].__class__ = _Callable
