# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""Tiny random diffusers pipelines built from configs, with tokenizers built in memory (no network)."""

import torch
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    FlowMatchEulerDiscreteScheduler,
    ModelMixin,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2VLProcessor,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.processing_utils import ProcessorMixin

from trl_ddrl.model_configs.tokenizers import (
    CHARACTERS,
    byte_qwen_tokenizer,
    character_clip_tokenizer,
    character_t5_tokenizer,
)


def tiny_clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges)."""
    return character_clip_tokenizer(max_length)


def tiny_t5_tokenizer(max_length: int = 16) -> T5Tokenizer:
    """A character-level unigram T5 tokenizer."""
    return character_t5_tokenizer(max_length)


def tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 16, projection_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0, **kwargs) -> AutoencoderKL:
    """
    A VAE with a downsampling factor of 2. Two normalisation groups (not one per channel) keep the decoded images'
    brightness sensitive to the latents, so that a brightness reward can be learned.
    """
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=16,
        **kwargs,
    ).eval()


def tiny_sd3_pipeline(
    seed: int = 0,
    with_t5: bool = True,
    num_layers: int = 1,
    latent_size: int = 8,
    num_heads: int = 2,
    head_dim: int = 8,
    vae_scaling_factor: float = 0.5,
) -> StableDiffusion3Pipeline:
    """
    A random `StableDiffusion3Pipeline`: an MMDiT of `num_layers` blocks of width `num_heads * head_dim` on
    `[4, latent_size, latent_size]` latents (16x16 images by default), two tiny CLIP encoders and, `with_t5`, a tiny T5.
    """
    clip_tokenizer = tiny_clip_tokenizer()
    vocab_size = len(clip_tokenizer)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=num_heads,
        joint_attention_dim=32,
        caption_projection_dim=num_heads * head_dim,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=latent_size,
    )
    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        torch.manual_seed(seed + 3)
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=32,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_heads=2,
                decoder_start_token_id=0,
            )
        ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed=seed, shift_factor=0.0609, scaling_factor=vae_scaling_factor),
        text_encoder=tiny_clip_text_encoder(vocab_size, seed=seed + 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=tiny_clip_text_encoder(vocab_size, seed=seed + 2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def tiny_clip_text_model(vocab_size: int, hidden_size: int = 16, seed: int = 0):
    """A `CLIPTextModel` (no projection head) with the config of [`tiny_clip_text_encoder`], as SD 1.x uses."""
    from transformers import CLIPTextModel

    config = tiny_clip_text_encoder(vocab_size, hidden_size=hidden_size, seed=seed).config
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(cross_attention_dim: int, seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32), **kwargs):
    """A `UNet2DConditionModel` on 8x8x4 latents (one cross-attention block per resolution level)."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **kwargs,
    )


def tiny_sd15_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A random `StableDiffusionPipeline` (16x16 images, 8x8x4 latents) with SD 1.5's PNDM scheduler config."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = tiny_clip_tokenizer()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        unet=tiny_unet(cross_attention_dim=16, seed=seed),
        scheduler=scheduler,
        vae=tiny_vae(seed=seed, scaling_factor=0.18215),
        text_encoder=tiny_clip_text_model(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """
    A random `StableDiffusionXLPipeline` (16x16 images, 8x8x4 latents) with SDXL's Euler scheduler config: two CLIP
    encoders (hidden sizes 16 + 16 = 32 for cross-attention, pooled projection 16) and `text_time` added conditioning.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = tiny_clip_tokenizer()
    vocab_size = len(tokenizer)
    time_embed_dim = 4
    unet = tiny_unet(
        cross_attention_dim=32,
        seed=seed,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 16,
        use_linear_projection=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=tiny_vae(seed=seed, scaling_factor=0.13025),
        text_encoder=tiny_clip_text_model(vocab_size, seed=seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(vocab_size, seed=seed + 2),
        tokenizer_2=tiny_clip_tokenizer(),
    )


class TinyCosmosSafetyChecker(ModelMixin, ConfigMixin):
    """
    A stand-in for `cosmos_guardrail.CosmosSafetyChecker` that lets every prompt and video through. Its one buffer is
    saved, so that `DiffusionPipeline.from_pretrained` finds weights to load it back from.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("_device_tracker", torch.zeros(1))

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random `FluxPipeline` generating 16x16 images from 8x8x4 latents, packed into 16 tokens of 16 channels."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[2, 2, 4],
    )
    return FluxPipeline(
        transformer=transformer,
        # FLUX.1-dev's scheduler config: resolution-dependent shift.
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=tiny_vae(seed=seed, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tiny_clip_text_model(len(clip_tokenizer), seed=seed + 1),
        tokenizer=clip_tokenizer,
        text_encoder_2=_tiny_t5_encoder(len(t5_tokenizer), seed=seed + 2),
        tokenizer_2=t5_tokenizer,
    )


def _tiny_t5_encoder(vocab_size: int, seed: int = 0, umt5: bool = False):
    """A one-layer T5 (or UMT5) encoder with 32-dimensional outputs."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    return model_cls(config).eval()


# Wan-VAE-shaped autoencoder config (4 latent channels, 8x spatial, 4x temporal), shared by the Wan and Qwen-Image VAEs.
TINY_WAN_VAE_CONFIG = dict(
    base_dim=3,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.8, 2.0, 1.2],
)


def tiny_wan_vae(seed: int = 0):
    """An `AutoencoderKLWan` with 4 latent channels, 8x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**TINY_WAN_VAE_CONFIG).eval()


def tiny_wan_pipeline(seed: int = 0):
    """
    A random `WanPipeline` generating 5-frame 32x32 videos from [4, 2, 4, 4] latents, with the Wan checkpoints'
    `UniPCMultistepScheduler` (flow sigmas, `flow_shift=3`).
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(len(tokenizer), seed=seed + 1, umt5=True),
        vae=tiny_wan_vae(seed),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
        transformer=transformer,
    )


def tiny_cosmos2_pipeline(seed: int = 0, video_to_world: bool = False):
    """
    A random `Cosmos2TextToImagePipeline` (32x32 images from [4, 1, 4, 4] latents), or with `video_to_world` a
    `Cosmos2VideoToWorldPipeline` (5-frame 32x32 videos from [4, 2, 4, 4] latents). The Karras scheduler is the
    checkpoints'; `concat_padding_mask=False` because the real checkpoints' padding-mask channel needs torchvision.
    """
    from diffusers import Cosmos2TextToImagePipeline, Cosmos2VideoToWorldPipeline, CosmosTransformer3DModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=4 + int(video_to_world),
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 8, 8),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )
    pipeline_cls = Cosmos2VideoToWorldPipeline if video_to_world else Cosmos2TextToImagePipeline
    return pipeline_cls(
        text_encoder=_tiny_t5_encoder(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=tiny_wan_vae(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
        safety_checker=TinyCosmosSafetyChecker(),
    )


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% elif system_characters %}{{ (message['content'] ~ ' ' * system_characters)[:system_characters] }}"
    "{% endif %}{% endfor %}"
)
"""
A chat template that renders the user turns' text only, so that short prompts fit a 16-token window; with the template
variable `system_characters` set, the system message is cut or padded to that many characters (one token each).
"""


def tiny_chat_tokenizer(system_tokens: int = 0):
    """
    A character-level `PreTrainedTokenizerFast` with a chat template, standing in for the chat tokenizers of
    LLM text encoders (Mistral 3, Qwen 3, Qwen2.5-VL): ids 0-4 are `<unk>`, `[IMG]`, `<s>`, `</s>`, `<pad>`. With
    `system_tokens`, the system message takes exactly that many tokens, as the pipelines that crop a fixed-length
    system prompt off the encoding (`prompt_template_encode_start_idx`) expect.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "[IMG]": 1, "<s>": 2, "</s>": 3, "<pad>": 4}
    for character in CHARACTERS + " ":
        vocab[character] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE.replace("system_characters", str(system_tokens)),
        model_max_length=64,
    )


def _tiny_llm_text_config(vocab_size: int, num_layers: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_hidden_layers=num_layers,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=4,
    )


def tiny_flux2_vae(seed: int = 0):
    """
    An `AutoencoderKLFlux2` with 4 latent channels and a downsampling factor of 2, whose batch-norm statistics of the
    2x2-patchified latents (16 channels) are set away from 0 / 1 so that the normalisation is exercised.
    """
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=16,
    )
    vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 16))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return vae.eval()


def tiny_flux2_pipeline(seed: int = 0, klein: bool = False, is_distilled: bool = False):
    """
    A random `Flux2Pipeline` (guidance-embedded transformer, Mistral 3 text encoder) or with `klein` a
    `Flux2KleinPipeline` (no guidance embedding, Qwen 3 text encoder), generating 16x16 images from [4, 8, 8] VAE
    latents, patchified and packed into 16 tokens of 16 channels. The text encoders have as many layers as the
    pipelines' default hidden-state taps need (30 and 27) at width 16, so prompt embeddings are 3 x 16 = 48 wide.
    """
    from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=not klein,
    )
    # FLUX.2's scheduler config: the resolution-dependent shift `mu` comes from the pipeline.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    torch.manual_seed(seed + 1)
    if klein:
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**_tiny_llm_text_config(len(tokenizer), 27))).eval()
        return Flux2KleinPipeline(
            scheduler=scheduler,
            vae=tiny_flux2_vae(seed),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            is_distilled=is_distilled,
        )
    config = Mistral3Config(
        text_config={"model_type": "mistral", **_tiny_llm_text_config(len(tokenizer), 30)},
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "image_size": 12,
            "patch_size": 6,
            "num_channels": 3,
        },
        image_token_index=1,
    )
    return Flux2Pipeline(
        scheduler=scheduler,
        vae=tiny_flux2_vae(seed),
        text_encoder=Mistral3ForConditionalGeneration(config).eval(),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def tiny_qwen_tokenizer():
    """A byte-level `Qwen2Tokenizer` without merges (one token per byte) plus Qwen's chat special tokens."""
    return byte_qwen_tokenizer()


def tiny_qwen2_5_vl_text_encoder(
    vocab_size: int, seed: int = 0, hidden_size: int = 16, num_layers: int = 2, **config_kwargs
):
    """
    A `Qwen2_5_VLForConditionalGeneration` of `num_layers` text layers of width `hidden_size` (and a 1-block ViT);
    `config_kwargs` go to its `Qwen2_5_VLConfig` (the vision token ids of a tokenizer, for image inputs).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    special = {"bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 3}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            **special,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[0],
        ),
        **special,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_cosmos2_5_pipeline(seed: int = 0, euler: bool = False):
    """
    A random `Cosmos2_5_PredictBasePipeline` (5-frame 32x32 videos from [4, 2, 4, 4] latents) with a tiny Qwen2.5-VL
    prompt encoder (2 layers of 16, so 32-dimensional prompt embeddings) and the checkpoints' UniPC flow scheduler, or
    with `euler` a `FlowMatchEulerDiscreteScheduler` (whose deterministic sampler the adapter reproduces exactly).
    """
    from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel, UniPCMultistepScheduler

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(
        in_channels=4 + 1,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        mlp_ratio=2,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(4, 8, 8),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=False,
        extra_pos_embed_type=None,
        use_crossattn_projection=True,
        crossattn_proj_in_channels=32,
        encoder_hidden_states_channels=32,
    )
    if euler:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    else:
        scheduler = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0, num_train_timesteps=1000
        )
    return Cosmos2_5_PredictBasePipeline(
        text_encoder=tiny_qwen2_5_vl_text_encoder(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=tiny_wan_vae(seed),
        scheduler=scheduler,
        safety_checker=TinyCosmosSafetyChecker(),
    )


# ByT5 prompt tokens of the tiny HunyuanVideo 1.5 pipeline (the real pipeline encodes 256).
TINY_HUNYUAN_GLYPH_LENGTH = 16


def tiny_hunyuan_video15_pipeline(seed: int = 0):
    """
    A random `HunyuanVideo15Pipeline` generating 5-frame 32x32 videos from [4, 2, 4, 4] latents (a VAE with 8x
    spatial compression, where the real one has 16x): a 3-layer Qwen2.5-VL text model whose tokenizer gives the system
    prompt exactly the 108 tokens the pipeline crops, a one-layer ByT5 encoder, and the checkpoints' CFG guider
    (`guidance_scale=6.0`).
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from transformers import ByT5Tokenizer
    from transformers.models.qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    tokenizer = tiny_chat_tokenizer(system_tokens=108)
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=16,
        text_embed_2_dim=16,
        image_embed_dim=8,
        rope_axes_dim=(2, 2, 4),
        target_size=32,
        task_type="t2v",
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, spatial_compression_ratio=8
    ).eval()
    torch.manual_seed(seed + 2)
    text_config = Qwen2_5_VLTextConfig(
        **_tiny_llm_text_config(len(tokenizer), 3),
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]},
    )
    text_encoder = Qwen2_5_VLTextModel(text_config).eval()
    glyph_tokenizer = ByT5Tokenizer()
    glyph_encoder = T5EncoderModel(
        T5Config(vocab_size=len(glyph_tokenizer), d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2)
    ).eval()
    pipeline = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        text_encoder_2=glyph_encoder,
        tokenizer_2=glyph_tokenizer,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    # The ByT5 projection's hidden width is fixed at 2048, so 256 glyph tokens dominate the tiny model's cost: encode
    # 16 (a pipeline attribute, back at 256 after `from_pretrained`).
    pipeline.tokenizer_2_max_length = TINY_HUNYUAN_GLYPH_LENGTH
    return pipeline


def tiny_qwenimage_vae(seed: int = 0):
    """An `AutoencoderKLQwenImage` with 4 latent channels and 8x spatial compression (one-frame videos)."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(**TINY_WAN_VAE_CONFIG).eval()


def tiny_qwenimage_pipeline(seed: int = 0):
    """
    A random `QwenImagePipeline` generating 32x32 images from [4, 4, 4] VAE latents, packed into 4 tokens of 16
    channels, with a tiny Qwen2.5-VL text encoder (width 16) and Qwen-Image's dynamically shifted Euler scheduler
    config.
    """
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    pipeline = QwenImagePipeline(
        scheduler=scheduler,
        vae=tiny_qwenimage_vae(seed),
        text_encoder=tiny_qwen2_5_vl_text_encoder(len(tokenizer), seed=seed + 1),
        tokenizer=tokenizer,
        transformer=transformer,
    )
    # The pipeline drops the chat template's system turn, 34 tokens with Qwen's tokenizer; more with this byte-level
    # one, so that the embeddings are the prompts' (a pipeline attribute, back at 34 after `from_pretrained`).
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    pipeline.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return pipeline


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """
    `Qwen2VLProcessor` without its video processor, which needs torchvision: images (Qwen2-VL's PIL image processor)
    and text only, which is what the Qwen-Image-Edit pipeline uses. Module-level, so that
    `DiffusionPipeline.from_pretrained` finds it again (`tiny_models.TinyQwen2VLProcessor`).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_qwenimage_edit_pipeline(seed: int = 0):
    """
    A random `QwenImageEditPipeline` editing and generating 32x32 images ([4, 4, 4] VAE latents, 4 tokens of 16
    channels; the source adds 4 more), with the tiny Qwen2.5-VL encoder seeing the source through its 1-block ViT
    (images resized to 28x28, one merged vision token) and [`TinyQwen2VLProcessor`].
    """
    from diffusers import QwenImageEditPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_only = tiny_qwenimage_pipeline(seed)
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_tokens(QWEN_VISION_TOKENS, special_tokens=True)
    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")
    }
    ids.update(image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    ids.update(video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=28 * 28
    )
    pipeline = QwenImageEditPipeline(
        scheduler=text_only.scheduler,
        vae=text_only.vae,
        text_encoder=tiny_qwen2_5_vl_text_encoder(len(tokenizer), seed=seed + 1, **ids),
        tokenizer=tokenizer,
        processor=TinyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer),
        transformer=text_only.transformer,
    )
    # As for Qwen-Image: drop the system turn of the byte-level tokens (64 tokens with Qwen's tokenizer), keeping the
    # vision tokens and the instruction.
    prefix = pipeline.prompt_template_encode.split("<|vision_start|>")[0]
    pipeline.prompt_template_encode_start_idx = len(tokenizer(prefix).input_ids)
    return pipeline


def tiny_wan22_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """
    [`tiny_wan_pipeline`] as a random Wan 2.2 A14B-style mixture of experts: `transformer` (high noise) and a
    `transformer_2` (low noise) with other weights, split at `boundary_ratio` (timestep 900 by default: with 3 steps, step 0 is high-noise, steps 1 and 2 low-noise).
    """
    from diffusers import WanPipeline

    single = tiny_wan_pipeline(seed)
    return WanPipeline(
        **single.components | {"transformer_2": tiny_wan_transformer(seed + 7), "boundary_ratio": boundary_ratio}
    )


def tiny_wan22_i2v_pipeline(seed: int = 0, boundary_ratio: float = 0.9):
    """
    A random `WanImageToVideoPipeline` shaped like Wan 2.2 I2V A14B: two experts on the latents concatenated with the
    first-frame mask and the image-video latents (12 channels), no CLIP image encoder, split at `boundary_ratio`.
    """
    from diffusers import WanImageToVideoPipeline

    single = tiny_wan_i2v_pipeline(seed)
    experts = {"transformer": tiny_wan_transformer(seed, in_channels=12)}
    experts["transformer_2"] = tiny_wan_transformer(seed + 7, in_channels=12)
    components = single.components | experts | {"image_encoder": None, "image_processor": None}
    return WanImageToVideoPipeline(**components, boundary_ratio=boundary_ratio)


def tiny_wan_transformer(seed: int = 0, in_channels: int = 4, **kwargs):
    """A one-block `WanTransformer3DModel` of width 16 on 4-channel latents (`in_channels` with conditioning)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
        **kwargs,
    )


def tiny_wan_i2v_pipeline(seed: int = 0, expand_timesteps: bool = False):
    """
    A random `WanImageToVideoPipeline` (5-frame 32x32 videos from [4, 2, 4, 4] latents). Wan 2.1 style by default:
    the transformer takes the latents, the first-frame mask (4 channels) and the image-video latents (12 channels)
    and cross-attends to a tiny CLIP vision encoder's penultimate states; with `expand_timesteps` Wan 2.2 TI2V style:
    no image encoder, the first latent frame replaced by the image's latents at timestep 0.
    """
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    tokenizer = tiny_t5_tokenizer()
    image_encoder = image_processor = None
    if expand_timesteps:
        transformer = tiny_wan_transformer(seed)
    else:
        transformer = tiny_wan_transformer(seed, in_channels=12, image_dim=16, added_kv_proj_dim=16)
        torch.manual_seed(seed + 2)
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            )
        ).eval()
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=_tiny_t5_encoder(len(tokenizer), seed=seed + 1, umt5=True),
        vae=tiny_wan_vae(seed),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
        ),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=transformer,
        expand_timesteps=expand_timesteps,
    )


def tiny_qwen2_vl_config(tokenizer, hidden_size: int = 16, num_layers: int = 2):
    """A `Qwen2VLConfig`: `num_layers` text layers of width `hidden_size`, a 1-block ViT (14px patches, 2x2 merge)."""
    from transformers import Qwen2VLConfig

    ids = {
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")
    }
    ids |= {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>")}
    ids |= {"video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=8192,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=hidden_size, num_heads=2, mlp_ratio=1),
        **ids,
    )


def tiny_qwen2_vl_tokenizer(extra_special_tokens: tuple[str, ...] = ()):
    """[`tiny_qwen_tokenizer`] with Qwen2-VL's vision tokens (and `extra_special_tokens`)."""
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_tokens(QWEN_VISION_TOKENS + list(extra_special_tokens), special_tokens=True)
    return tokenizer


def save_tiny_videoalign_release(directory, seed: int = 0, step: int = 7, lora_rank: int = 2, output_dim: int = 1):
    """
    A random VideoAlign release in the layout of `KwaiVGI/VideoReward`, written under `directory`: `base/` (the base
    Qwen2-VL's config and tokenizer) and `release/` (`model_config.json` naming `base/`, and
    `checkpoint-<step>/model.pth` holding a PEFT-wrapped transformers-4.45 state dict: `base_model.model.` prefix,
    `model.layers.*` / `visual.*` keys, LoRA `lora_A` / `lora_B` pairs beside each text linear's `base_layer`, an
    `rm_head` of `output_dim` outputs). Returns `(release path, the merged Qwen2VLModel state dict, rm_head weight)`.
    """
    import json
    from pathlib import Path

    from transformers import Qwen2VLModel

    directory = Path(directory)
    reward_tokens = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
    tokenizer = tiny_qwen2_vl_tokenizer(reward_tokens)
    config = tiny_qwen2_vl_config(tokenizer)
    (directory / "base").mkdir(parents=True)
    config.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    torch.manual_seed(seed)
    merged = {key: value.clone() for key, value in Qwen2VLModel(config).state_dict().items()}
    head = torch.randn(output_dim, config.text_config.hidden_size)
    generator = torch.Generator().manual_seed(seed + 1)
    alpha = 2 * lora_rank
    saved = {"base_model.model.rm_head.weight": head, "base_model.model.lm_head.weight": torch.zeros(1)}
    for key, value in merged.items():
        old = "model." + key.removeprefix("language_model.") if key.startswith("language_model.") else key
        module = old.removesuffix(".weight")
        is_lora = key.startswith("language_model.layers.") and key.endswith("proj.weight")
        if not is_lora:
            saved[f"base_model.model.{old}"] = value
            continue
        lora_a = torch.randn(lora_rank, value.shape[1], generator=generator) * 0.1
        lora_b = torch.randn(value.shape[0], lora_rank, generator=generator) * 0.1
        saved[f"base_model.model.{module}.base_layer.weight"] = value.clone()
        saved[f"base_model.model.{module}.lora_A.default.weight"] = lora_a
        saved[f"base_model.model.{module}.lora_B.default.weight"] = lora_b
        merged[key] = value + alpha / lora_rank * lora_b @ lora_a
    release = directory / "release"
    (release / f"checkpoint-{step}").mkdir(parents=True)
    torch.save(saved, release / f"checkpoint-{step}" / "model.pth")
    model_config = {
        "data_config": {
            "fps": 2.0,
            "num_frames": None,
            "max_frame_pixels": 56 * 56,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "model_config": {
            "model_name_or_path": str(directory / "base"),
            "output_dim": output_dim,
            "use_special_tokens": True,
            "reward_token": "special",
        },
        "peft_lora_config": {"lora_enable": True, "lora_r": lora_rank, "lora_alpha": alpha, "use_rslora": False},
        "inference_config": {
            "VQ_mean": 0.5,
            "VQ_std": 2.0,
            "MQ_mean": -1.0,
            "MQ_std": 0.5,
            "TA_mean": 0.0,
            "TA_std": 4.0,
        },
    }
    (release / "model_config.json").write_text(json.dumps(model_config))
    return release, merged, head


def save_tiny_llava_judge(path, answer_token: str | None = None):
    """
    A random `LlavaForConditionalGeneration` (1-layer CLIP ViT on 28x28 images, 1-layer Qwen2 of width 16) with a
    `LlavaProcessor` that loads without torchvision, saved to `path` for `AutoProcessor` /
    `AutoModelForImageTextToText`. With `answer_token`, its generation config suppresses every other token, so
    greedy generation repeats that token.
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_qwen2_vl_tokenizer(("<image>",))
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    vision = CLIPVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model = LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-1)
    )
    if answer_token is not None:
        keep = tokenizer.convert_tokens_to_ids(answer_token)
        model.generation_config.suppress_tokens = [token for token in range(len(tokenizer)) if token != keep]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_hpsv3_checkpoint(directory, seed: int = 0, layout: str = "new"):
    """
    A random HPSv3 checkpoint in the release's layout, written under `directory`: `base/` (the base Qwen2-VL's config
    and tokenizer, without `<|Reward|>`) and one state dict of `Qwen2VLRewardModelBT`, its embeddings one row larger
    than the base tokenizer (the release added `<|Reward|>` and resized them): `HPSv3.safetensors` with transformers
    >= 4.52 keys (`model.language_model.*`, `model.visual.*`) for `layout="new"`, or `model.pth` holding
    `{"model": state dict}` with transformers 4.45 keys (`model.layers.*`, `visual.*`) for `layout="old"`; both with
    `lm_head.weight` and the MLP head `rm_head.{0,3,5}.{weight,bias}` (hidden -> 8 -> 4 -> 2).
    Returns `(checkpoint path, base path, the Qwen2VLModel state dict, the head's state dict without its prefix)`.
    """
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import Qwen2VLModel

    directory = Path(directory)
    tokenizer = tiny_qwen2_vl_tokenizer()
    config = tiny_qwen2_vl_config(tokenizer)
    (directory / "base").mkdir(parents=True)
    config.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "base")
    config.text_config.vocab_size = len(tokenizer) + 1
    torch.manual_seed(seed)
    model = {key: value.clone() for key, value in Qwen2VLModel(config).state_dict().items()}
    hidden = config.text_config.hidden_size
    sizes = {"0": (8, hidden), "3": (4, 8), "5": (2, 4)}
    head = {}
    for index, (rows, columns) in sizes.items():
        head[f"{index}.weight"] = torch.randn(rows, columns) / columns**0.5
        head[f"{index}.bias"] = torch.randn(rows) * 0.1
    saved = {f"rm_head.{key}": value for key, value in head.items()}
    saved["lm_head.weight"] = torch.zeros(config.text_config.vocab_size, hidden)
    for key, value in model.items():
        if layout == "new":
            saved[f"model.{key}"] = value
        else:
            saved["model." + key.removeprefix("language_model.") if key.startswith("language_model.") else key] = value
    if layout == "new":
        path = directory / "HPSv3.safetensors"
        save_file(saved, path)
    else:
        path = directory / "model.pth"
        torch.save({"model": saved}, path)
    return path, directory / "base", model, head
