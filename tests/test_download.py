"""`promptpics download` against a fake hub on 127.0.0.1 serving the tiny FLUX twin's files:
only the files the loader reads, a gated repository, a dropped transfer, a full disk."""

from __future__ import annotations

import argparse
import hashlib
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import huggingface_hub.file_download
import pytest

from bot.cli import main
from bot.cli.download import download_blocking
from engine.config import parse_config
from engine.weights import Hub, select_files
from tests.conftest import REPO, make_tiny_config, repo_config_raw
from tests.fake_hub import FakeHub, FakeRepo, serve_hub

FLUX = "black-forest-labs/FLUX.1-dev"
BIG = "transformer/diffusion_pytorch_model.safetensors"
# What a real FLUX.1-dev repository also holds, which FluxPipeline.from_pretrained never reads.
DECOYS = {"flux1-dev.safetensors": b"single-file checkpoint" * 50, "ae.safetensors": b"ae" * 50,
          "README.md": b"# FLUX.1 [dev]", "vae/diffusion_pytorch_model.fp16.safetensors": b"fp16 variant" * 40,
          "transformer/diffusion_pytorch_model.bin": b"pickle" * 40}


@pytest.fixture
def flux_repo(tiny_models: Any) -> FakeRepo:
    return FakeRepo.from_folder(tiny_models.flux, extra=DECOYS)


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment `promptpics download` reads, pointed at tmp; online for huggingface_hub."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest switched it on for all tests
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("PROMPTPICS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return tmp_path / "hf" / "hub"


@pytest.fixture
def served(flux_repo: FakeRepo, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with serve_hub({FLUX: flux_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def snapshot(cache: Path, repo: FakeRepo) -> Path:
    return cache / f"models--{FLUX.replace('/', '--')}" / "snapshots" / repo.commit


def downloaded(cache: Path, repo: FakeRepo) -> set[str]:
    folder = snapshot(cache, repo)
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def expected_files(repo: FakeRepo) -> set[str]:
    return {p for p in repo.files if p not in DECOYS}


def test_download_fetches_exactly_what_the_pipeline_loads_and_a_rerun_fetches_nothing(
        served: FakeHub, flux_repo: FakeRepo, hub_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "flux_dev"]) == 0
    assert downloaded(hub_env, flux_repo) == expected_files(flux_repo)
    assert all(served.gets(decoy) == [] for decoy in DECOYS)  # never asked for
    from diffusers import FluxPipeline  # what the loader does with the folder: it is enough

    FluxPipeline.from_pretrained(snapshot(hub_env, flux_repo), local_files_only=True)

    served.requests.clear()
    capsys.readouterr()
    assert main(["download", "flux_dev"]) == 0
    assert [p for m, p, _ in served.requests if m == "GET" and "/resolve/" in p and "model_index" not in p] == []
    out = capsys.readouterr().out
    assert f"flux_dev               {FLUX}: " in out and "; complete" in out and "to fetch: 0 B" in out


def test_dry_run_lists_the_files_and_the_total_and_downloads_no_weights(
        served: FakeHub, flux_repo: FakeRepo, hub_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "flux_dev", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert BIG in out and "flux1-dev.safetensors" not in out and "to fetch:" in out
    assert downloaded(hub_env, flux_repo) <= {"model_index.json"}  # the probe names the components
    assert served.gets(BIG) == []


def test_a_gated_repository_says_which_licence_to_accept_and_that_hf_token_is_needed(
        flux_repo: FakeRepo, hub_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    flux_repo.gated = True
    with serve_hub({FLUX: flux_repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["download", "flux_dev"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert f"https://huggingface.co/{FLUX}" in lines[-1] and "set HF_TOKEN" in lines[-1]
        assert "Traceback" not in "\n".join(lines)

        monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # a token whose account did not accept: 403
        assert main(["download", "flux_dev"]) == 2
        assert "HF_TOKEN is set, but its account has no access yet" in capsys.readouterr().err
        assert hub.gets(BIG) == []
    assert downloaded(hub_env, flux_repo) == set()


def test_a_transfer_cut_half_way_resumes_from_where_it_stopped(
        served: FakeHub, flux_repo: FakeRepo, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub keeps what it received in whole chunks (10 MB); the twin's file is 330 KB.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    served.cut(BIG)
    assert main(["download", "flux_dev"]) == 0
    first, second = served.gets(BIG)
    kept = int((second or "bytes=0-").removeprefix("bytes=").rstrip("-"))
    assert first is None and 0 < kept <= len(flux_repo.files[BIG]) // 2  # the second asks only for the rest
    data = (snapshot(hub_env, flux_repo) / BIG).read_bytes()
    assert hashlib.sha256(data).digest() == hashlib.sha256(flux_repo.files[BIG]).digest()


class _NoSleep(types.ModuleType):
    """``time`` for huggingface_hub's retry loop, without its one-second waits."""

    def __getattr__(self, name: str) -> Any:
        return (lambda seconds: None) if name == "sleep" else getattr(time, name)


def test_a_download_that_keeps_failing_stops_with_one_line_and_a_rerun_completes(
        served: FakeHub, flux_repo: FakeRepo, hub_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(huggingface_hub.file_download, "time", _NoSleep("time"))
    served.cut(BIG, times=100)
    assert main(["download", "flux_dev"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "stopped part-way" in err[-1] and "run the same command again" in err[-1]
    assert BIG not in downloaded(hub_env, flux_repo)

    served.cuts.clear()
    # the files the first run completed (the others, in flight or not started when it stopped,
    # depend on how the parallel downloads were scheduled): those must not be fetched again
    complete = downloaded(hub_env, flux_repo)
    assert complete, "the first run completed no file: nothing to check the rerun keeps"
    fetched_before = {p: len(served.gets(p)) for p in complete}
    assert main(["download", "flux_dev"]) == 0
    assert downloaded(hub_env, flux_repo) == expected_files(flux_repo)
    assert {p: len(served.gets(p)) for p in fetched_before} == fetched_before  # complete files were kept


def test_a_full_disk_refuses_before_fetching_with_needed_and_free(
        served: FakeHub, flux_repo: FakeRepo, hub_env: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("engine.weights.hub.shutil.disk_usage", lambda path: types.SimpleNamespace(
        total=10**9, used=10**9 - 1000, free=1000))
    assert main(["download", "flux_dev"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("promptpics: not enough disk space: the download needs ") and "has 1.0 KB free" in line
    assert downloaded(hub_env, flux_repo) <= {"model_index.json"} and served.gets(BIG) == []


def test_offline_or_an_unknown_repository_is_one_line(
        served: FakeHub, hub_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text((REPO / "config.toml").read_text(encoding="utf-8").replace(FLUX, "nobody/nothing"),
                      encoding="utf-8")
    assert main(["--config", str(config), "download", "flux_dev"]) == 2
    assert "nobody/nothing: no such model on" in capsys.readouterr().err

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["download", "flux_dev"]) == 2
    assert capsys.readouterr().err.strip().endswith("HF_HUB_OFFLINE is set; unset it to download")


def test_local_folders_are_reported_and_skipped(tiny_models: Any, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config = make_tiny_config(tiny_models, tmp_path / "data")
    args = argparse.Namespace(models=[], all=True, dry_run=False)
    hub = Hub("http://127.0.0.1:9", tmp_path / "hub")  # never called: nothing here is on a hub
    assert download_blocking(config, args, hub) == 0
    out = capsys.readouterr().out
    assert out.count("local folder") == len(config.models) + 2  # HiDream's Llama and the chat LLM


def test_an_unknown_model_id_names_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "dalle"]) == 2
    assert "`model` is 'dalle', but it must be one of flux_dev, realvis_xl" in capsys.readouterr().err


def test_file_selection_matches_the_real_repositories_layouts() -> None:
    flux = ["model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
            "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
            "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
            "text_encoder_2/model-00002-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
            "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/vocab.json",
            "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json", "transformer/config.json",
            "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.safetensors.index.fp16.json"]
    index = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "X"], "text_encoder": ["transformers", "X"],
             "text_encoder_2": ["transformers", "X"], "tokenizer": ["transformers", "X"],
             "tokenizer_2": ["transformers", "X"], "transformer": ["diffusers", "X"], "vae": ["diffusers", "X"],
             "unet": [None, None]}
    chosen = select_files("pipeline", flux, index)
    assert set(flux) - set(chosen) == {"flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
                                       "vae/diffusion_pytorch_model.fp16.safetensors",
                                       "unet/diffusion_pytorch_model.safetensors.index.fp16.json"}
    llama = ["config.json", "generation_config.json", "model-00001-of-00004.safetensors",
             "model.safetensors.index.json", "original/consolidated.00.pth", "original/params.json",
             "tokenizer.json", "tokenizer_config.json", "LICENSE", "USE_POLICY.md", "pytorch_model.bin",
             "pytorch_model.bin.index.json"]
    assert select_files("transformers", llama) == ["config.json", "generation_config.json",
                                                    "model-00001-of-00004.safetensors", "model.safetensors.index.json",
                                                    "tokenizer.json", "tokenizer_config.json"]
    assert parse_config(repo_config_raw(), {}, base_dir=REPO).models["flux_dev"].source == FLUX
