"""The tiny twins load through the production from_pretrained calls, render, and are built once."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.tiny import TINY_VERSION, TinyModels, _build_once, ensure_tiny_models

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("flux", "sdxl", "sd3", "hidream")
ODD_TEXT = "A neon 🦊 in the rain — ünïcödé, 中文, tabs\tand\nnewlines " + "very long prompt " * 200


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="module")
def tiny(cache_dir: Path) -> TinyModels:
    return ensure_tiny_models(cache_dir)


def _load(tiny: TinyModels, family: str) -> Any:
    """Exactly the calls engine/pipelines/ makes, in float32 on CPU."""
    import diffusers
    import torch
    import transformers

    f32 = torch.float32
    if family == "flux":
        pipe = diffusers.FluxPipeline.from_pretrained(tiny.flux, dtype=f32)
    elif family == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny.sdxl, dtype=f32)
    elif family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(tiny.sd3, dtype=f32)
    else:
        te4 = transformers.LlamaForCausalLM.from_pretrained(
            tiny.hidream_llama, output_hidden_states=True, output_attentions=True, dtype=f32
        )
        tok4 = transformers.AutoTokenizer.from_pretrained(tiny.hidream_llama)
        pipe = diffusers.HiDreamImagePipeline.from_pretrained(
            tiny.hidream, text_encoder_4=te4, tokenizer_4=tok4, dtype=f32
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipes(tiny: TinyModels) -> dict[str, Any]:
    return {family: _load(tiny, family) for family in FAMILIES}


def _render(pipe: Any, size: int, seed: int = 1, on_step: Callable[[int], None] | None = None) -> np.ndarray:
    import torch

    if hasattr(pipe, "text_encoder_4"):
        # HiDream ignores width/height for the area; the engine sets this from the request.
        pipe.default_sample_size = size // pipe.vae_scale_factor

    def callback(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step)
        return kwargs

    image = pipe(
        prompt="a red fox",
        num_inference_steps=2,
        guidance_scale=4.0,
        height=size,
        width=size,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pil",
        callback_on_step_end=callback,
    ).images[0]
    return np.asarray(image)


def _tree_digest(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [64, 128])
def test_twin_loads_with_production_call_and_renders_requested_size(
    pipes: dict[str, Any], family: str, size: int
) -> None:
    steps: list[int] = []
    pixels = _render(pipes[family], size, on_step=steps.append)
    assert pixels.shape == (size, size, 3)
    assert steps == [0, 1]  # callback_on_step_end fires once per step
    # Not black, not flat: the engine's black/NaN safety check must not trip on the twins.
    assert pixels.std() > 5 and 20 < pixels.mean() < 235


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_identical_pixels_and_other_seed_differs(pipes: dict[str, Any], family: str) -> None:
    first = _render(pipes[family], 64, seed=7)
    again = _render(pipes[family], 64, seed=7)
    other = _render(pipes[family], 64, seed=8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_twins_keep_the_real_vae_scale_factor_of_8(pipes: dict[str, Any]) -> None:
    for family, pipe in pipes.items():
        assert pipe.vae_scale_factor == 8, family


def test_hidream_folder_has_no_llama_and_uses_the_one_passed_in(tiny: TinyModels, pipes: dict[str, Any]) -> None:
    index = json.loads((tiny.hidream / "model_index.json").read_text())
    assert index["text_encoder_4"] == [None, None] and index["tokenizer_4"] == [None, None]
    assert not (tiny.hidream / "text_encoder_4").exists()
    pipe = pipes["hidream"]
    assert type(pipe.text_encoder_4).__name__ == "LlamaForCausalLM"
    assert pipe.text_encoder_4.config.num_hidden_layers >= 2  # llama_layers=(0, 1)
    assert pipe.vae.config.shift_factor is not None


def test_every_tokenizer_accepts_any_text_without_unknown_tokens(tiny: TinyModels) -> None:
    from transformers import AutoTokenizer

    folders = [tiny.flux / "tokenizer", tiny.flux / "tokenizer_2", tiny.hidream_llama, tiny.chat_llm]
    for folder in folders:
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok(ODD_TEXT, truncation=True, max_length=77)["input_ids"]
        assert len(ids) == 77, folder
        short = tok("🦊 ü 中文", add_special_tokens=False)["input_ids"]
        # Byte-level vocabularies: nothing is lost or mapped to an unknown token.
        assert tok.decode(short, skip_special_tokens=True).strip() == "🦊 ü 中文", folder
        assert tok.unk_token_id is None or tok.unk_token_id not in short, folder


def test_clip_tokenizers_stop_at_77_tokens(pipes: dict[str, Any]) -> None:
    # FLUX overflows CLIP's position table if the tokenizer's model_max_length is not 77.
    assert pipes["flux"].tokenizer.model_max_length == 77
    assert pipes["sdxl"].tokenizer_2.model_max_length == 77


def test_chat_llm_has_chatml_template_pads_batches_and_generates(tiny: TinyModels) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.chat_llm)
    model = AutoModelForCausalLM.from_pretrained(tiny.chat_llm)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Pick a model."}, {"role": "user", "content": "a neon 🦊"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nPick a model.<|im_end|>\n<|im_start|>user\na neon 🦊<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.pad_token is not None and tok.convert_tokens_to_ids("<|im_start|>") != tok.unk_token_id

    labels = ["flux_dev", "realvis_xl portraits", "sd3_medium posters and typography", text]
    batch = tok(labels, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[2] >= len(tok)
    assert torch.isfinite(logits).all()

    prompt = tok(text, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert 0 < out.shape[1] - prompt["input_ids"].shape[1] <= 5


def test_second_call_reuses_cache_fast_without_touching_files(cache_dir: Path, tiny: TinyModels,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.tiny

    def no_work(*args: Any) -> Any:
        raise AssertionError("a complete cache was built again")

    before = {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*")}
    monkeypatch.setattr(engine.tiny, "_builders", no_work)  # the fast path: one stat call, no build,
    monkeypatch.setattr(engine.tiny, "_build_lock", no_work)  # not even the lock
    again = ensure_tiny_models(cache_dir)
    assert again == tiny and again.root == cache_dir / TINY_VERSION
    assert (tiny.root / "COMPLETE").is_file()  # the marker that makes the next call skip all work
    assert {p: p.stat().st_mtime_ns for p in tiny.root.rglob("*")} == before


def test_fast_path_imports_no_torch(cache_dir: Path, tiny: TinyModels) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import engine.tiny
        heavy = ("torch", "diffusers", "transformers")
        preloaded = {{m for m in heavy if m in sys.modules}}
        engine.tiny.ensure_tiny_models(engine.tiny.Path({str(cache_dir)!r}))
        print(sorted({{m for m in heavy if m in sys.modules}} - preloaded))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_half_built_cache_is_completed_and_broken_model_rebuilt_identically(tmp_path: Path, tiny: TinyModels) -> None:
    # A copy of a finished cache, as a crash would leave it: no COMPLETE marker, one model folder
    # half-written (its weights and its own marker missing), plus a stale temp folder.
    root = tmp_path / TINY_VERSION
    shutil.copytree(tiny.root, root)
    (root / "COMPLETE").unlink()
    (root / "flux" / ".tiny-model-complete").unlink()
    shutil.rmtree(root / "flux" / "transformer")
    (root / ".sdxl.tmp-1-deadbeef").mkdir()
    untouched = (root / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns

    rebuilt = ensure_tiny_models(tmp_path)

    assert (rebuilt.root / "COMPLETE").is_file()
    assert _tree_digest(rebuilt.flux) == _tree_digest(tiny.flux)  # same recipe + seed -> same bytes
    assert (root / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == untouched
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # temp and trash folders are gone


def test_losing_a_rename_race_keeps_the_winners_model(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def racing_builder(folder: Path) -> None:
        (folder / "weights").write_text("ours")
        # Another process finishes first while we are still writing.
        target.mkdir()
        (target / "weights").write_text("winner")
        (target / ".tiny-model-complete").write_text(TINY_VERSION)

    _build_once(target, racing_builder)

    assert (target / "weights").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # our temp folder is gone


def test_concurrent_cold_builds_both_return_a_complete_cache(tmp_path: Path) -> None:
    script = "import sys, engine.tiny as t; m = t.ensure_tiny_models(t.Path(sys.argv[1])); print(m.root)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", script, str(tmp_path)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    root = tmp_path / TINY_VERSION
    assert (root / "COMPLETE").is_file()
    models = ["chat_llm", "flux", "hidream", "hidream_llama", "sd3", "sdxl"]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["COMPLETE", *models]
    assert all((root / name / ".tiny-model-complete").is_file() for name in models)
