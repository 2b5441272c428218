"""The package's layers hold: import-linter's contracts (.importlinter), app.py's imports, short functions."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

CONFIG = ROOT / ".importlinter"
CONTRACT_NAMES = [
    "Layers: training | tools above view above core",
    "The core imports neither gradio nor matplotlib nor any drawing",
    "Nothing the product runs imports training or tools",
    "No import cycle anywhere in the package",
    "Core in three parts: studies > explorer > one image > weights",
]
# The modules the core's layers name: a small package made for a test needs them to exist.
CORE_LAYERS = ("studies/__init__", "weights/__init__", "explorer", "insight", "inside", "preprocess", "probes", "runtime",
               "metrics", "capture", "blocks", "model", "errors")


def lint_imports(cwd: Path, config: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.is_file():
        pytest.fail(f"lint-imports is not installed beside {sys.executable}: pip install -r requirements.txt")
    return subprocess.run([str(exe), "--no-cache", str(config)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_every_import_linter_contract_is_kept():
    result = lint_imports(ROOT, CONFIG)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for name in CONTRACT_NAMES:
        assert f"{name} KEPT" in out, out[-4000:]
    assert f"Contracts: {len(CONTRACT_NAMES)} kept, 0 broken." in out


def _fake_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "resnet_demo" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in ("", "core", "view", "training", "tools"):
        (root / "resnet_demo" / folder).mkdir(parents=True, exist_ok=True)
        (root / "resnet_demo" / folder / "__init__.py").touch()
    for name in CORE_LAYERS:
        path = root / "resnet_demo" / "core" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


@pytest.mark.parametrize(
    ("files", "broken"),
    [
        ({"core/a.py": "from resnet_demo.view import b\n", "view/b.py": ""}, CONTRACT_NAMES[0]),
        ({"core/a.py": "import matplotlib\n"}, CONTRACT_NAMES[1]),
        ({"view/a.py": "from resnet_demo.tools import b\n", "tools/b.py": ""}, CONTRACT_NAMES[2]),
        ({"core/a.py": "from resnet_demo.core import b\n", "core/b.py": "from resnet_demo.core import a\n"},
         CONTRACT_NAMES[3]),
        ({"core/weights/a.py": "from resnet_demo.core import explorer\n"}, CONTRACT_NAMES[4]),
        ({"core/capture.py": "from resnet_demo.core.studies import b\n", "core/studies/b.py": ""}, CONTRACT_NAMES[4]),
    ],
    ids=["core-imports-view", "core-imports-matplotlib", "view-imports-tools", "cycle-in-core",
         "weights-import-the-explorer", "one-image-core-imports-a-study"],
)
def test_a_wrong_import_breaks_the_contract_by_name(tmp_path, files, broken):
    # The project's own contracts, run on a small package that breaks one of them on purpose.
    _fake_package(tmp_path, files)
    result = lint_imports(tmp_path, CONFIG)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert f"{broken} BROKEN" in out, out[-3000:]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_app_imports_the_view_and_only_the_core_error_types():
    # app.py is a module outside the package: import-linter cannot take it as a root, so its rule is here.
    ours = [m for m in _imports(ROOT / "app.py") if m.split(".")[0] == "resnet_demo"]
    assert ours, "app.py should build the page from resnet_demo.view"
    wrong = [m for m in ours if not (m.startswith("resnet_demo.view") or m == "resnet_demo.core.errors")]
    assert wrong == [], f"app.py may import resnet_demo.view and resnet_demo.core.errors only, not {wrong}"


def test_the_core_draws_nothing():
    # import-linter cannot forbid a submodule of an external package (PIL.ImageDraw): checked here.
    for path in sorted((ROOT / "resnet_demo" / "core").rglob("*.py")):
        source = path.read_text()
        drawing = [m for m in _imports(path) if m in ("PIL.ImageDraw", "PIL.ImageFont")]
        drawing += [name for name in ("ImageDraw", "ImageFont") if f"import {name}" in source]
        assert drawing == [], f"{path.name} draws ({drawing}): drawing belongs in resnet_demo/view"


MAX_LINES = 60


@pytest.mark.parametrize("path", ["app.py", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "resnet_demo" / "view").glob("*.py"))])
def test_page_functions_are_short(path):
    tree = ast.parse((ROOT / path).read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES]
    assert long == [], f"{path}: functions longer than {MAX_LINES} lines: {long}"


def test_the_training_command_is_split_into_short_steps():
    tree = ast.parse((ROOT / "resnet_demo" / "training" / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= MAX_LINES
