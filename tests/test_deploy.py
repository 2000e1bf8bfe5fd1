"""The container and the service, read as files: no container engine runs on the CI machine
(`docker info` finds no daemon there), so these check the facts a build would rely on."""

from __future__ import annotations

import configparser
import json
import shlex

import yaml

from bot.cli import build_parser
from tests.conftest import REPO


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_the_image_runs_as_a_user_with_volumes_a_health_check_and_promptpics_run() -> None:
    steps = dockerfile()
    kinds = [kind for kind, _ in steps]
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0") and kinds.index("USER") > max(
        i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args)
    volumes = json.loads(next(args for kind, args in steps if kind == "VOLUME"))
    env = next(args for kind, args in steps if kind == "ENV")
    assert "/data" in volumes and "PROMPTPICS_DATA_DIR=/data" in env
    assert "HF_HOME=/cache/huggingface" in env and "/cache/huggingface" in volumes
    assert json.loads(next(args for kind, args in steps if kind == "ENTRYPOINT")) == ["promptpics"]
    assert json.loads(next(args for kind, args in steps if kind == "CMD")) == ["run"]
    health = next(args for kind, args in steps if kind == "HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1])
    assert command[:2] == ["promptpics", "doctor"]
    build_parser().parse_args(command[1:])  # the flags it passes exist
    assert next(args for kind, args in steps if kind == "FROM").startswith("${BASE_IMAGE}")
    assert "cuda" in next(args for kind, args in steps if kind == "ARG")


def test_compose_reserves_the_gpu_and_keeps_data_and_weights_in_volumes() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    service = compose["services"]["promptpics"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    targets = {volume.split(":")[1] for volume in service["volumes"]}
    assert {"/data", "/cache/huggingface", "/app/config.toml"} <= targets
    assert set(compose["volumes"]) == {"promptpics-data", "hf-cache"}


def test_the_systemd_unit_checks_with_doctor_then_runs_and_does_not_retry_a_config_error() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((REPO / "deploy" / "promptpics.service").read_text(encoding="utf-8"))
    service = unit["Service"]
    assert service["User"] == "promptpics" and service["RestartPreventExitStatus"] == "2"
    pre, start = shlex.split(service["ExecStartPre"]), shlex.split(service["ExecStart"])
    assert pre[0].endswith("/promptpics") and pre[1] == "doctor" and start[1:] == ["run"]
    build_parser().parse_args(pre[1:])
    assert "promptpics" in service["StateDirectory"] and unit["Install"]["WantedBy"] == "multi-user.target"
