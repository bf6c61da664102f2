"""The adapter store: one backbone in memory and any number of task artifacts on it.

Methods that leave the backbone's weights alone (prompt tuning, prefix tuning, a head on a
frozen backbone) share the one backbone, so adding a task costs only its own tensors and its
rows can run in the same forward pass as any other shared task's. LoRA adapters (and a hybrid's
LoRA core) share it too: each is injected under its own adapter name and every row is routed to
its task's adapter (PEFT's `adapter_names`; see forward.routing). Methods that change weights
otherwise (freeze, full, a head with a trained backbone) get their own copy of the backbone: a
fully fine-tuned model is its own backbone, and `/v1/tasks` says which is which.

Limits: at most `max_tasks` tasks, and at most `max_bytes` of parameters in all (the backbone,
every copy of it and every task's tensors), checked from the artifact's metadata and file
sizes before any tensor is read, so a refused load costs next to nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import methods
from tunelab.artifact import read_meta
from tunelab.errors import TunelabError
from tunelab.evaluate.calibrate import is_on
from tunelab.evaluate.loaded import LoadedModel, load
from tunelab.models import Backbone, load_backbone
from tunelab.tasks.prepared import PreparedTask
from tunelab.tasks.spec import TaskSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = ("unknown",)  # the metrics label of requests that name no loaded task


class TooManyTasks(TunelabError):
    """A load past the store's task limit."""


class OverMemory(TunelabError):
    """A load past the store's parameter-memory budget."""


def gb(n_bytes: int | float) -> str:
    return f"{n_bytes / 1e9:.3g} GB"


def param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def shares_backbone(meta: dict) -> bool:
    """Whether the artifact runs on the shared backbone: its tensors sit beside the backbone's
    weights, not in them."""
    record = methods.find(meta.get("method"))
    return record is not None and record.shares_backbone(meta.get("method_config", {}))


@dataclass
class TaskEntry:
    name: str
    path: Path
    method: str
    model: LoadedModel  # tuned model, prepared task (template, verbalizer, demonstrations, ...)
    shared: bool  # runs on the store's shared backbone (else on its own copy)
    source: str = "startup"  # its folder as clients see it (relative to the adapter root)
    added_bytes: int = 0  # parameter memory the load added (its tensors, its backbone copy)
    adapter: str | None = None  # its LoRA adapter's name inside the shared backbone
    head_cache: object = None  # lm.head_cache.HeadCache, built on first use

    @property
    def tuned(self):  # TunedLM
        return self.model.tuned

    @property
    def prep(self) -> PreparedTask:  # no data: the prompts only
        return self.model.prep

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    @property
    def calibration(self):
        """evaluate.calibrate.Calibration applied to its scores, or None."""
        return self.model.calibration

    @property
    def task(self) -> TaskSpec:
        return self.prep.task

    def describe(self) -> dict:
        task = self.task
        cache = self.head_cache
        return {
            "name": self.name,
            "method": self.method,
            "kind": "generation" if task.is_generation else "classification",
            "labels": [] if task.is_generation else list(self.prep.verbalizer.labels),
            "input_fields": list(task.input_fields),
            "backbone": "shared" if self.shared else "own",
            "path": self.source,
            "param_bytes": self.added_bytes,
            "cached_prefix_slots": cache.slots if cache is not None else None,
            "calibrated": self.calibration is not None,
        }


class AdapterStore:
    """Task name -> loaded artifact, all on (or copied from) one backbone."""

    def __init__(
        self,
        backbone: Backbone,
        device: torch.device,
        max_tasks: int | None = None,
        max_bytes: int | None = None,
        calibrate: bool | None = None,
        bf16: bool = False,
    ):
        """`calibrate`: True calibrates every classification task, False none, None those
        whose task says `calibrate: content-free` (evaluate/calibrate.py). `bf16`: every task
        runs under bfloat16 autocast, as `tunelab eval --bf16` runs (LoadedModel.bf16)."""
        self.backbone = backbone
        self.calibrate = calibrate
        self.bf16 = bf16
        self.device = device
        self.backbone.model.to(device).eval()
        self.tasks: dict[str, TaskEntry] = {}
        self._loras = 0  # adapter names are lora1, lora2, ... (task names may hold dots)
        self.max_tasks, self.max_bytes = max_tasks, max_bytes
        self.base_bytes = param_bytes(backbone.model)  # before any LoRA layer joins it
        if max_bytes is not None and self.base_bytes > max_bytes:
            raise OverMemory(
                f"the backbone alone holds {gb(self.base_bytes)} of parameters; "
                f"--max-memory-gb is {gb(max_bytes)}"
            )

    def held_bytes(self) -> int:
        """Parameter memory held now: the backbone and what every task added."""
        return self.base_bytes + sum(e.added_bytes for e in self.tasks.values())

    def load(
        self, name: str, path: Path, source: str = "startup", calibrate: bool | None = None
    ) -> TaskEntry:
        """Load an artifact under `name`; a bad one raises TunelabError and changes nothing.
        `source`: how clients see its folder. `calibrate` (None: the store's setting, else the
        task's) applies the artifact's stored label bias, or one measured now."""
        if not NAME.match(name or "") or name in RESERVED:
            raise TunelabError(
                f"task name {name!r}: use 1-64 letters, digits, '_', '.', '-' (starting with a "
                f"letter or digit), other than {', '.join(RESERVED)}"
            )
        if name in self.tasks:
            raise TunelabError(f"task {name!r} is already loaded (from {self.tasks[name].source})")
        if self.max_tasks is not None and len(self.tasks) >= self.max_tasks:
            raise TooManyTasks(
                f"{len(self.tasks)} tasks loaded; --max-tasks is {self.max_tasks} "
                "(unload one first)"
            )
        path = Path(path)
        meta = read_meta(path)
        if "method" not in meta or "base_model" not in meta:
            raise TunelabError(f"{path / 'tunelab.json'}: no method or base_model; not an artifact")
        shared = shares_backbone(meta)
        added = self._check_memory(name, path, shared)
        backbone = self.backbone
        if not shared:
            # the artifact writes into weights (fine-tuned blocks, a hybrid's LoRA core): a
            # private copy, read afresh (the shared one may hold LoRA layers by now)
            backbone = load_backbone(self.backbone.name)
        adapter = None
        record = methods.find(meta["method"])
        if record is not None and record.routes_rows:  # joins the others under its own name
            self._loras += 1
            adapter = f"lora{self._loras}"
        try:
            # calibration waits for the entry: it is measured on the task's own adapter
            model = load(
                path,
                backbone=backbone,
                device=self.device,
                calibrate=False,
                bf16=self.bf16,
                lora_name=adapter,
            )
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            # a hand-edited tunelab.json or a tensor file that is not safetensors
            remove_adapter(self.backbone.model, adapter)
            raise TunelabError(f"{path}: cannot load this artifact: {e}") from None
        except TunelabError:
            remove_adapter(self.backbone.model, adapter)  # e.g. its shapes were refused
            raise
        entry = TaskEntry(name, path, meta["method"], model, shared, source, added, adapter)
        try:
            self._calibrate(entry, calibrate)
        except TunelabError:
            remove_adapter(self.backbone.model, adapter)
            raise
        self.tasks[name] = entry
        return entry

    def _calibrate(self, entry: TaskEntry, calibrate: bool | None) -> None:
        """Set the label bias to divide out of this task's scores (or none)."""
        from tunelab.serve.forward import task_routing

        task = entry.task
        if calibrate is None and self.calibrate is not None:  # the server's, for every task
            calibrate = self.calibrate and not task.is_generation
        with task_routing(entry):  # a measurement runs on the task's own adapter
            entry.model.set_calibration(is_on(calibrate, task))

    def _check_memory(self, name: str, path: Path, shared: bool) -> int:
        """The parameter bytes loading `path` would add; OverMemory if past the budget."""
        # the tensor files hold what a sharing method adds; a method that writes into weights
        # reads them into its own backbone copy, which is what it adds
        if shared:
            added = sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())
        else:
            added = self.base_bytes
        held = self.held_bytes()
        if self.max_bytes is not None and held + added > self.max_bytes:
            why = "" if shared else " (its own copy of the backbone)"
            raise OverMemory(
                f"loading {name!r} would add {gb(added)}{why} to the {gb(held)} held; "
                f"--max-memory-gb is {gb(self.max_bytes)}"
            )
        return added

    def unload(self, name: str) -> TaskEntry:
        entry = self.tasks.pop(name)
        remove_adapter(entry.tuned.model, entry.adapter)
        return entry

    def get(self, name: str) -> TaskEntry | None:
        return self.tasks.get(name)

    def describe(self) -> list[dict]:
        return [e.describe() for e in self.tasks.values()]


def remove_adapter(model, adapter: str | None) -> None:
    """Take a LoRA adapter out of every layer that holds it (the others stay)."""
    if adapter is None:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}):
            module.delete_adapter(adapter)
