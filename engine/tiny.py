"""Tiny random-weight twins of the four production pipelines and the chat LLM, built locally and cached."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.history import write_atomic

if TYPE_CHECKING:  # heavy imports stay inside the builders so `import engine.tiny` is cheap
    from transformers import PreTrainedTokenizerBase

# Bump whenever a recipe below changes: it names the cache folder, so old twins are never reused.
TINY_VERSION = "tiny-v1"

_COMPLETE = "COMPLETE"  # written last in the version folder: its presence means every twin is in place
_MODEL_DONE = ".tiny-model-complete"  # written last inside each model folder before it is renamed into place

# Shared text-encoder sizes. The T5 width is >= the two CLIP widths together because SD3 pads the
# concatenated CLIP embeddings up to the T5 width (as 768 + 1280 <= 4096 in the real model).
_CLIP_HIDDEN = 32
_CLIP_PROJECTION = 32
_T5_DIM = 64
_LLAMA_HIDDEN = 32

# The real families' latent channels, so latent previews and VAE maths match production shapes.
_SDXL_LATENT_CHANNELS = 4
_FLOW_LATENT_CHANNELS = 16

# A few sentences are enough to give the trained tokenizers some multi-byte merges; every other
# input still tokenizes because all models below are byte-level (256 base symbols, no unknowns).
_CORPUS = (
    "a red fox in the rain, neon lights, photo of a city at night",
    "portrait photo of a woman, 85mm lens, soft light, detailed skin",
    "a poster with the words HELLO WORLD in bold letters, clean logo design",
    "a cat and a dog on a sofa next to a green lamp and a blue book",
    "watercolor landscape with mountains, a lake and a small boat at sunrise",
    "You are a helpful assistant. Pick the best model for this prompt.",
    "Rewrite the prompt so it is safe and keeps the same subject.",
)

# Words given hand-made CLIP merges, so common prompt words become single tokens like in real CLIP.
_CLIP_WORDS = ("a", "the", "of", "in", "and", "red", "fox", "cat", "dog", "photo", "logo", "text", "city", "night")

_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class TinyModels:
    root: Path
    flux: Path  # FluxPipeline folder
    sdxl: Path  # StableDiffusionXLPipeline folder
    sd3: Path  # StableDiffusion3Pipeline folder
    hidream: Path  # HiDreamImagePipeline folder (text_encoder_4/tokenizer_4 are null in model_index.json)
    hidream_llama: Path  # LlamaForCausalLM + tokenizer folder, passed as text_encoder_4/tokenizer_4
    chat_llm: Path  # tiny Qwen2ForCausalLM + ChatML tokenizer folder


def ensure_tiny_models(cache_dir: Path) -> TinyModels:
    """Build every twin once under cache_dir/<TINY_VERSION>/..., reuse afterwards."""
    root = Path(cache_dir) / TINY_VERSION
    models = _layout(root)
    # Fast path: one stat call, no torch import.
    if (root / _COMPLETE).is_file():
        return models
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root) as exclusive, _quiet_progress_bars():
        if (root / _COMPLETE).is_file():  # another process finished while we waited for the lock
            return models
        if exclusive:  # nobody else is building, so any temp folder is a crashed build's leftover
            _remove_leftovers(root)
        for name, builder in _builders().items():
            _build_once(root / name, builder)
        write_atomic(root / _COMPLETE, (TINY_VERSION + "\n").encode())
    return models


def _layout(root: Path) -> TinyModels:
    return TinyModels(
        root=root,
        flux=root / "flux",
        sdxl=root / "sdxl",
        sd3=root / "sd3",
        hidream=root / "hidream",
        hidream_llama=root / "hidream_llama",
        chat_llm=root / "chat_llm",
    )


def _builders() -> dict[str, Callable[[Path], None]]:
    return {
        "flux": _build_flux,
        "sdxl": _build_sdxl,
        "sd3": _build_sd3,
        "hidream_llama": _build_hidream_llama,
        "hidream": _build_hidream,
        "chat_llm": _build_chat_llm,
    }


# --------------------------------------------------------------------------- cache mechanics


@contextmanager
def _build_lock(root: Path) -> Iterator[bool]:
    """Serialise builders across processes; yields whether the lock is real (POSIX) or absent.

    The tmp+rename in _build_once still guards against crashes, and against races where there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic renames alone
        yield False
        return
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    for leftover in root.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".*.trash-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-save "Writing model shards" bars during a build, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build_once(target: Path, builder: Callable[[Path], None]) -> None:
    """Build into a private sibling folder and rename it into place, so `target` is whole or absent."""
    if (target / _MODEL_DONE).is_file():
        return
    if target.exists():  # left by a crash or hand-edited: move aside first, rename is atomic
        _discard(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        builder(tmp)
        (tmp / _MODEL_DONE).write_text(TINY_VERSION + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost a race (target appeared meanwhile): the winner's copy is identical, keep it.
            if not (target / _MODEL_DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(path: Path) -> None:
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# --------------------------------------------------------------------------- tokenizers


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A hand-made CLIP vocab.json / merges.txt: the full byte alphabet (so nothing is unknown) plus a few words."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 characters CLIP's byte-level BPE maps bytes to
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[str] = []
    for word in _CLIP_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged += piece
            if rule not in merges:
                merges.append(rule)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, merges


def _clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerBase:
    import transformers

    vocab, merges = _clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as scratch:
        # Written as files and loaded back, the same way a real CLIP tokenizer folder is read.
        Path(scratch, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(scratch, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return transformers.CLIPTokenizer.from_pretrained(scratch, model_max_length=model_max_length)


def _trained_byte_bpe(special_tokens: list[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on _CORPUS; specials get the lowest ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _t5_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    # T5 ids: <pad>=0, </s>=1, <unk>=2; every sequence ends with </s> like the real T5 tokenizer.
    backend = _trained_byte_bpe(["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _llama_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = _trained_byte_bpe(specials)
    # Llama 3 prepends <|begin_of_text|> and has no pad token (HiDream sets pad = eos itself).
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072
    )


def _qwen_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    backend = _trained_byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    # Qwen2.5-Instruct: no BOS, eos = <|im_end|>, pad = <|endoftext|>, ChatML template.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=_CHATML_TEMPLATE,
    )


# --------------------------------------------------------------------------- text encoders


def _clip_encoder(tokenizer: PreTrainedTokenizerBase, *, projection: bool, max_positions: int = 77) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL and SD3 read hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        projection_dim=_CLIP_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is read at the first eos
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_DIM,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # as T5 v1.1 / T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # A PreTrainedConfig key T5Config's typed fields omit (it arrives through **kwargs); real T5
        # configs carry it. mypy sees only the dataclass fields.
        decoder_start_token_id=tokenizer.pad_token_id,  # type: ignore[call-arg]
    )
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------- image parts


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks keep the real scale factor 2**(4-1) = 8; tiny widths and no mid-block attention
    # keep a 768x768 decode cheap on CPU.
    flow_style = shift_factor is not None
    return _eval_mode(AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=not flow_style,  # the FLUX/SD3 VAEs have no quant convs, the SDXL one has
        use_post_quant_conv=not flow_style,
        mid_block_add_attention=False,
    ))


def _flow_scheduler(**overrides: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **overrides)


def _save(pipe_or_model: Any, folder: Path) -> None:
    pipe_or_model.save_pretrained(folder, safe_serialization=True)


def _eval_mode(model: Any) -> Any:
    """``model.eval()`` for a diffusers model. Typed as Any on purpose: ``from diffusers import X``
    shows mypy diffusers' dummy placeholder classes (its ``__init__`` imports them first under
    TYPE_CHECKING), which lack torch.nn.Module's methods."""
    return model.eval()


# --------------------------------------------------------------------------- builders


def _build_flux(folder: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    _seed(1001)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(  # FLUX.1-dev's resolution-dependent shift
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
        vae=_vae(_FLOW_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_encoder(clip_tok, projection=False),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=_eval_mode(FluxTransformer2DModel(
            patch_size=1,
            in_channels=_FLOW_LATENT_CHANNELS * 4,  # latents are packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_DIM,
            pooled_projection_dim=_CLIP_HIDDEN,  # CLIPTextModel pooler output
            guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )),
    )
    _save(pipe, folder)


def _build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    _seed(1002)
    tok, tok_2 = _clip_tokenizer(), _clip_tokenizer()
    time_embed_dim = 8
    unet = _eval_mode(UNet2DConditionModel(
        sample_size=128,  # default 1024px like SDXL
        in_channels=_SDXL_LATENT_CHANNELS,
        out_channels=_SDXL_LATENT_CHANNELS,
        # Attention only at the lower level: at 768px the top level has 96x96 latent tokens.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=_CLIP_HIDDEN * 2,  # both CLIP penultimate states concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text_embeds of encoder 2 + six size/crop ids (no aesthetic score)
        projection_class_embeddings_input_dim=_CLIP_PROJECTION + 6 * time_embed_dim,
    ))
    pipe = StableDiffusionXLPipeline(
        vae=_vae(_SDXL_LATENT_CHANNELS, scaling_factor=0.13025, shift_factor=None),
        text_encoder=_clip_encoder(tok, projection=False),
        text_encoder_2=_clip_encoder(tok_2, projection=True),
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(  # SDXL base scheduler config
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
            prediction_type="epsilon",
        ),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    # No requires_aesthetics_score: only the SDXL img2img/refiner pipelines take it; the text-to-image
    # pipeline warns about it on load, and its time ids never include an aesthetic score anyway.
    _save(pipe, folder)


def _build_sd3(folder: Path) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    _seed(1003)
    tok, tok_2, tok_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    inner_dim = 2 * 16
    pipe = StableDiffusion3Pipeline(
        scheduler=_flow_scheduler(),
        vae=_vae(_FLOW_LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_encoder(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(tok_2, projection=True),
        tokenizer_2=tok_2,
        text_encoder_3=_t5_encoder(tok_3),
        tokenizer_3=tok_3,
        transformer=_eval_mode(SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=_FLOW_LATENT_CHANNELS,
            out_channels=_FLOW_LATENT_CHANNELS,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_T5_DIM,
            caption_projection_dim=inner_dim,
            pooled_projection_dim=_CLIP_PROJECTION * 2,
            pos_embed_max_size=192,  # SD3 Medium's value: 192 patches a side, far above 768px
        )),
    )
    _save(pipe, folder)


def _build_hidream_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed(1004)
    tok = _llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=_LLAMA_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,  # HiDream reads llama_layers=(0, 1)
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def _build_hidream(folder: Path) -> None:
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    _seed(1005)
    tok, tok_2, tok_3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    transformer = _eval_mode(HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=_FLOW_LATENT_CHANNELS,
        out_channels=_FLOW_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[_T5_DIM, _LLAMA_HIDDEN],  # [T5, Llama] widths
        text_emb_dim=_CLIP_PROJECTION * 2,  # both CLIP text_embeds concatenated
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),  # sums to attention_head_dim
        max_resolution=(128, 128),  # latent size; non-square inputs are padded to this many patches
        llama_layers=[0, 1],  # one per block: num_layers + num_single_layers
    ))
    pipe = HiDreamImagePipeline(
        scheduler=_flow_scheduler(),
        vae=_vae(_FLOW_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159),  # the FLUX VAE
        # HiDream pads CLIP prompts to 128 tokens, past CLIP's usual 77 positions (real: 248).
        text_encoder=_clip_encoder(tok, projection=True, max_positions=248),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(tok_2, projection=True, max_positions=248),
        tokenizer_2=tok_2,
        text_encoder_3=_t5_encoder(tok_3),
        tokenizer_3=tok_3,
        # Loaded separately in production (Llama-3.1-8B-Instruct) and passed to from_pretrained; saving
        # None logs "cannot be saved" and writes [null, null] to model_index.json, which is what we want.
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=transformer,
    )
    _save(pipe, folder)


def _build_chat_llm(folder: Path) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    _seed(1006)
    tok = _qwen_tokenizer()
    vocab = tok.get_vocab()
    im_end, end_of_text = vocab["<|im_end|>"], vocab["<|endoftext|>"]
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,  # as Qwen2.5-1.5B
        bos_token_id=end_of_text,
        eos_token_id=im_end,
        pad_token_id=end_of_text,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text], pad_token_id=end_of_text, do_sample=False
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
