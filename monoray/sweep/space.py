"""Search-space YAML: schema, validation and `--set` overrides.

A space file says what a sweep trains (`kind`, `data`, `fixed`), what Optuna
searches (`search`, optionally conditional on another parameter with `when`),
what it optimises (`objectives`, `constraints`), how (`sampler`), how much
(`budget`, `resources`), whether a λ = 0 baseline runs first (`baseline`) and
whether dominated trials stop early (`scheduler`).
The annotated reference is `search_spaces/demo.yaml`.

Every error names the file, the key and what was expected, in one line.
YAML is read with `yaml.safe_load`: a space cannot construct Python objects.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from monoray.configs import closest, field_defaults
from monoray.errors import InputError
from monoray.trials import KINDS, TrialKind

ParamType = Literal["loguniform", "uniform", "int", "categorical"]
SamplerType = Literal["tpe", "nsga2", "gp", "random", "grid"]
SchedulerType = Literal["fifo", "mo_asha"]
Mode = Literal["max", "min"]

PARAM_TYPES = ("loguniform", "uniform", "int", "categorical")
SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
SCHEDULERS = ("fifo", "mo_asha")
MODES = ("max", "min")
_MAX_INT_FLOAT = 2**1023
"""Larger YAML integers do not convert to a float."""
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True, slots=True)
class Param:
    """One searched parameter."""

    name: str
    type: ParamType
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    step: int | None = None
    """Step for `int` parameters (None = 1)."""
    log: bool = False
    """Sample `int` parameters on a log scale."""
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    """Only suggested when every named parameter has one of these values."""


@dataclass(frozen=True, slots=True)
class Objective:
    metric: str
    mode: Mode


@dataclass(frozen=True, slots=True)
class Constraint:
    """A feasibility bound `metric op bound`, handed to Optuna's constraints_func."""

    metric: str
    op: Literal["<=", ">="]
    bound: float

    @property
    def name(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    def violation(self, value: float) -> float:
        """Optuna convention: <= 0 means satisfied."""
        return value - self.bound if self.op == "<=" else self.bound - value


@dataclass(frozen=True, slots=True)
class Sampler:
    type: SamplerType = "tpe"
    seed: int = 42
    population_size: int = 8
    """NSGA-II population (Optuna's default of 50 is too big for small budgets)."""
    n_startup_trials: int = 4
    """Random trials before TPE / GP model the objectives."""


@dataclass(frozen=True, slots=True)
class Scheduler:
    """Early stopping: `fifo` runs every trial to its last epoch, `mo_asha` stops dominated
    ones at rungs `grace_epochs · reduction_factor^i` (see `monoray.sweep.moasha`)."""

    type: SchedulerType = "fifo"
    grace_epochs: int = 1
    reduction_factor: int = 3
    """η: about 1/η of the trials reaching a rung continue past it."""


@dataclass(frozen=True, slots=True)
class Budget:
    num_samples: int = 8
    max_concurrent: int = 2
    max_failures: int = 3
    """Retries of a trial after a crash (each resumes from its last checkpoint)."""


@dataclass(frozen=True, slots=True)
class Resources:
    cpu: float = 1.0
    gpu: float = 0.0
    """Fractional GPUs are logical: trials share the device, Ray does not partition it."""
    workers: int = 0
    """Ray Train workers per trial; 0 runs the trial in-process (sae: 1 too)."""
    pack: int = 1
    """SAE trials trained together in one Tune trial (`monoray.trials.packed`); cpu/gpu are the pack's."""


@dataclass(frozen=True, slots=True)
class Baseline:
    enabled: bool = True
    """Enqueue a λ = 0 trial first so the front always shows what MonoLoss buys."""
    params: dict[str, Any] = field(default_factory=dict)
    """The space's nominal value of every searched parameter but λ (those whose `when`
    holds there): the baseline is the λ = 0 twin of that point, nothing of it is sampled."""


@dataclass(frozen=True, slots=True)
class Data:
    features: str = "digits"
    """`digits`, a `.npz` file or a feature-store directory (relative to the space file)."""
    val_features: str | None = None
    subset: int | None = None
    """Use only the first N training samples (dry runs, smoke tests)."""
    embeddings: str | None = None
    """finetune: the CLIP embedding store(s) of `features` (the images), from `monoray extract`."""
    zero_rows: str = "keep"
    """sae: all-zero feature rows are kept (similarity 0), dropped or refused (`ZERO_ROWS`)."""


@dataclass(frozen=True, slots=True)
class SweepSpace:
    path: Path
    name: str
    kind: str
    """A name in `monoray.trials.KINDS`."""
    data: Data
    fixed: dict[str, Any]
    search: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    sampler: Sampler
    budget: Budget
    resources: Resources
    baseline: Baseline
    description: str = ""
    scheduler: Scheduler = Scheduler()

    @property
    def trial_kind(self) -> TrialKind:
        return KINDS[self.kind]

    def extreme_points(self) -> Iterator[dict[str, Any]]:
        return extreme_points(self)

    @property
    def metric_names(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        """The space as plain data (logged to MLflow and stored with the sweep)."""
        from dataclasses import asdict

        out = asdict(self)
        out["path"] = str(self.path)
        return out


TOP = "(top level)"
TOP_KEYS = {
    "name",
    "description",
    "kind",
    "data",
    "fixed",
    "search",
    "objectives",
    "constraints",
    "sampler",
    "budget",
    "resources",
    "baseline",
    "scheduler",
}


class _Reader:
    """Validates one mapping of the YAML, naming file and key path in errors."""

    def __init__(self, file: Path) -> None:
        self.file = file

    def fail(self, key: str, expected: str, got: Any = None) -> InputError:
        shown = "" if got is None else f", got {got!r}"
        return InputError(f"{self.file}: {key}: expected {expected}{shown}")

    def mapping(self, value: Any, key: str, allowed: set[str] | None) -> dict[str, Any]:
        """A mapping whose keys are all in `allowed` (`None`: any key)."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, "a mapping", value)
        for k in value:
            if allowed is not None and k not in allowed:
                where = k if key == TOP else f"{key}.{k}"
                near = closest(k, allowed, cutoff=0.5)
                hint = f"did you mean {near!r}? " if near else ""
                raise InputError(
                    f"{self.file}: {where}: unknown key ({hint}expected one of "
                    f"{', '.join(sorted(allowed))})"
                )
        return value

    def number(self, value: Any, key: str, *, positive: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, "a number", value)
        if isinstance(value, int) and abs(value) > _MAX_INT_FLOAT:
            raise self.fail(key, "a finite number", "an integer too large for a float")
        if not math.isfinite(value) or (positive and value <= 0):
            raise self.fail(
                key, "a finite positive number" if positive else "a finite number", value
            )
        return float(value)

    def integer(self, value: Any, key: str, *, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"an integer >= {minimum}", value)
        return value

    def choice(self, value: Any, key: str, options: tuple[str, ...]) -> Any:
        if value not in options:
            raise self.fail(key, f"one of {', '.join(options)}", value)
        return value


def _coerce_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; accept it as the number it obviously is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _param(r: _Reader, name: str, raw: Any) -> Param:
    key = f"search.{name}"
    raw = r.mapping(raw, key, {"type", "low", "high", "choices", "step", "log", "when"})
    if "type" not in raw:
        raise r.fail(f"{key}.type", f"one of {', '.join(PARAM_TYPES)}")
    kind = r.choice(raw["type"], f"{key}.type", PARAM_TYPES)
    when = tuple(
        (str(other), tuple(v) if isinstance(v, list) else (v,))
        for other, v in r.mapping(raw.get("when"), f"{key}.when", None).items()
    )
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise r.fail(f"{key}.choices", "a non-empty list", choices)
        for extra in ("low", "high", "step", "log"):
            if extra in raw:
                raise r.fail(f"{key}.{extra}", "no bounds on a categorical parameter")
        return Param(name, kind, choices=tuple(_coerce_number(c) for c in choices), when=when)
    if "choices" in raw:
        raise r.fail(f"{key}.choices", f"no choices on a {kind} parameter")
    for bound in ("low", "high"):
        if bound not in raw:
            raise r.fail(f"{key}.{bound}", "a number")
    low = r.number(_coerce_number(raw["low"]), f"{key}.low", positive=kind == "loguniform")
    high = r.number(_coerce_number(raw["high"]), f"{key}.high", positive=kind == "loguniform")
    if not low < high:
        raise r.fail(f"{key}", f"low < high, got low={low:g} high={high:g}")
    step = None
    log = bool(raw.get("log", False))
    if kind == "int":
        if low != int(low) or high != int(high):
            raise r.fail(key, "integer low and high", (raw["low"], raw["high"]))
        if log and low < 1:
            raise r.fail(f"{key}.low", "an integer >= 1 when log: true", raw["low"])
        step = r.integer(raw.get("step", 1), f"{key}.step", minimum=1)
    elif "step" in raw or "log" in raw:
        raise r.fail(key, f"no step/log on a {kind} parameter (use loguniform for log scale)")
    return Param(name, kind, low=low, high=high, step=step, log=log, when=when)


def _constraint(r: _Reader, index: int, raw: Any, metrics: tuple[str, ...]) -> Constraint:
    key = f"constraints[{index}]"
    match = _CONSTRAINT.match(raw) if isinstance(raw, str) else None
    if not match:
        raise r.fail(key, "a string like 'dead_fraction <= 0.2'", raw)
    metric, op, bound = match.groups()
    if metric not in metrics:
        raise r.fail(key, f"a metric among {', '.join(metrics)}", metric)
    try:
        value = float(bound)
    except ValueError:
        raise r.fail(key, "a number after the operator", bound) from None
    if not math.isfinite(value):
        raise r.fail(key, "a finite bound", bound)
    return Constraint(metric, op, value)  # type: ignore[arg-type]


def _objectives(r: _Reader, raw: Any, kind: TrialKind) -> tuple[Objective, ...]:
    metrics = kind.metrics
    if raw is None:
        return tuple(Objective(m, mode) for m, mode in kind.objectives)  # type: ignore[arg-type]
    if not isinstance(raw, list) or not raw:
        raise r.fail("objectives", "a non-empty list of {metric, mode}", raw)
    out = []
    for i, item in enumerate(raw):
        item = r.mapping(item, f"objectives[{i}]", {"metric", "mode"})
        metric = r.choice(item.get("metric"), f"objectives[{i}].metric", metrics)
        mode = r.choice(item.get("mode", "max"), f"objectives[{i}].mode", MODES)
        out.append(Objective(metric, mode))
    if len({o.metric for o in out}) != len(out):
        raise r.fail("objectives", "distinct metrics")
    return tuple(out)


def apply_overrides(doc: dict[str, Any], overrides: list[str], file: Path) -> dict[str, Any]:
    """Apply `--set a.b=value` overrides (values parsed as YAML; `null` removes the key)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. budget.num_samples=4")
        parts = key.strip().split(".")
        node = doc
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise InputError(f"--set {key}: {file}: {part} is not a mapping")
            node = child
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(
                f"--set {key}: value is not valid YAML: {getattr(err, 'problem', err)}"
            ) from None
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return doc


def load_space(path: str | Path, overrides: list[str] | None = None) -> SweepSpace:
    """Read, override and validate a space file. Raises `InputError` on any problem."""
    file = Path(path)
    if not file.exists():
        raise InputError(f"{file}: search space file not found")
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{file}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except UnicodeDecodeError as err:
        raise InputError(f"{file}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{file}: cannot read the search space ({err.strerror})") from None
    except RecursionError:
        raise InputError(f"{file}: not valid YAML: nested too deeply") from None
    r = _Reader(file)
    doc = r.mapping(doc, TOP, TOP_KEYS)
    doc = apply_overrides(dict(doc), overrides or [], file)
    r.mapping(doc, TOP, TOP_KEYS)
    from_command_line = {item.partition("=")[0].strip() for item in overrides or []}

    defaults = {cls: field_defaults(cls) for cls in (Data, Sampler, Scheduler, Budget, Resources)}
    kind = r.choice(doc.get("kind", "sae"), "kind", tuple(KINDS))
    trial_kind = KINDS[kind]
    metrics = trial_kind.metrics
    name = doc.get("name") or file.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise r.fail("name", "letters, digits, '.', '_' or '-'", name)

    data_raw = r.mapping(
        doc.get("data"), "data", {"features", "val_features", "subset", "embeddings", "zero_rows"}
    )
    features = data_raw.get("features", defaults[Data]["features"])
    if not isinstance(features, str) or not features:
        raise r.fail("data.features", "'digits' or a path", features)
    val_features = data_raw.get("val_features")
    if val_features is not None and not isinstance(val_features, str):
        raise r.fail("data.val_features", "a path", val_features)
    subset = data_raw.get("subset")
    if subset is not None:
        subset = r.integer(subset, "data.subset", minimum=2)
    data = Data(
        features=_data_path(r, "data.features", features, from_command_line),
        val_features=_data_path(r, "data.val_features", val_features, from_command_line)
        if val_features
        else None,
        subset=subset,
        embeddings=_embeddings(r, kind, data_raw.get("embeddings"), from_command_line),
        zero_rows=_zero_rows(r, kind, data_raw.get("zero_rows", defaults[Data]["zero_rows"])),
    )

    fixed = r.mapping(doc.get("fixed"), "fixed", None)
    fixed = {k: _coerce_number(v) for k, v in fixed.items()}
    search_raw = r.mapping(doc.get("search"), "search", None)
    search = tuple(_param(r, str(n), v) for n, v in search_raw.items())
    names = [p.name for p in search]
    for p in search:
        if p.name in fixed:
            raise r.fail(f"search.{p.name}", "a parameter that is not also in fixed")
        for other, _ in p.when:
            if other not in names[: names.index(p.name)]:
                raise r.fail(
                    f"search.{p.name}.when.{other}", "a searched parameter listed above it"
                )

    objectives = _objectives(r, doc.get("objectives"), trial_kind)
    constraints_raw = doc.get("constraints") or []
    if not isinstance(constraints_raw, list):
        raise r.fail(
            "constraints", "a list of strings like 'dead_fraction <= 0.2'", constraints_raw
        )
    constraints = tuple(_constraint(r, i, c, metrics) for i, c in enumerate(constraints_raw))

    s = r.mapping(
        doc.get("sampler"), "sampler", {"type", "seed", "population_size", "n_startup_trials"}
    )
    sampler = Sampler(
        type=r.choice(s.get("type", defaults[Sampler]["type"]), "sampler.type", SAMPLERS),
        seed=r.integer(s.get("seed", defaults[Sampler]["seed"]), "sampler.seed", minimum=0),
        population_size=r.integer(
            s.get("population_size", defaults[Sampler]["population_size"]),
            "sampler.population_size",
            minimum=2,
        ),
        n_startup_trials=r.integer(
            s.get("n_startup_trials", defaults[Sampler]["n_startup_trials"]),
            "sampler.n_startup_trials",
            minimum=0,
        ),
    )
    sch = r.mapping(doc.get("scheduler"), "scheduler", {"type", "grace_epochs", "reduction_factor"})
    scheduler = Scheduler(
        type=r.choice(sch.get("type", defaults[Scheduler]["type"]), "scheduler.type", SCHEDULERS),
        grace_epochs=r.integer(
            sch.get("grace_epochs", defaults[Scheduler]["grace_epochs"]),
            "scheduler.grace_epochs",
            minimum=1,
        ),
        reduction_factor=r.integer(
            sch.get("reduction_factor", defaults[Scheduler]["reduction_factor"]),
            "scheduler.reduction_factor",
            minimum=2,
        ),
    )
    if scheduler.type == "fifo" and set(sch) - {"type"}:
        raise r.fail("scheduler", "no grace_epochs/reduction_factor with type fifo (no stopping)")
    b = r.mapping(doc.get("budget"), "budget", {"num_samples", "max_concurrent", "max_failures"})
    budget = Budget(
        num_samples=r.integer(
            b.get("num_samples", defaults[Budget]["num_samples"]), "budget.num_samples", minimum=1
        ),
        max_concurrent=r.integer(
            b.get("max_concurrent", defaults[Budget]["max_concurrent"]),
            "budget.max_concurrent",
            minimum=1,
        ),
        max_failures=r.integer(
            b.get("max_failures", defaults[Budget]["max_failures"]),
            "budget.max_failures",
            minimum=0,
        ),
    )
    res = r.mapping(doc.get("resources"), "resources", {"cpu", "gpu", "workers", "pack"})
    resources = Resources(
        cpu=r.number(res.get("cpu", defaults[Resources]["cpu"]), "resources.cpu", positive=True),
        gpu=_non_negative(r, res.get("gpu", defaults[Resources]["gpu"]), "resources.gpu"),
        workers=r.integer(
            res.get("workers", defaults[Resources]["workers"]), "resources.workers", minimum=0
        ),
        pack=r.integer(res.get("pack", defaults[Resources]["pack"]), "resources.pack", minimum=1),
    )
    if resources.pack > 1:
        _check_pack(r, kind, resources)
    base = doc.get("baseline", True)
    if isinstance(base, bool):
        baseline = Baseline(enabled=base)
    else:
        base = r.mapping(base, "baseline", {"enabled", "params"})
        params = r.mapping(base.get("params"), "baseline.params", set(names))
        for pname, value in params.items():
            _check_baseline_value(r, next(p for p in search if p.name == pname), value)
        enabled = base.get("enabled", True)
        if not isinstance(enabled, bool):
            raise r.fail("baseline.enabled", "true or false", enabled)
        baseline = Baseline(enabled=enabled, params=dict(params))
    if baseline.enabled and "mono_coef" in fixed:
        raise r.fail("baseline", "false when mono_coef is fixed (the baseline sets mono_coef = 0)")
    if sampler.type == "grid":
        _check_grid(r, search, budget)

    description = doc.get("description") or ""
    space = SweepSpace(
        path=file.resolve(),
        name=name,
        kind=kind,
        data=data,
        fixed=fixed,
        search=search,
        objectives=objectives,
        constraints=constraints,
        sampler=sampler,
        budget=budget,
        resources=resources,
        baseline=baseline,
        description=str(description),
        scheduler=scheduler,
    )
    _check_trial_keys(space)
    if baseline.enabled and sampler.type != "grid":  # a grid's baselines are its λ = 0 points
        _check_baseline_pins(r, search, baseline.params)
    return space


def _check_pack(r: _Reader, kind: str, resources: Resources) -> None:
    """What a pack of trials cannot be combined with."""
    if kind != "sae":
        raise r.fail("resources.pack", "1 for kind: finetune (packs train SAEs)", resources.pack)
    if resources.workers >= 2:
        raise r.fail("resources.pack", "1 with resources.workers >= 2", resources.pack)


def grid_points(search: tuple[Param, ...]) -> list[dict[str, Any]]:
    """Every combination of the searched choices (sampler `grid`), first parameter slowest."""
    names = [p.name for p in search]
    return [
        dict(zip(names, c, strict=True)) for c in itertools.product(*(p.choices for p in search))
    ]


def _check_grid(r: _Reader, search: tuple[Param, ...], budget: Budget) -> None:
    for p in search:
        if p.type != "categorical":
            raise r.fail(f"search.{p.name}.type", "categorical with sampler.type grid", p.type)
        if p.when:
            raise r.fail(f"search.{p.name}.when", "no `when` with sampler.type grid")
    size = math.prod(len(p.choices) for p in search)
    if budget.num_samples != size:
        raise r.fail("budget.num_samples", f"{size}, the number of grid points", budget.num_samples)


def _non_negative(r: _Reader, value: Any, key: str) -> float:
    value = r.number(value, key)
    if value < 0:
        raise r.fail(key, "a number >= 0", value)
    return value


def _check_baseline_pins(r: _Reader, search: tuple[Param, ...], params: dict[str, Any]) -> None:
    """A baseline pins every searched value it reaches (but λ) to the space's nominal one."""
    if "mono_coef" in params:
        raise r.fail("baseline.params.mono_coef", "no value (the baseline's λ is 0)")
    point = {**params, "mono_coef": 0.0}
    for p in search:
        active = all(point.get(other) in allowed for other, allowed in p.when)
        if active and p.name not in point:
            raise InputError(
                f"{r.file}: baseline.params.{p.name}: missing; a λ = 0 baseline pins every "
                f"searched value to the space's nominal one (baseline: {{params: {{{p.name}: ...}}}})"
            )


def _check_baseline_value(r: _Reader, p: Param, value: Any) -> None:
    key = f"baseline.params.{p.name}"
    if p.type == "categorical":
        if value not in p.choices:
            raise r.fail(key, f"one of {list(p.choices)}", value)
        return
    value = r.number(_coerce_number(value), key)
    assert p.low is not None and p.high is not None
    if not p.low <= value <= p.high:
        raise r.fail(key, f"a value in [{p.low:g}, {p.high:g}]", value)


def _embeddings(r: _Reader, kind: str, value: Any, from_command_line: set[str]) -> str | None:
    """`data.embeddings`: required where the kind takes it (finetune: the images' CLIP
    embeddings), else absent."""
    if "embeddings" not in KINDS[kind].data_keys:
        if value is not None:
            raise r.fail("data.embeddings", f"no embeddings for a kind: {kind} space", value)
        return None
    if not isinstance(value, str) or not value:
        raise r.fail("data.embeddings", "the path of the images' embedding store", value)
    return _data_path(r, "data.embeddings", value, from_command_line)


PROJECT_MARKERS = (".git", "pyproject.toml")
"""A directory holding one of these is a project root."""


def project_roots(file: Path) -> tuple[Path, ...]:
    """Where a space file's data may live: its project and the working directory.

    The project of a space file is the nearest directory at or above it that
    holds `.git` or `pyproject.toml` (else the file's own directory). The
    working directory counts too: it is where monoray runs and `./monoray-runs` lives.
    """
    here = file.resolve().parent
    project = next((d for d in (here, *here.parents) if _is_project(d)), here)
    return (project, Path.cwd().resolve())


def _is_project(directory: Path) -> bool:
    return any((directory / marker).exists() for marker in PROJECT_MARKERS)


def _zero_rows(r: _Reader, kind: str, value: Any) -> str:
    """`data.zero_rows`: SAE features only (finetune embeddings keep zero rows at similarity 0)."""
    from monoray.data import ZERO_ROWS

    if "zero_rows" not in KINDS[kind].data_keys and value != "keep":
        raise r.fail("data.zero_rows", f"no zero_rows for a kind: {kind} space", value)
    return r.choice(value, "data.zero_rows", ZERO_ROWS)


def _data_path(r: _Reader, key: str, value: str, from_command_line: set[str]) -> str:
    """Resolve a data path against the space file; a file may not point outside its project.

    A path set on the command line (`--set data.features=/shared/...`) is the
    user's own choice and may point anywhere.
    """
    if value == "digits":
        return value
    if "\0" in value:
        raise r.fail(key, "a path without NUL characters", value)
    resolved = (r.file.parent / value).resolve()  # an absolute value stays itself
    if {key, key.partition(".")[0]} & from_command_line:
        return str(resolved)
    roots = project_roots(r.file)
    if not any(resolved.is_relative_to(root) for root in roots):
        raise InputError(
            f"{r.file}: {key}: {value} resolves to {resolved}, outside the project "
            f"({' or '.join(map(str, dict.fromkeys(roots)))}); "
            f"pass it on the command line instead (--set {key}=PATH)"
        )
    return str(resolved)


def _check_trial_keys(space: SweepSpace) -> None:
    """Fixed and searched names must be keys the trial's config accepts."""
    allowed = space.trial_kind.config_keys()
    for where, names in (("fixed", space.fixed), ("search", [p.name for p in space.search])):
        for name in names:
            if name not in allowed:
                raise InputError(
                    f"{space.path}: {where}.{name}: unknown {space.kind} trial parameter "
                    f"(expected one of {', '.join(sorted(allowed))})"
                )


MAX_CHECKED_POINTS = 4096
"""`extreme_points` yields at most this many points."""


def extreme_points(space: SweepSpace) -> Iterator[dict[str, Any]]:
    """Every combination of each searched parameter's extremes, as trial parameters.

    Numeric parameters take `low` and `high`, categorical ones each choice; a
    conditional parameter appears only where its `when` holds. Building a
    trial config from each point (before anything runs) catches what only some
    trials would hit: λ < 0 at the bottom of a range, k > d_sae at the top.
    """
    values = [
        p.choices
        if p.type == "categorical"
        else (_as_int(p) if p.type == "int" else (p.low, p.high))
        for p in space.search
    ]
    seen: set[str] = set()
    for combo in itertools.islice(itertools.product(*values), MAX_CHECKED_POINTS):
        point: dict[str, Any] = {}
        for p, value in zip(space.search, combo, strict=True):
            if all(point.get(other) in allowed for other, allowed in p.when):
                point[p.name] = value
        key = repr(sorted(point.items(), key=lambda kv: kv[0]))
        if key not in seen:
            seen.add(key)
            yield point


def _as_int(p: Param) -> tuple[int, int]:
    """The lowest and highest values Optuna can suggest (`high` rounds down to a step)."""
    assert p.low is not None and p.high is not None
    low, step = int(p.low), p.step or 1
    return low, low + (int(p.high) - low) // step * step
