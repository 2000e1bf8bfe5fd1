"""The tiny twins' building blocks: tokenizers built without the hub, text encoders, VAEs,
schedulers, and the shared sizes (random weights; see ../shared/DESIGN.md for why each is so)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # heavy imports stay inside the functions so `import engine.tiny` is cheap
    from transformers import PreTrainedTokenizerBase

# Shared text-encoder sizes. The T5 width is >= the two CLIP widths together because SD3 pads the
# concatenated CLIP embeddings up to the T5 width (as 768 + 1280 <= 4096 in the real model).
CLIP_HIDDEN = 32
CLIP_PROJECTION = 32
T5_DIM = 64
LLAMA_HIDDEN = 32

# The real families' latent channels, so latent previews and VAE maths match production shapes.
SDXL_LATENT_CHANNELS = 4
FLOW_LATENT_CHANNELS = 16

# A few sentences are enough to give the trained tokenizers some multi-byte merges; every other
# input still tokenizes because all models below are byte-level (256 base symbols, no unknowns).
CORPUS = (
    "a red fox in the rain, neon lights, photo of a city at night",
    "portrait photo of a woman, 85mm lens, soft light, detailed skin",
    "a poster with the words HELLO WORLD in bold letters, clean logo design",
    "a cat and a dog on a sofa next to a green lamp and a blue book",
    "watercolor landscape with mountains, a lake and a small boat at sunrise",
    "You are a helpful assistant. Pick the best model for this prompt.",
    "Rewrite the prompt so it is safe and keeps the same subject.",
)

# Words given hand-made CLIP merges, so common prompt words become single tokens like in real CLIP.
CLIP_WORDS = ("a", "the", "of", "in", "and", "red", "fox", "cat", "dog", "photo", "logo", "text", "city", "night")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


# --------------------------------------------------------------------------- tokenizers


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A hand-made CLIP vocab.json / merges.txt: the full byte alphabet (so nothing is unknown) plus a few words."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())  # the 256 characters CLIP's byte-level BPE maps bytes to
    tokens = alphabet + [symbol + "</w>" for symbol in alphabet]
    merges: list[str] = []
    for word in CLIP_WORDS:
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


def clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerBase:
    import transformers

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as scratch:
        # Written as files and loaded back, the same way a real CLIP tokenizer folder is read.
        Path(scratch, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        Path(scratch, "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return transformers.CLIPTokenizer.from_pretrained(scratch, model_max_length=model_max_length)


def trained_byte_bpe(special_tokens: list[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on CORPUS; specials get the lowest ids."""
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
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def t5_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    # T5 ids: <pad>=0, </s>=1, <unk>=2; every sequence ends with </s> like the real T5 tokenizer.
    backend = trained_byte_bpe(["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def llama_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = trained_byte_bpe(specials)
    # Llama 3 prepends <|begin_of_text|> and has no pad token (HiDream sets pad = eos itself).
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=131072
    )


def qwen_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    backend = trained_byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    # Qwen2.5-Instruct: no BOS, eos = <|im_end|>, pad = <|endoftext|>, ChatML template.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=CHATML_TEMPLATE,
    )


# --------------------------------------------------------------------------- text encoders


def clip_encoder(tokenizer: PreTrainedTokenizerBase, *, projection: bool, max_positions: int = 77) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,  # SDXL and SD3 read hidden_states[-2]
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        projection_dim=CLIP_PROJECTION,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is read at the first eos
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder(tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_DIM,
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


def vae(latent_channels: int, scaling_factor: float, shift_factor: float | None) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks keep the real scale factor 2**(4-1) = 8; tiny widths and no mid-block attention
    # keep a 768x768 decode cheap on CPU.
    flow_style = shift_factor is not None
    return eval_mode(AutoencoderKL(
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


def flow_scheduler(**overrides: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **overrides)


def save(pipe_or_model: Any, folder: Path) -> None:
    pipe_or_model.save_pretrained(folder, safe_serialization=True)


def eval_mode(model: Any) -> Any:
    """``model.eval()`` for a diffusers model. Typed as Any on purpose: ``from diffusers import X``
    shows mypy diffusers' dummy placeholder classes (its ``__init__`` imports them first under
    TYPE_CHECKING), which lack torch.nn.Module's methods."""
    return model.eval()
