"""flexeval as a user installs it: the dependencies it declares, and a wheel (not an editable
checkout) in a fresh virtual environment, its commands run from another directory."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from flexeval.data import CONF_DIR, TASKS_DIR, data_dir

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def imported_distributions(folders: list[Path]) -> set[str]:
    """The distributions whose modules the code in `folders` imports (standard library aside)."""
    modules = set()
    for path in (p for folder in folders for p in folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    providers = importlib.metadata.packages_distributions()
    third_party = modules - set(sys.stdlib_module_names) - {"flexeval", "__future__"}
    return {normalized(providers[m][0]) for m in third_party}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_declared_dependencies_are_what_the_package_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalized(re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}
    assert imported_distributions([ROOT / "flexeval", ROOT / "tasks"]) == declared


def test_every_package_of_the_code_is_declared() -> None:
    """setuptools ships only the packages listed, and an editable install hides a missing one."""
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "flexeval").rglob("__init__.py")}
    assert found - declared == set()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the build reads, so that setuptools' build/ stays out of the checkout."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("flexeval", "conf", "tasks"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source)]
    subprocess.run([*build, "-w", str(out)], check=True, capture_output=True, text=True)
    (path,) = out.glob("flexeval-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment holding the wheel; its dependencies are this environment's packages
    (a path in a .pth file: torch is not downloaded again, and this checkout's editable finder,
    itself installed by a .pth, is not seen there)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)]
    subprocess.run(install, check=True, capture_output=True, text=True)
    return root


def run(venv: Path, cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLEXEVAL_DATA_DIR": str(data_dir())}
    return subprocess.run(
        [str(venv / "bin" / command[0]), *command[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_the_wheel_ships_every_config_and_task_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, inside in ((CONF_DIR, "flexeval/conf"), (TASKS_DIR, "flexeval/tasks")):
        shipped = {
            f"{inside}/{p.relative_to(folder)}"
            for p in folder.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }
        assert shipped <= names, sorted(shipped - names)


@pytest.mark.slow
def test_the_installed_app_runs_from_any_directory(venv: Path, tmp_path: Path) -> None:
    where = run(venv, tmp_path, "python", "-c", "import flexeval.data as d; print(d.CONF_DIR)").stdout
    assert where.strip() == str(next(venv.glob("lib/python*/site-packages/flexeval/conf")))
    result = run(venv, tmp_path, "python", "-m", "flexeval", "task=piqa", "limit=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| piqa | acc_norm |" in result.stdout
    assert len(list((tmp_path / "outputs").rglob("results.json"))) == 1


@pytest.mark.slow
def test_the_installed_lm_eval_command_knows_flexgen(venv: Path, tmp_path: Path) -> None:
    result = run(venv, tmp_path, "flexeval-lm-eval", "--model", "flexgen", "--tasks", "hellaswag", "--limit", "20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|hellaswag|" in result.stdout and "acc_norm" in result.stdout
