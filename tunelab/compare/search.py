"""The search behind `tunelab tune` and `tunelab compare --tune`: for one method, N trials of
`tunelab train --validate-only`, their settings proposed by Optuna's TPE sampler and cut short by
a pruner fed with each trial's validation curve. Trials select on the validation split only: the
split a comparison reports on is not even read.

The study lives in OUT/study.sqlite3 (Optuna's RDB storage, one study per method), so a search
killed mid-trial resumes with `resume=True`: finished trials stay, and a trial left running by a
dead process on this machine is taken over under the same number, continuing from its last
checkpoint. Several processes may work on one study (on one machine, or over a shared folder):
each takes the next trial until the study holds N."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

STUDY_FILE = "study.sqlite3"
PRUNERS = ("median", "halving", "none")
WEIGHT_FILES = ("trainable.safetensors", "adapter_model.safetensors", "prefix_encoder.safetensors")


@dataclass(frozen=True)
class Knob:
    """One searched setting: a `--set` key and its range (log-uniform) or choices."""

    name: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


# knobs a user may add to the search (`--search`, at most two); each method's record says which
# it has (methods.Method.search_knobs), and which learning rates it searches over what range
EXTRA_KNOBS: dict[str, Knob] = {
    "num_virtual_tokens": Knob("num_virtual_tokens", choices=(5, 10, 20, 50)),
    "init": Knob("init", choices=("labels", "vocab", "random")),
    "reparameterize": Knob("reparameterize", choices=("none", "residual")),
    "r": Knob("r", choices=(4, 8, 16, 32)),
    "weight_decay": Knob("weight_decay", choices=(0.0, 0.01, 0.1)),
}


def space(method: str, extra: list[str]) -> tuple[Knob, ...]:
    """What a method's trials search: its learning rate(s) plus the asked-for knobs it has."""
    from tunelab import methods

    unknown = [k for k in extra if k not in EXTRA_KNOBS]
    if unknown:
        raise TunelabError(f"--search {unknown[0]}: unknown knob (known: {', '.join(EXTRA_KNOBS)})")
    if len(extra) > 2:
        raise TunelabError(f"--search {','.join(extra)}: at most two knobs besides the lr")
    record = methods.get(method)
    rates = tuple(Knob(key, low, high, log=True) for key, low, high in record.search_lr)
    return rates + tuple(EXTRA_KNOBS[k] for k in extra if k in record.search_knobs)


def defaults(method: str, knobs: tuple[Knob, ...], settings: list[str]) -> dict:
    """The knobs' values in an untuned run: the user's --set where given, else the method's."""
    from dataclasses import asdict

    from tunelab import methods
    from tunelab.train.config import TrainConfig, apply_overrides

    train_cfg, method_cfg = apply_overrides(settings, TrainConfig(), methods.get(method).config())
    values = {**asdict(method_cfg), **{k: v for k, v in asdict(train_cfg).items() if v is not None}}
    return {k.name: values[k.name] for k in knobs}


@dataclass
class Trial:
    """What a search keeps of one trial (results.json's `tuning.METHOD.trials`)."""

    number: int
    params: dict
    state: str  # complete | pruned | failed
    value: float | None  # best validation score
    curve: list[dict] = field(default_factory=list)  # [{"step", "validation"}]
    seconds: float = 0.0
    error: str | None = None


@dataclass
class Search:
    """One method's search: its settings, storage and trial launcher."""

    method: str
    out: Path  # the folder holding study.sqlite3 and trials/
    n_trials: int
    steps: int
    train_args: list[str]  # `tunelab train` arguments every trial shares (task, model, --set)
    knobs: tuple[Knob, ...]
    seed: int = 0
    pruner: str = "median"
    eval_every: int = 50

    def __post_init__(self):
        # the defaults are trial 0: the space must hold them (a user's --set may lie outside)
        default = self._defaults()
        self.knobs = tuple(_holding(k, default[k.name]) for k in self.knobs)

    def study(self, resume: bool):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{(self.out / STUDY_FILE).resolve()}"
        names = optuna.get_all_study_names(storage) if (self.out / STUDY_FILE).is_file() else []
        if self.method in names and not resume:
            raise TunelabError(
                f"{self.out / STUDY_FILE}: already holds a {self.method} search; pass --resume "
                "to continue it (or to join it from another process), or choose another --out"
            )
        study = optuna.create_study(
            storage=storage,
            study_name=self.method,
            direction="maximize",
            pruner=self._pruner(),
            load_if_exists=True,
        )
        if not study.trials:  # trial 0 is the untuned run: tuning can only match or beat it
            study.enqueue_trial(self._defaults())
            study.set_user_attr("knobs", [k.name for k in self.knobs])
        return study

    def _defaults(self) -> dict:
        return defaults(self.method, self.knobs, self._settings())

    def _settings(self) -> list[str]:
        args = self.train_args
        return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]

    def _pruner(self):
        import optuna

        startup = max(2, self.n_trials // 3)  # pruning against too few finished curves is noise
        if self.pruner == "median":
            # no pruning before a third of the steps: early validation says little
            return optuna.pruners.MedianPruner(
                n_startup_trials=startup, n_warmup_steps=max(1, self.steps // 3) - 1
            )
        if self.pruner == "halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=self.eval_every)
        return optuna.pruners.NopPruner()

    def _sampler(self, n_before: int):
        import optuna

        # seeded per trial: the proposal for trial n depends on the seed and the n trials before
        # it, not on what this process sampled earlier, so a resumed search proposes what an
        # uninterrupted one would have
        return optuna.samplers.TPESampler(
            seed=self.seed * 10_007 + n_before, n_startup_trials=max(2, self.n_trials // 3)
        )

    def run(self, resume: bool = False, log=print) -> list[Trial]:
        """Run trials until the study holds `n_trials`; return every trial, in number order."""
        import optuna
        from optuna.trial import TrialState

        self.out.mkdir(parents=True, exist_ok=True)
        study = self.study(resume)
        if resume:
            for frozen in _stale(study):
                log(f"{self.method} trial {frozen.number}: taking over from a dead process")
                trial = optuna.trial.Trial(study, frozen._trial_id)
                self._run_trial(study, trial, log, set(frozen.intermediate_values))
        while True:
            alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            n = len(study.get_trials(deepcopy=False, states=alive))
            if n >= self.n_trials:
                break
            study.sampler = self._sampler(len(study.get_trials(deepcopy=False)))
            trial = study.ask()
            self._run_trial(study, trial, log)
        return trials(study)

    def _run_trial(self, study, trial, log, reported: set[int] = frozenset()) -> None:
        from optuna.trial import TrialState

        params = {k.name: k.suggest(trial) for k in self.knobs}
        trial.set_user_attr("worker", _worker())
        run_dir = self.out / "trials" / f"{self.method}-{trial.number:03d}"
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"{self.method} trial {trial.number}: {show_params(params)}")
        start = time.perf_counter()
        if (run_dir / "tunelab.json").is_file():  # it finished; its search died before noting it
            for point in _read_curve(run_dir / "progress.jsonl"):
                if point["step"] not in reported:  # later trials' pruning compares with these
                    trial.report(point["validation"], point["step"])
            state, error = "complete", None
        else:
            command = self._command(params, run_dir)
            state, error = _follow(trial, command, run_dir, reported, self.steps)
        curve = _read_curve(run_dir / "progress.jsonl")
        trial.set_user_attr("curve", curve)
        before = trial.user_attrs.get("seconds", 0.0)  # a taken-over trial ran before its crash
        trial.set_user_attr("seconds", round(before + time.perf_counter() - start, 1))
        if error:
            trial.set_user_attr("error", error)
        best = max((c["validation"] for c in curve), default=None)
        if state == "complete" and best is not None:
            study.tell(trial.number, best)
        elif state == "pruned":
            study.tell(trial.number, state=TrialState.PRUNED)
        else:
            study.tell(trial.number, state=TrialState.FAIL)
        _tidy(run_dir)
        log(f"{self.method} trial {trial.number}: {state}" + (f" ({error})" if error else "")
            + (f", best validation {best:.4f}" if best is not None else ""))  # fmt: skip

    def _command(self, params: dict, run_dir: Path) -> list[str]:
        sets = [f"seed={self.seed}", *(f"{k}={v}" for k, v in params.items())]
        resume = (run_dir / "checkpoints" / "last.safetensors").is_file()
        return [
            sys.executable,
            "-m",
            "tunelab",
            "train",
            *self.train_args,
            "--method",
            self.method,
            "--out",
            str(run_dir),
            *[x for s in sets for x in ("--set", s)],
            "--validate-only",
            "--progress",
            str(run_dir / "progress.jsonl"),
            *(["--resume"] if resume else []),
        ]


def _holding(knob: Knob, value) -> Knob:
    """The knob, its range or choices widened to hold `value`."""
    from dataclasses import replace

    if knob.choices:
        return knob if value in knob.choices else replace(knob, choices=(*knob.choices, value))
    return replace(knob, low=min(knob.low, value), high=max(knob.high, value))


def trials(study) -> list[Trial]:
    """The study's trials as results.json keeps them."""
    states = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
    return [
        Trial(
            number=t.number,
            params=dict(t.params),
            state=states.get(t.state.name, t.state.name.lower()),
            value=t.value,
            curve=t.user_attrs.get("curve", []),
            seconds=t.user_attrs.get("seconds", 0.0),
            error=t.user_attrs.get("error"),
        )
        for t in sorted(study.trials, key=lambda t: t.number)
    ]


def best_trial(found: list[Trial]) -> Trial | None:
    """The finished trial with the best validation score; ties go to the earlier trial (trial 0
    is the untuned run, so a tie keeps the defaults)."""
    done = [t for t in found if t.state == "complete" and t.value is not None]
    return max(done, key=lambda t: (t.value, -t.number)) if done else None


def _follow(
    trial, cmd: list[str], run_dir: Path, reported: set[int], steps: int
) -> tuple[str, str | None]:
    """Run one trial's `tunelab train`, reporting its validation curve to the pruner as it
    comes (step 0, the start, included: it counts toward the trial's best); stop it when the
    pruner says so (not at step 0, which says nothing about the learning rate, nor at the last
    step: the trial is done then).
    Steps in `reported` went to the pruner before (a taken-over trial) and were not pruned
    then. Returns (state, error)."""
    progress = run_dir / "progress.jsonl"
    seen = 0
    with open(run_dir / "run.log", "a", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        while True:
            code = proc.poll()
            curve = _read_curve(progress)
            for point in curve[seen:]:  # each point once, in order: the decision is repeatable
                if point["step"] in reported:
                    continue
                trial.report(point["validation"], point["step"])
                # never on the start alone (step 0: no update yet), nor at the last step
                if 0 < point["step"] < steps and trial.should_prune():
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                    _truncate(progress, point["step"])
                    # a fast child may have finished meanwhile: pruned whatever the timing, and
                    # no artifact, which a resumed search would take for a finished trial
                    (run_dir / "tunelab.json").unlink(missing_ok=True)
                    return "pruned", None
            seen = len(curve)
            if code is not None:
                break
            time.sleep(0.2)
    if code != 0:
        return "failed", _last_line(run_dir / "run.log")
    return "complete", None


def _read_curve(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: the trial re-validates that step
            continue
        points.append({"step": rec["step"], "validation": rec["validation"]})
    # a resumed trial validates again the steps after its last checkpoint: keep one of each
    return sorted({p["step"]: p for p in points}.values(), key=lambda p: p["step"])


def _truncate(progress: Path, step: int) -> None:
    """Keep the curve up to the step the pruner stopped at (the child may have run on)."""
    kept = [json.dumps(p) for p in _read_curve(progress) if p["step"] <= step]
    progress.write_text("".join(x + "\n" for x in kept), encoding="utf-8")


def _tidy(run_dir: Path) -> None:
    """A finished trial's checkpoints and weights are never read again (the final runs train
    afresh): free the disk, keep the log, curve and tunelab.json."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for name in WEIGHT_FILES:
        (run_dir / name).unlink(missing_ok=True)


def _stale(study) -> list:
    """Trials left running by a process of this machine that is gone."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        where, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if where == host and pid.isdigit() and not _alive(int(pid)):
            out.append(t)
        elif not where and t.datetime_start and _age(t.datetime_start) > 60:
            out.append(t)  # asked for, then killed before it was marked as this process's
    return out


def _age(start) -> float:
    import datetime

    return (datetime.datetime.now() - start).total_seconds()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _die_with_parent() -> None:
    """A trial's process ends with the search that started it (Linux), so that a killed search
    leaves no orphan writing into the trial's folder."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(log: Path) -> str:
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def show_params(params: dict) -> str:
    """Searched settings for people: `lr=0.0019, r=8`."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )
