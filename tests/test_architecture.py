"""House rules that code review keeps missing: checked by reading the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

FORBIDDEN_IN_ENGINE = {"bot", "discord", "slack_bolt", "slack_sdk"}
TORCH_WORLD = {"torch", "diffusers", "transformers", "accelerate"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_engine_never_imports_the_bot_or_a_chat_platform() -> None:
    offenders = {str(p.relative_to(REPO)): imported_roots(p) & FORBIDDEN_IN_ENGINE for p in (REPO / "engine").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_bot_never_imports_torch_or_diffusers() -> None:
    offenders = {str(p.relative_to(REPO)): imported_roots(p) & TORCH_WORLD for p in (REPO / "bot").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_only_the_pipeline_loaders_and_the_tiny_builders_import_diffusers() -> None:
    users = sorted(str(p.relative_to(REPO)) for p in (REPO / "engine").rglob("*.py") if "diffusers" in imported_roots(p))
    assert users == ["engine/pipelines/loaders.py", "engine/pipelines/quantise.py", "engine/tiny/builders.py",
                     "engine/tiny/parts.py"]


def test_only_the_ray_worker_imports_ray() -> None:
    # Ray is an optional extra ([cluster]); its one import sits inside a function there (import_ray)
    users = sorted(str(p.relative_to(REPO)) for root in ("engine", "bot", "web") for p in (REPO / root).rglob("*.py")
                   if "ray" in imported_roots(p))
    assert users == ["engine/cluster/ray_worker.py"]


def test_importing_the_engine_and_the_cli_loads_no_torch() -> None:
    # Nothing runs at import time: the bot must start answering before torch is even imported.
    code = "import sys, engine, bot.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % TORCH_WORLD
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_import_contracts_hold() -> None:
    # [tool.importlinter] in pyproject.toml: engine imports no bot, web or chat platform; web none of the bot; bot uses the
    # engine only through `engine` itself, no two sibling modules import each other.
    done = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "4 kept, 0 broken" in done.stdout


def test_no_module_in_engine_or_bot_passes_400_lines() -> None:
    # Split a file when it passes ~400 lines (../shared/DESIGN.md); the slack is for a docstring.
    roots = [REPO / "engine", REPO / "bot", REPO / "web"]
    long = {str(p.relative_to(REPO)): n for root in roots for p in root.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert long == {}
