"""Every benchmark script still runs after the code it measures moves: each one answers --help,
every engine/bot name it imports (at the top or inside a function) resolves, and each script
that can run on a CPU runs with its smallest arguments. The figures are not checked here: a
benchmark is not a test (docs/PERFORMANCE.md has them)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))

# The smallest run of each script that can run on this CPU.
SMALLEST: dict[str, list[str]] = {
    "engine_overhead.py": ["--jobs", "2", "--steps", "1", "--size", "64"],
    "eta.py": ["--mode", "sim", "--history-jobs", "4", "--jobs", "6", "--gap", "2", "--scale", "0.002"],
    "previews.py": ["--sizes", "64", "--repeats", "1", "--tiny-steps", "2"],
    "preview_safety.py": ["--runs", "1", "--sides", "64"],
    "router_eval.py": ["--profile", "tiny", "--stages", "rules,embeddings"],
    "router_fit.py": ["--precision", "0.5"],
    "router_learning.py": ["--train", "8", "--fresh", "8", "--dev", "bench/router_heldout.jsonl"],
    "router_gpu_check.py": ["cpu"],
    "safety_detectors.py": ["--runs", "1"],
    "web.py": ["--jobs", "20", "--requests", "2"],
    "placement_sweep.py": ["--gpu-gb", "24", "--seeds", "1"],
    "scheduler.py": ["--jobs", "20", "--users", "3", "--gpu-gb", "24", "--placement", "auto"],
    "scheduler_workers.py": ["--workers", "2", "--jobs", "20", "--users", "3"],
}
# Scripts that drive another bench script as a subprocess (whose own imports are checked here).
DRIVES: dict[str, str] = {"placement_sweep.py": "scheduler.py"}
# Run elsewhere with its smallest arguments: tests/test_engine_load.py checks every key it reports.
RUN_ELSEWHERE = {"load.py"}
# CUDA only (they exit with a readable line on a machine without it): --help and imports here.
CUDA_ONLY = {"cluster_gpu.py", "gpu_check.py", "quant_gpu.py", "residency_gpu.py", "safety_gpu_check.py"}


def run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def project_imports(script: str) -> list[tuple[str, str | None]]:
    """(module, name) for every `from engine|bot... import name` and `import engine|bot...` in the script."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse((BENCH / script).read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("engine", "bot", "web"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] in ("engine", "bot", "web")]
    return found


def test_every_script_has_a_way_to_run_here() -> None:
    assert set(SCRIPTS) == set(SMALLEST) | RUN_ELSEWHERE | CUDA_ONLY


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_answers_help(script: str) -> None:
    done = run(script, "--help", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_project_name_the_script_imports_exists(script: str) -> None:
    missing = []
    for module_name, name in project_imports(script):
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError:
                missing.append(f"{module_name}.{name}")
    if script in DRIVES:
        assert DRIVES[script] in (BENCH / script).read_text(encoding="utf-8")
        assert project_imports(DRIVES[script]), f"{DRIVES[script]} imports nothing from the project"
    else:
        assert project_imports(script), f"{script} imports nothing from the project"
    assert not missing, f"{script} imports names that no longer exist: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_the_script_runs_with_its_smallest_arguments(script: str) -> None:
    done = run(script, *SMALLEST[script])
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{script} printed nothing"


def test_the_many_workers_scheduler_bench_reports_each_policy() -> None:
    done = run("scheduler.py", "--json", "--workers", "2", "--jobs", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    for policy in ("ours", "warm_first", "round_robin"):
        assert {"loads", "throughput_per_hour", "wait_p95_s", "wait_max_s"} <= set(out[policy]), policy
        assert out[policy]["images"] == 40
    assert out["setup"]["workers"] == 2


def test_the_scheduler_scaling_bench_reports_one_and_four_workers() -> None:
    done = run("scheduler.py", "--json", "--scaling", "--jobs", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert (out["workers_1"]["images"], out["workers_4"]["images"]) == (40, 160)
    assert all(out[k]["throughput_per_hour"] > 0 for k in ("workers_1", "workers_4"))
    assert "not per GPU" in out["setup"]["throughput"]


@pytest.mark.parametrize("script", sorted(CUDA_ONLY))
def test_a_cuda_only_script_says_so_on_a_machine_without_cuda(script: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run its checks")
    done = run(script, timeout=120)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
