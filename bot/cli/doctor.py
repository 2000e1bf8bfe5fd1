"""``promptpics doctor [--json] [--offline]``: one screen that says what will and won't work,
and why. Every check has a verdict (ok / warn / fail) and a one-line reason; exit 0 when the
configured setup can serve (no check failed), 1 otherwise. Loads no model: it reads versions,
folders and files, and makes one cheap call per chat platform (skipped offline).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from typing import Any

from bot.cli.platform_checks import Check, platform_checks
from bot.cli.profile import prepare
from engine import (
    Config,
    DataFolderBusyError,
    DataFolderLock,
    EngineError,
    Hub,
    cacheable_parts,
    cached_on_disk,
    TorchFacts,
    WeightsState,
    WeightsTarget,
    embedding_model_state,
    free_bytes,
    human_bytes,
    llm_targets,
    nudenet_state,
    torch_facts_blocking,
    weight_targets,
    weights_state,
)

GIB = 2**30
LOW_DISK = 2 * GIB  # below this the data folder will soon refuse to keep images


def add_doctor_command(subparsers: Any) -> None:
    doctor = subparsers.add_parser("doctor", help="check the setup: GPU, weights, data folder, tokens")
    doctor.add_argument("--json", action="store_true", help='{"checks": {name: {"status", "detail"}}, "ok": bool}')
    doctor.add_argument("--offline", action="store_true", help="make no network call (also when HF_HUB_OFFLINE is set)")
    doctor.add_argument("--skip-gpu", action="store_true",
                        help="don't ask CUDA (a health check beside a running bot: asking opens a context on its card)")
    doctor.set_defaults(run=cmd_doctor)


async def cmd_doctor(config: Config, args: argparse.Namespace) -> int:
    offline = args.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    config = await asyncio.to_thread(prepare, config)
    hub = Hub.from_environment(os.environ)
    facts, local = await asyncio.gather(asyncio.to_thread(_torch_facts, args.skip_gpu),
                                        asyncio.to_thread(_local_checks, config, hub))
    machine = _machine_checks(config, facts) if facts else {"gpu": Check("ok", "not asked (--skip-gpu)")}
    checks = machine | local | await platform_checks(config, os.environ, offline=offline)
    ok = all(check.status != "fail" for check in checks.values())
    if args.json:
        print(json.dumps({"checks": {name: {"status": c.status, "detail": c.detail} for name, c in checks.items()},
                          "ok": ok}, indent=2, ensure_ascii=False))
    else:
        _print(config, checks, ok)
    return 0 if ok else 1


def _print(config: Config, checks: dict[str, Check], ok: bool) -> None:
    print(f"promptpics doctor: {config.source_file or 'built-in defaults'}, profile {config.profile}")
    width = max(len(name) for name in checks)
    for name, check in checks.items():
        print(f"  {check.status:<4}  {name:<{width}}  {check.detail}")
    failed = [name for name, check in checks.items() if check.status == "fail"]
    print("can serve" if ok else f"cannot serve yet: {len(failed)} check(s) failed ({', '.join(failed)})")


# -- Python, torch, the card ---------------------------------------------------------------------


def _torch_facts(skip: bool) -> TorchFacts | None:
    return None if skip else torch_facts_blocking()


def _machine_checks(config: Config, facts: TorchFacts) -> dict[str, Check]:
    checks = {"python": Check("ok", facts.python)}
    if facts.torch is None:
        return checks | {"torch": Check("fail", "torch is not installed (pip install torch, then the project)")}
    checks["torch"] = Check("ok", f"{facts.torch}, " + (f"CUDA {facts.cuda} build" if facts.cuda else "CPU build"))
    wants_cuda = config.device.startswith("cuda")
    if facts.gpu is None:
        reason = f" ({facts.error})" if facts.error else ""
        checks["gpu"] = (Check("fail", f"engine.device is {config.device!r} but torch sees no GPU{reason}") if wants_cuda
                         else Check("warn", f"torch sees no GPU{reason}: models run on the CPU (minutes per image)"))
        checks["tf32"] = Check("ok", "not used without CUDA")
        return checks
    more = ""
    if facts.gpu_count > 1:
        more = (f"; {facts.gpu_count} cards, the engine uses one ([cluster] mode 'local': all)"
                if config.cluster.mode == "embedded" else f"; {facts.gpu_count} cards")
    checks["gpu"] = Check("ok", f"{facts.gpu}, {facts.gpu_total_bytes / GIB:.0f} GiB "
                                f"({facts.gpu_free_bytes / GIB:.0f} GiB free){more}; dtype {config.cuda_dtype}")
    checks["tf32"] = (Check("ok", "switched on at start-up (matmul and cuDNN)") if facts.tf32_capable
                      else Check("ok", "this card predates TF32 (Ampere): float32 matmuls as usual"))
    return checks


# -- weights, the router's models, NudeNet, the data folder ---------------------------------------


def _local_checks(config: Config, hub: Hub) -> dict[str, Check]:
    checks = {}
    for target in weight_targets(config, list(config.models)):
        model_id = target.name.split()[0]
        checks[f"weights {target.name}"] = _weights_check(weights_state(target, hub.cache_dir), model_id, required=True)
    checks |= _router_checks(config, hub)
    checks["nudenet"] = _nudenet_check(config)
    checks["cluster"] = _cluster_check(config)
    checks["quantised cache"] = _quantised_cache_check(config)
    return checks | _data_checks(config.data_dir)


def _quantised_cache_check(config: Config) -> Check:
    """What the quantised cache holds (engine/pipelines/quant_cache.py); never fails."""
    quantised = [spec for spec in config.models.values() if cacheable_parts(spec)]
    if not quantised:
        return Check("ok", "not used: no model has an int8 or fp8 part")
    names = ", ".join(spec.id for spec in quantised)
    if not config.residency.quantised_cache:
        return Check("ok", f"off (residency.quantised_cache = false): every load of {names} quantises again")
    root = config.data_dir / "quantised"
    held = {spec.id: cached_on_disk(root, spec) for spec in quantised}
    parts = [f"{mid} {n} part(s), {human_bytes(size)}" if n else f"{mid} at its first load"
             for mid, (n, size) in held.items()]
    later = [mid for mid, (n, _) in held.items() if not n]
    hint = f" (or now: promptpics download {' '.join(later)} --quantise)" if later else ""
    return Check("ok", f"{root}: " + "; ".join(parts) + hint)


def _cluster_check(config: Config) -> Check:
    """``[cluster]`` (docs/CLUSTER.md): Ray installed, at the pinned version, token auth asked
    for when joining a cluster. Nothing connects: joining takes seconds, and ``run`` says why it
    could not."""
    cluster = config.cluster
    if cluster.mode == "embedded":
        return Check("ok", "embedded: one GPU worker in this process (several GPUs: docs/CLUSTER.md)")
    try:
        version = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return Check("fail", f"cluster.mode is {cluster.mode!r} but Ray is not installed: pip install -e '.[cluster]'")
    pinned = next((r.split("==")[1] for r in importlib.metadata.requires("promptpics") or ()
                   if r.startswith("ray==")), version).split(";")[0].strip()
    if version != pinned:
        return Check("warn", f"Ray {version}, but this project pins {pinned}: every host of a cluster needs the same")
    if cluster.mode == "cluster" and os.environ.get("RAY_AUTH_MODE") != "token":
        return Check("warn", f"mode 'cluster' at {cluster.address!r}: set RAY_AUTH_MODE=token or Ray refuses the bot "
                             "(docs/CLUSTER.md#security)")
    return Check("ok", f"mode {cluster.mode!r}, Ray {version}" + (f", {cluster.address}" if cluster.address else ""))


def _weights_check(state: WeightsState, model_id: str, *, required: bool) -> Check:
    size = human_bytes(state.nbytes)
    if state.status == "complete":
        return Check("ok", f"complete, {size} ({state.where})")
    fix = (f"check its `source` ({state.target.source})" if state.target.local
           else f"run `promptpics download {model_id}`")
    return Check("fail" if required else "warn", f"{state.status} ({state.detail}), {size}; {fix}")


def _router_checks(config: Config, hub: Hub) -> dict[str, Check]:
    checks = {}
    if "embeddings" in config.router.stages:
        source = config.router.embedding_model
        if source.startswith("package:") or source.startswith(("/", ".", "~")):
            usable, detail = embedding_model_state(source)
            checks["router embeddings"] = Check("ok" if usable else "warn",
                                                detail if usable else f"{detail}: the embedding stage will be off")
        else:
            state = weights_state(WeightsTarget("router embeddings", source, "transformers"), hub.cache_dir)
            checks["router embeddings"] = _weights_check(state, "--all", required=False)
    for target in llm_targets(config):
        check = _weights_check(weights_state(target, hub.cache_dir), "--all", required=False)
        if check.status != "ok":
            use = "the router's LLM stage" if target.name == "router LLM" else "the LLM prompt rewrite"
            check = Check("warn", f"{check.detail} ({use} will be off)")
        checks[target.name] = check
    return checks


def _nudenet_check(config: Config) -> Check:
    if not config.safety.nudenet_enabled:
        return Check("warn", "off (safety.nudenet.enabled = false): images are not checked for nudity")
    usable, detail = nudenet_state()
    return Check("ok" if usable else "fail", detail)


def _data_checks(folder: Path) -> dict[str, Check]:
    if folder.exists() and not folder.is_dir():
        return {"data folder": Check("fail", f"{folder} is a file, not a folder (engine.data_dir)")}
    existing = folder if folder.exists() else next(p for p in folder.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return {"data folder": Check("fail", f"{existing} is not writable by this user (engine.data_dir)")}
    free = free_bytes(folder)
    made = "" if folder.exists() else " (created at the first run)"
    detail = f"{folder}{made}, writable, {human_bytes(free)} free"
    checks = {"data folder": Check("warn", detail + ": low") if free < LOW_DISK else Check("ok", detail)}
    if folder.exists():
        checks["data folder lock"] = _lock_check(folder)
    return checks


def _lock_check(folder: Path) -> Check:
    """Taken and let go at once: the kernel's answer is the only reliable one (engine/history/lock.py)."""
    try:
        DataFolderLock.acquire(folder).release()
    except DataFolderBusyError as exc:
        since = f" since {exc.started_at}" if exc.started_at else ""
        return Check("warn", f"held by a running PromptPics (pid {exc.pid}{since}): jobs cannot start beside it")
    except EngineError as exc:
        return Check("fail", exc.user_message)
    return Check("ok", "free: no PromptPics process is running on it")


