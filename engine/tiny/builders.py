"""One builder per twin: each writes a complete model folder (save_pretrained) from the parts."""

from __future__ import annotations

from pathlib import Path

from engine.tiny.parts import (
    CLIP_HIDDEN,
    CLIP_PROJECTION,
    FLOW_LATENT_CHANNELS,
    LLAMA_HIDDEN,
    SDXL_LATENT_CHANNELS,
    T5_DIM,
    clip_encoder,
    clip_tokenizer,
    eval_mode,
    flow_scheduler,
    llama_tokenizer,
    qwen_tokenizer,
    save,
    seed,
    t5_encoder,
    t5_tokenizer,
    vae,
)

# --------------------------------------------------------------------------- builders


def build_flux(folder: Path) -> None:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    seed(1001)
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=flow_scheduler(  # FLUX.1-dev's resolution-dependent shift
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
        ),
        vae=vae(FLOW_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=clip_encoder(clip_tok, projection=False),
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(t5_tok),
        tokenizer_2=t5_tok,
        transformer=eval_mode(FluxTransformer2DModel(
            patch_size=1,
            in_channels=FLOW_LATENT_CHANNELS * 4,  # latents are packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_HIDDEN,  # CLIPTextModel pooler output
            guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )),
    )
    save(pipe, folder)


def build_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    seed(1002)
    tok, tok_2 = clip_tokenizer(), clip_tokenizer()
    time_embed_dim = 8
    unet = eval_mode(UNet2DConditionModel(
        sample_size=128,  # default 1024px like SDXL
        in_channels=SDXL_LATENT_CHANNELS,
        out_channels=SDXL_LATENT_CHANNELS,
        # Attention only at the lower level: at 768px the top level has 96x96 latent tokens.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=CLIP_HIDDEN * 2,  # both CLIP penultimate states concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text_embeds of encoder 2 + six size/crop ids (no aesthetic score)
        projection_class_embeddings_input_dim=CLIP_PROJECTION + 6 * time_embed_dim,
    ))
    pipe = StableDiffusionXLPipeline(
        vae=vae(SDXL_LATENT_CHANNELS, scaling_factor=0.13025, shift_factor=None),
        text_encoder=clip_encoder(tok, projection=False),
        text_encoder_2=clip_encoder(tok_2, projection=True),
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
    save(pipe, folder)


def build_sd3(folder: Path) -> None:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    seed(1003)
    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    inner_dim = 2 * 16
    pipe = StableDiffusion3Pipeline(
        scheduler=flow_scheduler(),
        vae=vae(FLOW_LATENT_CHANNELS, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=clip_encoder(tok, projection=True),
        tokenizer=tok,
        text_encoder_2=clip_encoder(tok_2, projection=True),
        tokenizer_2=tok_2,
        text_encoder_3=t5_encoder(tok_3),
        tokenizer_3=tok_3,
        transformer=eval_mode(SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=FLOW_LATENT_CHANNELS,
            out_channels=FLOW_LATENT_CHANNELS,
            num_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_DIM,
            caption_projection_dim=inner_dim,
            pooled_projection_dim=CLIP_PROJECTION * 2,
            pos_embed_max_size=192,  # SD3 Medium's value: 192 patches a side, far above 768px
        )),
    )
    save(pipe, folder)


def build_hidream_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    seed(1004)
    tok = llama_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=LLAMA_HIDDEN,
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


def build_hidream(folder: Path) -> None:
    from diffusers import HiDreamImagePipeline, HiDreamImageTransformer2DModel

    seed(1005)
    tok, tok_2, tok_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    transformer = eval_mode(HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=FLOW_LATENT_CHANNELS,
        out_channels=FLOW_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[T5_DIM, LLAMA_HIDDEN],  # [T5, Llama] widths
        text_emb_dim=CLIP_PROJECTION * 2,  # both CLIP text_embeds concatenated
        num_routed_experts=2,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),  # sums to attention_head_dim
        max_resolution=(128, 128),  # latent size; non-square inputs are padded to this many patches
        llama_layers=[0, 1],  # one per block: num_layers + num_single_layers
    ))
    pipe = HiDreamImagePipeline(
        scheduler=flow_scheduler(),
        vae=vae(FLOW_LATENT_CHANNELS, scaling_factor=0.3611, shift_factor=0.1159),  # the FLUX VAE
        # HiDream pads CLIP prompts to 128 tokens, past CLIP's usual 77 positions (real: 248).
        text_encoder=clip_encoder(tok, projection=True, max_positions=248),
        tokenizer=tok,
        text_encoder_2=clip_encoder(tok_2, projection=True, max_positions=248),
        tokenizer_2=tok_2,
        text_encoder_3=t5_encoder(tok_3),
        tokenizer_3=tok_3,
        # Loaded separately in production (Llama-3.1-8B-Instruct) and passed to from_pretrained; saving
        # None logs "cannot be saved" and writes [null, null] to model_index.json, which is what we want.
        text_encoder_4=None,
        tokenizer_4=None,
        transformer=transformer,
    )
    save(pipe, folder)


def build_chat_llm(folder: Path) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    seed(1006)
    tok = qwen_tokenizer()
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
