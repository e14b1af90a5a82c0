"""The layers of DESIGN.md hold, read from the import graph of cid_jax/ and convert/ (every import
statement counted, function-level ones included):

    errors  text/  sharding  cli  paths  runtime  _platforms   leaf helpers (errors: the user-error
                             classes every layer raises; cli presents them, for the tools only)
    models/                  Flax modules, presets, attention sites: imports only models/ and sharding
    weights/                 on-disk formats <-> param trees: never a trainer, a run or an entry point
    face/  data/             face analysis; FGID records and tf.data: no sampler, trainer or run
    build, run, metrics      the composition root; the run directory's one owner; the metric models
    sampling people inference scoring trainer train_eval export   the libraries of the tools: making images,
                             scoring them, training (no command-line module, no flag parsing)
    train generate evaluate aot app   the command lines, which parse flags and call the libraries
    convert/                 thin command-line wrappers

and there is no import cycle anywhere.
"""
import ast
import pathlib

from tests.helpers import REPO

ENTRY_POINTS = ("train", "trainer", "train_eval", "generate", "sampling", "people", "inference", "scoring", "evaluate",
                "export", "aot", "app")
COMMAND_LINES = ("train", "generate", "evaluate", "aot", "app")
ABOVE_DATA = ENTRY_POINTS + ("run", "build")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    files = sorted(REPO.glob("cid_jax/**/*.py")) + sorted(REPO.glob("convert/*.py"))
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:  # `from cid_jax import run` imports the module cid_jax.run
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(graph, where: str, allowed=None, forbidden=()) -> list[str]:
    bad = []
    for m, deps in graph.items():
        if not _in(m, where):
            continue
        for d in sorted(deps):
            if d == "cid_jax":  # the package root (its version string) is empty of code
                continue
            if allowed is not None and not any(_in(d, a) for a in allowed):
                bad.append(f"{m} -> {d}")
            if any(_in(d, f"cid_jax.{f}") for f in forbidden):
                bad.append(f"{m} -> {d}")
    return bad


def test_the_graph_is_read():
    g = import_graph()
    assert "cid_jax.models.unet" in g and "cid_jax.models.attention" in g["cid_jax.models.unet"]
    assert "cid_jax.data.builder" in g["cid_jax.data.synthetic.__main__"]  # a function-level import


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_models_import_only_models_and_sharding():
    assert _violations(import_graph(), "cid_jax.models", allowed=("cid_jax.models", "cid_jax.sharding")) == []


def test_weights_import_no_run_trainer_or_entry_point():
    assert _violations(import_graph(), "cid_jax.weights", forbidden=ABOVE_DATA + ("data",)) == []


def test_face_and_data_import_no_sampler_trainer_or_run():
    g = import_graph()
    assert _violations(g, "cid_jax.face", forbidden=ABOVE_DATA) == []
    assert _violations(g, "cid_jax.data", forbidden=ABOVE_DATA) == []


def test_leaf_helpers_stay_leaves():
    g = import_graph()
    assert _violations(g, "cid_jax.text", allowed=("cid_jax.text", "cid_jax.errors")) == []
    assert g["cid_jax.errors"] == set() and g["cid_jax.cli"] == {"cid_jax.errors"}
    assert g["cid_jax.sharding"] == set() and g["cid_jax._platforms"] == set()
    assert g["cid_jax.paths"] <= {"cid_jax.errors"}
    assert _violations(g, "cid_jax.runtime", allowed=("cid_jax.cli", "cid_jax.paths")) == []


def test_only_the_tools_present_errors():
    """cid_jax.cli (flag parsing, the top-level guard) is for command-line modules; every library
    layer raises `cid_jax.errors` and leaves the presenting to whichever tool called it."""
    tools = ("cid_jax.train", "cid_jax.generate", "cid_jax.evaluate", "cid_jax.aot", "cid_jax.app",
             "cid_jax.data.prepare", "cid_jax.data.builder", "cid_jax.data.synthetic", "convert")
    g = import_graph()
    users = sorted(m for m, deps in g.items() if "cid_jax.cli" in deps and not any(_in(m, t) for t in tools))
    assert users == []


def test_the_libraries_import_no_command_line():
    """Training's evaluation, the app and evaluate's scoring use inference/scoring, never a CLI module."""
    g = import_graph()
    for m in ("cid_jax.inference", "cid_jax.scoring", "cid_jax.sampling", "cid_jax.people", "cid_jax.trainer",
              "cid_jax.train_eval", "cid_jax.export"):
        assert _violations(g, m, forbidden=COMMAND_LINES) == [], m
    assert "cid_jax.generate" not in g["cid_jax.evaluate"] and "cid_jax.evaluate" not in g["cid_jax.train_eval"]


def test_build_and_run_sit_below_the_entry_points():
    g = import_graph()
    for m in ("cid_jax.build", "cid_jax.run", "cid_jax.metrics"):
        assert _violations(g, m, forbidden=ENTRY_POINTS) == []


def test_cycle_detector_detects():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
