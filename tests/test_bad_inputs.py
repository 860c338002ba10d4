"""Bad inputs: fuzzed search spaces and command lines, and a hand-written corpus.

Every bad input ends with exit code 2 and one line on stderr naming the problem
(never a traceback), and leaves no records: after a refused `monoray sweep` the
project directory holds no file at all (no optuna.db, no mlflow.db, no run), and
a refused `monoray train` never creates its run directory.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from monoray.cli import main
from monoray.errors import InputError
from monoray.sweep.space import TOP_KEYS, SweepSpace, load_space

REPO = Path(__file__).parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"
DEMO_DOC: dict[str, Any] = yaml.safe_load(DEMO.read_text())
SPACE_KEYS = sorted(
    TOP_KEYS
    | {"features", "val_features", "subset", "type", "low", "high", "choices", "step", "log"}
    | {"when", "metric", "mode", "seed", "population_size", "n_startup_trials", "num_samples"}
    | {"max_concurrent", "max_failures", "cpu", "gpu", "workers", "enabled", "params"}
    | {"arch", "k", "mono_coef", "d_sae", "epochs", "lr", "aux_coef", "batch_size"}
)
NASTY = [
    "",
    "digits",
    "nan",
    "inf",
    "-inf",
    "1e",
    "1e999",
    "-1",
    "0",
    "1.0e-3",
    "true",
    "~",
    "topk",
    "batchtopk",
    "loguniform",
    "categorical",
    "r2",
    "/etc",
    "../../../../../etc/passwd",
    "a\x00b",
    "λ",
    "dead_fraction <= 0.2",
    "r2 >= 1e",
    "monoscore_mean <= nan",
]
KEY_TEXT = st.text(alphabet=string.ascii_letters + string.digits + "_-λ", min_size=1, max_size=6)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-1000, max_value=1000),
    st.sampled_from([2**64, -(2**64), 10**400]),
    st.floats(),
    st.sampled_from(NASTY),
    st.text(max_size=8),
)
KEYS = st.one_of(st.sampled_from(SPACE_KEYS), KEY_TEXT, st.integers(-3, 3))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=24,
)
DOCUMENTS = st.one_of(st.dictionaries(KEYS, VALUES, max_size=8), VALUES)


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path of a parsed YAML document."""
    if prefix:
        yield prefix
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        yield from _paths(value, (*prefix, key))


DEMO_PATHS = list(_paths(DEMO_DOC))


@st.composite
def mutated_demo(draw: st.DrawFn) -> dict[str, Any]:
    """The demo space with 1-3 values replaced, keys deleted or unknown keys added."""
    doc = copy.deepcopy(DEMO_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(DEMO_PATHS))
        try:
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]]  # the path may be gone after an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete" or not isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[draw(KEY_TEXT)] = draw(VALUES)
    return doc


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs").resolve()


def write_space(directory: Path, doc: Any, name: str = "space.yaml") -> Path:
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, allow_unicode=True))
    return path


def assert_names_file_and_key(message: str, path: Path) -> None:
    """One line: `<file>: <key>: <problem>`, the key rooted in the schema (or called unknown);
    a document that is not YAML at all has no key: `<file>: not valid YAML ...`."""
    assert "\n" not in message, message
    prefix = f"{path}: "
    assert message.startswith(prefix), message
    key = message[len(prefix) :].split(": ")[0]
    root = key.split(".")[0].split("[")[0]
    named = root in TOP_KEYS | {"(top level)"} or "unknown key" in message
    assert named or key.startswith("not valid YAML"), message


def load_or_refuse(path: Path, overrides: list[str] | None = None) -> None:
    try:
        space = load_space(path, overrides)
    except InputError as err:
        if str(err).startswith("--set "):
            assert "\n" not in str(err)
        else:
            assert_names_file_and_key(str(err), path)
    else:
        assert isinstance(space, SweepSpace)


# --- the search-space loader, fuzzed ----------------------------------------------


@given(doc=DOCUMENTS)
def test_random_documents_load_or_name_file_and_key(work: Path, doc: Any) -> None:
    load_or_refuse(write_space(work, doc))


@given(doc=mutated_demo())
def test_mutated_demo_loads_or_names_file_and_key(work: Path, doc: dict[str, Any]) -> None:
    load_or_refuse(write_space(work, doc))


@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_raw_text_loads_or_refuses_in_one_line(work: Path, text: str | bytes) -> None:
    path = work / "raw.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    try:
        load_space(path)
    except InputError as err:
        assert "\n" not in str(err) and str(err).startswith(f"{path}: "), str(err)


OVERRIDE_KEYS = st.one_of(
    st.sampled_from([".".join(map(str, p)) for p in DEMO_PATHS]),
    st.lists(KEY_TEXT, min_size=1, max_size=3).map(".".join),
)
OVERRIDES = st.one_of(
    st.tuples(OVERRIDE_KEYS, VALUES.map(lambda v: yaml.safe_dump(v, default_flow_style=True))).map(
        lambda kv: f"{kv[0]}={kv[1].strip().removesuffix('...').strip()}"
    ),
    st.text(max_size=20),
)


@given(overrides=st.lists(OVERRIDES, min_size=1, max_size=3))
def test_fuzzed_overrides_load_or_refuse_in_one_line(work: Path, overrides: list[str]) -> None:
    load_or_refuse(DEMO, overrides)


# --- the command line, fuzzed ---------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`monoray ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse errors exit from inside parse_args
            code = exc.code
    return int(code or 0), err.getvalue()


def assert_refused(code: int, err: str, command: str, needle: str = "") -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    # argparse reports options no subcommand knows as `monoray: error: unrecognized ...`
    assert lines[0].startswith((f"monoray {command}: error: ", "monoray: error: ")), err
    assert needle in lines[0], err


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_dir()] if root.exists() else []


ARG_VALUES = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats().map(repr),
    st.sampled_from([v for v in NASTY if "\x00" not in v]),
    st.text(alphabet=string.ascii_letters + string.digits + "._,/:", max_size=10),
)


def _options(command: str) -> list[str]:
    from monoray.cli import build_parser

    parser = build_parser([command])
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return sorted(
        s for a in sub._actions for s in a.option_strings if s.startswith("--") and s != "--help"
    )


TRAIN_OPTIONS = _options("train")


@settings(max_examples=40)
@given(
    flags=st.lists(st.tuples(st.sampled_from(TRAIN_OPTIONS), ARG_VALUES), min_size=1, max_size=6)
)
def test_fuzzed_train_flags_exit_2_in_one_line(work: Path, flags: list[tuple[str, str]]) -> None:
    """Random options and values, ending in `--epochs 0`: refused before anything trains."""
    out = work / "train-out"
    argv = ["train", *[a for flag, value in flags for a in (flag, value)], "--epochs", "0"]
    code, err = run_cli([*argv, "--out", str(out)])
    assert_refused(code, err, "train")
    assert not out.exists()


@settings(max_examples=30)
@given(doc=st.one_of(mutated_demo(), DOCUMENTS), overrides=st.lists(OVERRIDES, max_size=2))
def test_fuzzed_sweeps_exit_2_and_leave_no_records(
    work: Path, doc: Any, overrides: list[str]
) -> None:
    """Random spaces and `--set`s, ending in `fixed.epochs=0`: refused before any record."""
    root = work / "sweep-root"
    space = write_space(work, doc, "sweep.yaml")
    sets = [a for item in [*overrides, "kind=sae", "fixed.epochs=0"] for a in ("--set", item)]
    code, err = run_cli(["sweep", str(space), "--root", str(root), "--quiet", *sets])
    assert_refused(code, err, "sweep")
    assert files_under(root) == []


@settings(max_examples=20)
@given(name=ARG_VALUES, command=st.sampled_from(["pareto", "inspect"]))
def test_fuzzed_names_and_paths_exit_2(work: Path, name: str, command: str) -> None:
    root = work / "empty-root"
    argv = ["pareto", name or "x", "--root", str(root)] if command == "pareto" else []
    argv = argv or ["inspect", str(work / "no-such-run" / name)]
    code, err = run_cli(argv)
    assert_refused(code, err, command)
    assert files_under(root) == []


# --- hand-written corpus ------------------------------------------------------------

BASE_SPACE = {
    "data": {"features": "digits"},
    "fixed": {"arch": "topk", "d_sae": 64, "epochs": 1, "batch_size": 128},
    "search": {"mono_coef": {"type": "loguniform", "low": 1e-3, "high": 0.3}},
    "budget": {"num_samples": 2},
}


def space_with(**changes: Any) -> dict[str, Any]:
    """BASE_SPACE with `a__b=value` set (or removed when value is None)."""
    doc = copy.deepcopy(BASE_SPACE)
    for dotted, value in changes.items():
        node = doc
        keys = dotted.split("__")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return doc


@pytest.fixture(scope="module")
def data_files(work: Path) -> dict[str, Path]:
    """Small feature files, each wrong in one way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    files = {
        "good": {"features": x, "labels": np.arange(40) % 4},
        "nan": {"features": np.where(np.arange(8) == 3, np.nan, x)},
        "inf": {"features": np.where(np.arange(8) == 5, np.inf, x)},
        "empty": {"features": np.zeros((0, 8), np.float32)},
        "labels7": {"features": x, "labels": np.arange(7)},
        "dim5": {"features": x[:, :5]},
        "rank1": {"features": x[:, 0]},
    }
    directory = work / "corpus" / "data"  # beside the corpus' space files: inside their project
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, arrays in files.items():
        paths[name] = directory / f"{name}.npz"
        np.savez(paths[name], **arrays)
    garbage = directory / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    paths["garbage"] = garbage
    return paths


def _sweep_cases(work: Path, data: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after `monoray sweep`, text the error line must contain)."""
    d = work / "corpus"
    d.mkdir(exist_ok=True)
    outside = work.parent / "outside.npz"  # beside the project tree, not in it
    outside.write_bytes(data["good"].read_bytes())
    (d / "link.npz").unlink(missing_ok=True)
    (d / "link.npz").symlink_to(outside)
    (d / "isdir.yaml").mkdir(exist_ok=True)
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (d / "python.yaml").write_text("kind: !!python/object/apply:os.system ['true']\n")
    rel = os.path.relpath(data["nan"], d)  # relative to the space file

    def space(name: str, **changes: Any) -> str:
        return str(write_space(d, space_with(**changes), f"{name}.yaml"))

    uniform = {"type": "uniform", "low": -0.1, "high": 0.3}
    return {
        "unknown top-level key": ([space("a", bogus=1)], "bogus: unknown key"),
        "unknown nested key": ([space("b", budget__trials=3)], "budget.trials: unknown key"),
        "unknown trial parameter": ([space("c", fixed__learning_rate=0.1)], "fixed.learning_rate"),
        "wrong type: bound": ([space("d", search__mono_coef__low="abc")], "expected a number"),
        "wrong type: budget": ([space("e", budget__num_samples="ten")], "budget.num_samples"),
        "wrong type: fixed": ([space("f", fixed=5)], "fixed: expected a mapping"),
        "wrong type: when": (
            [space("g", search__mono_coef__when=[["arch"]])],
            "search.mono_coef.when: expected a mapping",
        ),
        "wrong type: baseline.enabled": (
            [space("h", baseline={"enabled": "yes"})],
            "baseline.enabled: expected true or false",
        ),
        "wrong type: fixed value": ([space("i", fixed__lr="fast")], "lr must be float"),
        "inverted range": (
            [space("j", search__mono_coef__low=0.3, search__mono_coef__high=0.001)],
            "low < high",
        ),
        "integer too large": ([space("k", search__mono_coef__high=10**400)], "too large"),
        "constraint without a number": ([space("l", constraints=["r2 >= 1e"])], "constraints[0]"),
        "unknown scheduler": (
            [space("sch1", scheduler={"type": "asha"})],
            "scheduler.type: expected one of fifo, mo_asha",
        ),
        "misspelt scheduler key": (
            [space("sch2", scheduler={"type": "mo_asha", "grace_epoch": 2})],
            "scheduler.grace_epoch: unknown key (did you mean 'grace_epochs'?",
        ),
        "bad reduction factor": (
            [space("sch3", scheduler={"type": "mo_asha", "reduction_factor": 1})],
            "scheduler.reduction_factor: expected an integer >= 2",
        ),
        "negative lambda in a range": (
            [space("m", search__mono_coef=uniform)],
            "mono_coef must be >= 0.0, got -0.1",
        ),
        "negative lambda among choices": (
            [space("n", search__mono_coef={"type": "categorical", "choices": [0.1, -0.5]})],
            "mono_coef must be >= 0.0, got -0.5",
        ),
        "negative lambda fixed": (
            [space("o", fixed__mono_coef=-1, baseline=False, search={})],
            "mono_coef must be >= 0.0",
        ),
        "k > d_sae at the top of a range": (
            [
                space(
                    "p",
                    search__k={"type": "int", "low": 4, "high": 300},
                    baseline={"params": {"k": 8}},
                )
            ],
            "k 300 is larger than d_sae 64",
        ),
        "zero samples": ([space("q", budget__num_samples=0)], "budget.num_samples"),
        "zero samples: --num-samples": ([space("r"), "--num-samples", "0"], "--num-samples"),
        "zero rows of features": ([space("s", data__features=str(data["empty"]))], "has no rows"),
        "subset of 0": ([space("t", data__subset=0)], "data.subset"),
        "NaN in features": ([space("u", data__features=rel)], "has NaN in 40 rows"),
        "inf in features": ([space("v", data__features=str(data["inf"]))], "has inf in 40 rows"),
        "mismatched dims train/val": (
            [space("w", data__features=str(data["good"]), data__val_features=str(data["dim5"]))],
            "dim 5 does not match",
        ),
        "features not 2-D": ([space("x", data__features=str(data["rank1"]))], "must be 2-D"),
        "labels of the wrong length": (
            [space("y", data__features=str(data["labels7"]))],
            "labels has 7 entries but features has 40 rows",
        ),
        "missing space file": ([str(d / "absent.yaml")], "search space file not found"),
        "missing features file": (
            [space("z", data__features="absent.npz")],
            "no such file or directory",
        ),
        "unreadable space: a directory": (
            [str(d / "isdir.yaml")],
            "cannot read the search space",
        ),
        "unreadable space: not UTF-8": ([str(d / "latin1.yaml")], "not UTF-8 text"),
        "unreadable features: not a zip": (
            [space("aa", data__features=str(data["garbage"]))],
            "not a readable .npz file",
        ),
        "python tag in the space": ([str(d / "python.yaml")], "not valid YAML"),
        "data outside the project: absolute": (
            [space("ab", data__features="/etc")],
            "outside the project",
        ),
        "data outside the project: ..": (
            [space("ac", data__features="../../../../../../etc/passwd")],
            "outside the project",
        ),
        "data outside the project: symlink": (
            [space("ad", data__features="link.npz")],
            "outside the project",
        ),
        "NUL in a data path": ([space("ae", data__features="a\x00b")], "without NUL"),
        "bad --set": ([space("af"), "--set", "budget"], "expected KEY=VALUE"),
        "bad --set YAML": ([space("ag"), "--set", "fixed.lr=[1"], "not valid YAML"),
        "--set into a scalar": (
            [space("ah"), "--set", "budget.num_samples.x=1"],
            "is not a mapping",
        ),
        "unsupported storage": (
            [space("ai"), "--storage", "mysql://u@127.0.0.1/x"],
            "expected a sqlite or postgresql URL",
        ),
        "unreachable PostgreSQL storage": (
            [space("aj"), "--storage", "postgresql://u:s3cret@127.0.0.1:1/optuna"],
            "postgresql://u:***@127.0.0.1:1/optuna: cannot open it",
        ),
        "unreachable PostgreSQL tracking": (
            [space("ak"), "--tracking-uri", "postgresql://u:s3cret@127.0.0.1:1/mlflow"],
            "cannot reach it",
        ),
        "unreachable MLflow server": (
            [space("al"), "--tracking-uri", "http://127.0.0.1:1"],
            "cannot reach it",
        ),
        "unsupported tracking URI": (
            [space("am"), "--tracking-uri", "ftp://127.0.0.1/x"],
            "expected an http(s), sqlite or postgresql URI",
        ),
        "resume of nothing": ([space("an"), "--resume"], "no sweep named"),
        "unknown option": ([space("ao"), "--budget", "3"], "unrecognized arguments"),
    }


def _train_cases(work: Path, data: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after `monoray train`, text the error line must contain)."""
    d = work / "train-corpus"
    d.mkdir(exist_ok=True)
    (d / "cfg-dir").mkdir(exist_ok=True)
    (d / "bytes.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (d / "unknown.yaml").write_text("arch: topk\nlearning_rate: 0.1\n")
    (d / "list.yaml").write_text("- arch\n- topk\n")
    topk = ["--arch", "topk"]
    return {
        "missing --arch": ([], "--arch is required"),
        "unknown arch": (["--arch", "resnet"], "invalid choice"),
        "wrong type": ([*topk, "--k", "eight"], "invalid int value"),
        "negative lambda": ([*topk, "--mono-coef", "-1"], "mono_coef must be >= 0.0"),
        "NaN lr": ([*topk, "--lr", "nan"], "lr must be > 0"),
        "k > d_sae": ([*topk, "--k", "300", "--d-sae", "128"], "k 300 is larger than d_sae 128"),
        "zero epochs": ([*topk, "--epochs", "0"], "epochs must be > 0"),
        "mismatched d_in": ([*topk, "--d-in", "768"], "does not match the config's d_in 768"),
        "NaN features": ([*topk, "--features", str(data["nan"])], "has NaN in 40 rows"),
        "inf features": ([*topk, "--features", str(data["inf"])], "has inf in 40 rows"),
        "zero rows": ([*topk, "--features", str(data["empty"])], "has no rows"),
        "labels of the wrong length": (
            [*topk, "--features", str(data["labels7"])],
            "labels has 7 entries but features has 40 rows",
        ),
        "mismatched val dim": (
            [*topk, "--features", str(data["good"]), "--val-features", str(data["dim5"])],
            "dim 5 does not match",
        ),
        "val without features": ([*topk, "--val-features", str(data["good"])], "needs --features"),
        "bad val fraction": (
            [*topk, "--features", str(data["good"]), "--val-fraction", "1.5"],
            "val_fraction must be in (0, 1)",
        ),
        "missing features": ([*topk, "--features", str(d / "absent.npz")], "no such file"),
        "missing config": ([*topk, "--config", str(d / "absent.yaml")], "no such file"),
        "unreadable config: a directory": (
            [*topk, "--config", str(d / "cfg-dir")],
            "cannot read the config",
        ),
        "unreadable config: not UTF-8": ([*topk, "--config", str(d / "bytes.yaml")], "UTF-8"),
        "config: unknown key": (["--config", str(d / "unknown.yaml")], "'learning_rate'"),
        "config: not a mapping": (["--config", str(d / "list.yaml")], "expected a mapping"),
        "garbage features": ([*topk, "--features", str(data["garbage"])], "not a readable .npz"),
    }


def test_hand_written_sweep_corpus(work: Path, data_files: dict[str, Path]) -> None:
    cases = _sweep_cases(work, data_files)
    root = work / "corpus-root"
    for name, (args, needle) in cases.items():
        code, err = run_cli(["sweep", *args, "--root", str(root), "--quiet"])
        assert_refused(code, err, "sweep", needle)
        assert "s3cret" not in err, (name, err)
        assert files_under(root) == [], (name, files_under(root))


def test_hand_written_train_corpus(work: Path, data_files: dict[str, Path]) -> None:
    cases = _train_cases(work, data_files)
    out = work / "corpus-run"
    for _name, (args, needle) in cases.items():
        code, err = run_cli(["train", *args, "--out", str(out), "--no-progress"])
        assert_refused(code, err, "train", needle)
        assert not out.exists()


def test_a_path_set_on_the_command_line_may_point_anywhere(work: Path) -> None:
    """The project rule binds space files; the user at the command line chooses freely."""
    space = write_space(work, space_with(), "cmdline.yaml")
    loaded = load_space(space, ["data.features=/etc"])
    assert loaded.data.features == "/etc"
    with pytest.raises(InputError, match="outside the project"):
        load_space(write_space(work, space_with(data__features="/etc"), "file.yaml"))
