"""Methods side by side on one task: run each in its own process, record, report, advise.

`tunelab.compare(task, ...)` is the Python API's compare (tunelab/api.py): this package is
callable, because `tunelab.compare` names the package once any of its modules is imported."""

from tunelab import callable_package

callable_package(__name__, "compare")
