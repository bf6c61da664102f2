"""The training loop, its config, distributed setup and resumable checkpoints.

`tunelab.train(task, ...)` is the Python API's train (tunelab/api.py): this package is callable,
because `tunelab.train` names the package once any of its modules is imported."""

from tunelab import callable_package

callable_package(__name__, "train")
