"""The quantised cache (engine/pipelines/quant_cache.py): a part quantised once is read back from
disk at the next load, renders the same pixels, survives a corrupt or stale entry, and holds
when several processes write it at once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_quantised import BIG_TEXT_ENCODER, int8, render, spec_of

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

CPU = torch.device("cpu")


def entries(root: Path, model_id: str) -> dict[str, Path]:
    """``{component: entry folder}`` of the finished entries (private folders start with '.')."""
    folder = root / model_id
    found = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    return {p.name.split("-")[0]: p for p in found}


def load(spec: Any, root: Path | None) -> Any:
    from engine.pipelines import load_pipeline_blocking

    return load_pipeline_blocking(spec, CPU, torch.float32, quant_cache=root)


@pytest.mark.parametrize("family", ["flux", "hidream"])
def test_a_quantised_part_is_saved_once_and_read_back_with_the_same_pixels(
        tiny_config: Any, tmp_path: Path, family: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from engine.pipelines import quantise

    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, family, quant=int8(family))
    denoiser = "transformer"
    first = load(spec, root)
    saved = entries(root, spec.id)
    assert set(saved) == {denoiser, BIG_TEXT_ENCODER[family]}  # HiDream's Llama, loaded apart, too
    for entry in saved.values():
        manifest = json.loads((entry / "promptpics-quantised.json").read_text())
        assert manifest["quant"] == "int8" and manifest["files"]
        assert any(name.endswith(".safetensors") for name in manifest["files"])  # no pickles
    first_bytes = first.nbytes
    image_first = render(first)

    # The second load quantises nothing: asking for a quantisation config now fails the test.
    def no_quantising(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a cached part was quantised again")

    monkeypatch.setattr(quantise, "_config", no_quantising)
    with caplog.at_level(logging.INFO, logger="engine.pipelines.quant_cache"):
        second = load(spec, root)
    assert sum("read from the quantised cache" in r.getMessage() for r in caplog.records) == 2
    denoiser_module = getattr(second.pipe, denoiser)
    assert any(type(t).__name__ == "Int8Tensor" for t in denoiser_module.parameters())
    assert second.nbytes == first_bytes  # the residency manager sees the same quantised size
    image_second = render(second)
    assert np.array_equal(image_first, image_second)
    assert entries(root, spec.id) == saved  # nothing rewritten


def test_a_corrupt_entry_is_removed_and_the_part_quantised_again(
        tiny_config: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", quant=int8("flux"))
    render(load(spec, root))
    entry = entries(root, spec.id)["transformer"]
    weights = next(entry.glob("*.safetensors"))
    size = weights.stat().st_size
    weights.write_bytes(b"\0" * size)  # same size, garbage inside: passes the size check, fails to load
    with caplog.at_level(logging.WARNING, logger="engine.pipelines.quant_cache"):
        image = render(load(spec, root))
    assert np.isfinite(image).all()
    warning = next(r.getMessage() for r in caplog.records if "does not load" in r.getMessage())
    assert spec.id in warning and "transformer int8" in warning and str(entry) in warning
    rewritten = entries(root, spec.id)["transformer"]
    assert rewritten == entry and next(rewritten.glob("*.safetensors")).read_bytes() != b"\0" * size

    # a truncated file fails the size check: never even loaded, rewritten the same way
    next(rewritten.glob("*.safetensors")).write_bytes(b"x")
    render(load(spec, root))
    assert next(entries(root, spec.id)["transformer"].glob("*.safetensors")).stat().st_size == size


def test_changed_source_weights_make_a_new_entry_and_the_old_one_goes(tiny_config: Any, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "flux"
    shutil.copytree(spec_of(tiny_config, "flux").source, source)
    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", source=str(source), quant=int8("flux"))
    render(load(spec, root))
    old = entries(root, spec.id)["transformer"]
    weights = next((source / "transformer").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new download
    render(load(spec, root))
    new = entries(root, spec.id)["transformer"]
    assert new != old and not old.exists()
    assert entries(root, spec.id)["text_encoder_2"].exists()  # its source did not change: kept


def test_off_and_bf16_write_nothing(tiny_config: Any, tmp_path: Path) -> None:
    root = tmp_path / "quantised"
    render(load(spec_of(tiny_config, "flux"), root))  # bf16: nothing to cache
    render(load(spec_of(tiny_config, "flux", quant=int8("flux")), None))  # cache off
    assert not root.exists()


def test_an_unwritable_cache_costs_time_not_the_load(tiny_config: Any, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "quantised"
    root.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="engine.pipelines.quant_cache"):
        image = render(load(spec_of(tiny_config, "flux", quant=int8("flux")), root))
        render(load(spec_of(tiny_config, "flux", quant=int8("flux")), root))  # not tried again
    assert np.isfinite(image).all()
    assert sum("could not write the quantised cache" in r.getMessage() for r in caplog.records) == 2  # 2 parts, once


def test_the_engine_runner_uses_the_cache_under_the_data_folder(tiny_config: Any) -> None:
    from engine.cluster.runner import default_runner_blocking

    quantised = tiny_config.model_copy(update={"models": {
        mid: spec.model_copy(update={"quant": int8(spec.family)}) if spec.family == "sdxl" else spec
        for mid, spec in tiny_config.models.items()}})
    runner = default_runner_blocking(quantised, CPU, torch.float32)
    model_id = next(mid for mid, spec in quantised.models.items() if spec.family == "sdxl")
    runner.residency.acquire_blocking(quantised.model(model_id))
    assert set(entries(tiny_config.data_dir / "quantised", model_id)) == {"unet", "text_encoder_2"}


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from engine.config import ModelSpec
    from engine.pipelines import load_pipeline_blocking
    spec = ModelSpec.model_validate_json(Path(sys.argv[1]).read_text())
    loaded = load_pipeline_blocking(spec, torch.device("cpu"), torch.float32, quant_cache=Path(sys.argv[2]))
    print(loaded.nbytes)
""")


def test_four_processes_loading_at_once_leave_one_valid_entry_per_part(tiny_config: Any, tmp_path: Path) -> None:
    from engine.pipelines.quant_cache import _valid

    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", quant=int8("flux"))
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(spec_file), str(root)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    sizes = {int(out.strip().splitlines()[-1]) for out, _ in outs}
    assert len(sizes) == 1  # every process got the same quantised model, from its own copy or the cache
    assert set(entries(root, spec.id)) == {"transformer", "text_encoder_2"}
    assert all(_valid(e) for e in entries(root, spec.id).values())
    assert not [p for p in (root / spec.id).iterdir() if p.name.startswith(".")]  # no private folder left
    # and a fifth load reads what they wrote
    render(load(spec, root))


def test_a_nearly_full_disk_is_left_alone(tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from engine.pipelines import quant_cache

    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        # 5 GiB free on a 100 GiB disk: any entry would leave less than the 5 GiB kept free
        return type(real(path))(total=100 * 2**30, used=95 * 2**30, free=5 * 2**30)

    monkeypatch.setattr(quant_cache.shutil, "disk_usage", nearly_full)
    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", quant=int8("flux"))
    with caplog.at_level(logging.WARNING, logger="engine.pipelines.quant_cache"):
        image = render(load(spec, root))
    assert np.isfinite(image).all() and entries(root, spec.id) == {}
    warning = next(r.getMessage() for r in caplog.records if "is not written" in r.getMessage())
    assert spec.id in warning and "kept for images and the history" in warning


def test_a_private_folder_left_by_a_crash_goes_and_one_being_written_stays(tiny_config: Any, tmp_path: Path) -> None:
    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", quant=int8("flux"))
    folder = root / spec.id
    folder.mkdir(parents=True)
    crashed = folder / ".transformer-int8-0123456789abcdef.tmp-999999-deadbeef"
    writing = folder / ".transformer-int8-0123456789abcdef.tmp-999998-cafef00d"
    for private in (crashed, writing):
        private.mkdir()
        (private / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    two_hours_ago = crashed.stat().st_mtime - 7200
    os.utime(crashed, (two_hours_ago, two_hours_ago))
    render(load(spec, root))
    assert not crashed.exists() and writing.exists()
    assert set(entries(root, spec.id)) == {"transformer", "text_encoder_2"}


def test_download_quantise_fills_the_cache_before_the_first_job(cli_env: dict[str, str], tmp_path: Path) -> None:
    from tests.conftest import promptpics

    config = tmp_path / "config.toml"
    config.write_text((REPO / "config.toml").read_text(encoding="utf-8")
                      + '\n[models.flux_dev.quant]\ndenoiser = "int8"\ntext_encoders = { text_encoder_2 = "int8" }\n')
    args = ("--config", str(config), "--profile", "tiny", "download")
    first = promptpics(cli_env, *args, "flux_dev", "realvis_xl", "--quantise")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "flux_dev: transformer, text_encoder_2 quantised and kept in" in first.stdout
    assert "realvis_xl: no int8/fp8 part, nothing to quantise" in first.stdout
    root = Path(cli_env["PROMPTPICS_DATA_DIR"]) / "quantised"
    assert set(entries(root, "flux_dev")) == {"transformer", "text_encoder_2"}
    again = promptpics(cli_env, *args, "flux_dev", "--quantise")  # twice: nothing to do
    assert again.returncode == 0 and "flux_dev: transformer, text_encoder_2 already in the quantised cache" in again.stdout
    # the engine's first job reads them: the keys are the engine's (device, dtype, placements)
    job = promptpics(cli_env, "--config", str(config), "--profile", "tiny", "-v", "imagine", "a fox", "--model",
                     "flux_dev", "--steps", "2", "--width", "256", "--height", "256", "--out", str(tmp_path / "fox.png"))
    assert job.returncode == 0, job.stdout + job.stderr
    assert "transformer int8 read from the quantised cache" in job.stderr
    bad = promptpics(cli_env, *args, "flux_xl", "--quantise")
    assert bad.returncode != 0 and "flux_xl" in bad.stderr and "Traceback" not in bad.stderr


def test_running_out_of_ram_while_reading_keeps_the_entry(tiny_config: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.errors import EngineError
    from engine.pipelines import quant_cache

    root = tmp_path / "quantised"
    spec = spec_of(tiny_config, "flux", quant=int8("flux"))
    render(load(spec, root))
    kept = entries(root, spec.id)

    def no_memory(*_a: Any, **_k: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(quant_cache, "_load_module", no_memory)
    with pytest.raises(EngineError):  # the load fails as a load out of RAM does ...
        load(spec, root)
    assert entries(root, spec.id) == kept and all(quant_cache._valid(e) for e in kept.values())  # ... the cache stays
