"""The truth-test zoo: timm, torchvision and transformers models, each with a small input (one list, ZOO).

Every entry builds its model in train mode, as a library creates it (no pretrained weights, nothing
downloaded: Hugging Face models come from small configs), and an input of batch 2 (train-mode batch
norm needs more than one value per channel). Inputs are a tensor, or a dict of keyword inputs for the
Hugging Face models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str  # the pytest id: "<library>/<model>[-<what is special>]"
    build: Callable[[], tuple[nn.Module, Any]]  # -> (model in train mode, its input)

    def __str__(self) -> str:
        return self.name


def _image(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


def _timm(arch: str, size: int = 64, **kwargs) -> Callable[[], tuple[nn.Module, Any]]:
    def build():
        import timm

        return timm.create_model(arch, pretrained=False, **kwargs), _image(size)

    return build


def _tv(arch: str, size: int = 64, input_shape: tuple[int, ...] = (), **kwargs) -> Callable[[], tuple[nn.Module, Any]]:
    def build():
        import torchvision

        model = torchvision.models.get_model(arch, weights=None, **kwargs)
        return model, torch.randn(2, *input_shape) if input_shape else _image(size)

    return build


def _tv_vit() -> tuple[nn.Module, Any]:
    """vit_b_16's architecture (nn.MultiheadAttention blocks, conv patchify), small: 64 px, 2 layers."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=64,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        dropout=0.1,
        attention_dropout=0.1,
    ), _image(64)


_TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
_DECODER = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    use_cache=False,
)


def _tokens(seq: int = 8) -> torch.Tensor:
    return torch.randint(3, 100, (2, seq))


def _hf(config_name: str, model_name: str, inputs: Callable[[], dict[str, Any]], **config) -> Callable:
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        model = getattr(transformers, model_name)(cfg)  # weights initialised from the config
        return model.train(), inputs()

    return build


def _moe(config_name: str, model_name: str, implementation: str | None = None, **config) -> Callable:
    """A mixture-of-experts decoder (transformers' 3-D expert stacks), 4 experts of which each token takes 2
    (16 tokens: every expert receives some); ``implementation``: the experts' forward (default grouped_mm)."""
    build = _hf(config_name, model_name, _text, **{**_DECODER, "intermediate_size": 48, **config})

    def moe():
        model, inputs = build()
        if implementation is not None:
            model.config._experts_implementation = implementation
        return model, inputs

    return moe


_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)


def _text() -> dict[str, Any]:
    return {"input_ids": _tokens(), "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _seq2seq() -> dict[str, Any]:
    return {
        "input_ids": _tokens(),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "decoder_input_ids": _tokens(6),
    }


def _pixels(size: int = 64) -> Callable[[], dict[str, Any]]:
    return lambda: {"pixel_values": _image(size)}


ZOO: list[ZooModel] = [
    # --- timm: CNNs -----------------------------------------------------------------------------
    ZooModel("timm/resnet18-drop", _timm("resnet18", drop_rate=0.2, drop_path_rate=0.1)),
    ZooModel("timm/resnet26d", _timm("resnet26d")),
    ZooModel("timm/resnext26ts-grouped", _timm("resnext26ts")),
    ZooModel("timm/regnetx_002-grouped", _timm("regnetx_002")),
    ZooModel("timm/densenet121", _timm("densenet121")),
    ZooModel("timm/dla34", _timm("dla34")),
    ZooModel("timm/mobilenetv3_small_050-depthwise-drop", _timm("mobilenetv3_small_050", drop_rate=0.2)),
    ZooModel("timm/efficientnet_b0-drop_path", _timm("efficientnet_b0", drop_rate=0.2, drop_path_rate=0.2)),
    ZooModel("timm/ghostnet_050", _timm("ghostnet_050")),
    ZooModel("timm/mnasnet_050", _timm("mnasnet_050")),
    ZooModel("timm/rexnet_100", _timm("rexnet_100")),
    ZooModel("timm/repvgg_a0", _timm("repvgg_a0")),
    ZooModel("timm/ese_vovnet19b_dw", _timm("ese_vovnet19b_dw")),
    ZooModel("timm/convnext_atto-drop_path", _timm("convnext_atto", drop_path_rate=0.1)),
    ZooModel("timm/fastvit_t8", _timm("fastvit_t8")),
    ZooModel("timm/inception_v3", _timm("inception_v3", size=80)),
    # --- timm: weight-standardized convs (StdConv2d, ScaledStdConv2d) -----------------------------
    ZooModel("timm/resnetv2_50x1_bit-stdconv", _timm("resnetv2_50x1_bit")),
    ZooModel("timm/nf_resnet26-scaledstdconv", _timm("nf_resnet26")),
    ZooModel("timm/nf_regnet_b0-scaledstdconv", _timm("nf_regnet_b0")),
    ZooModel("timm/eca_nfnet_l0-scaledstdconv", _timm("eca_nfnet_l0")),
    ZooModel("timm/vit_small_r26_s32_224-hybrid-stdconv", _timm("vit_small_r26_s32_224", img_size=64)),
    # --- timm: ViTs and hybrids -------------------------------------------------------------------
    ZooModel(
        "timm/vit_tiny_patch16_224-drop_path",
        _timm("vit_tiny_patch16_224", img_size=64, drop_rate=0.1, drop_path_rate=0.1),
    ),
    ZooModel("timm/deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224", img_size=64)),
    ZooModel("timm/cait_xxs24_224-talking_heads", _timm("cait_xxs24_224", img_size=64)),
    ZooModel("timm/eva02_tiny_patch14_224-rope", _timm("eva02_tiny_patch14_224", size=56, img_size=56)),
    ZooModel("timm/swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4)),
    ZooModel("timm/levit_128s", _timm("levit_128s", img_size=64)),
    ZooModel("timm/mobilevit_xxs", _timm("mobilevit_xxs")),
    ZooModel("timm/poolformer_s12", _timm("poolformer_s12")),
    ZooModel("timm/pit_ti_224", _timm("pit_ti_224", img_size=64)),
    ZooModel("timm/xcit_nano_12_p16_224", _timm("xcit_nano_12_p16_224", img_size=64)),
    ZooModel("timm/convit_tiny", _timm("convit_tiny", img_size=64)),
    ZooModel("timm/pvt_v2_b0", _timm("pvt_v2_b0")),
    ZooModel("timm/edgenext_xx_small", _timm("edgenext_xx_small")),
    ZooModel("timm/efficientvit_b0", _timm("efficientvit_b0")),
    # --- timm: MLP-mixers ------------------------------------------------------------------------
    ZooModel("timm/mixer_s16_224", _timm("mixer_s16_224", img_size=64)),
    ZooModel("timm/resmlp_12_224", _timm("resmlp_12_224", img_size=64)),
    ZooModel("timm/gmlp_ti16_224", _timm("gmlp_ti16_224", img_size=64)),
    # --- torchvision -----------------------------------------------------------------------------
    ZooModel("tv/resnet18", _tv("resnet18")),
    ZooModel("tv/resnext50_32x4d-grouped", _tv("resnext50_32x4d")),
    ZooModel("tv/mobilenet_v3_small", _tv("mobilenet_v3_small")),
    ZooModel("tv/mobilenet_v2", _tv("mobilenet_v2")),
    ZooModel("tv/efficientnet_b0", _tv("efficientnet_b0")),
    ZooModel("tv/vit_b_16-small-mha", _tv_vit),
    ZooModel("tv/convnext_tiny", _tv("convnext_tiny")),
    ZooModel("tv/regnet_y_400mf", _tv("regnet_y_400mf")),
    ZooModel("tv/squeezenet1_1", _tv("squeezenet1_1")),
    ZooModel("tv/googlenet-aux", _tv("googlenet", aux_logits=True, init_weights=True)),
    ZooModel("tv/inception_v3", _tv("inception_v3", size=80, aux_logits=False, init_weights=True)),  # aux: >= 299 px
    ZooModel("tv/swin_t", _tv("swin_t")),
    ZooModel("tv/shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5")),
    ZooModel("tv/mnasnet0_5", _tv("mnasnet0_5")),
    ZooModel("tv/r3d_18-conv3d", _tv("r3d_18", input_shape=(3, 4, 32, 32))),
    ZooModel("tv/lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", weights_backbone=None, num_classes=4)),
    # --- transformers, from small configs --------------------------------------------------------
    ZooModel("hf/bert", _hf("BertConfig", "BertForSequenceClassification", _text, **_TEXT)),
    ZooModel(
        "hf/gpt2-conv1d-tied",
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            _text,
            vocab_size=100,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=1,
            eos_token_id=2,
            use_cache=False,
        ),
    ),
    ZooModel("hf/llama", _hf("LlamaConfig", "LlamaForCausalLM", _text, **_DECODER)),
    ZooModel("hf/llama-tied", _hf("LlamaConfig", "LlamaForCausalLM", _text, tie_word_embeddings=True, **_DECODER)),
    ZooModel("hf/mistral", _hf("MistralConfig", "MistralForCausalLM", _text, **_DECODER)),
    ZooModel("hf/qwen2-tied", _hf("Qwen2Config", "Qwen2ForCausalLM", _text, tie_word_embeddings=True, **_DECODER)),
    ZooModel(
        "hf/t5-tied",
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            _seq2seq,
            vocab_size=100,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            use_cache=False,
        ),
    ),
    ZooModel(
        "hf/bart-tied",
        _hf(
            "BartConfig",
            "BartForConditionalGeneration",
            _seq2seq,
            vocab_size=100,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            use_cache=False,
        ),
    ),
    ZooModel(
        "hf/distilbert-tied",
        _hf(
            "DistilBertConfig",
            "DistilBertForMaskedLM",
            _text,
            vocab_size=100,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
        ),
    ),
    ZooModel("hf/roberta-tied", _hf("RobertaConfig", "RobertaForMaskedLM", _text, **_TEXT)),
    ZooModel("hf/albert-shared-layers", _hf("AlbertConfig", "AlbertForMaskedLM", _text, embedding_size=16, **_TEXT)),
    ZooModel("hf/electra", _hf("ElectraConfig", "ElectraForPreTraining", _text, embedding_size=16, **_TEXT)),
    ZooModel("hf/deberta_v2", _hf("DebertaV2Config", "DebertaV2ForSequenceClassification", _text, **_TEXT)),
    ZooModel(
        "hf/opt-tied",
        _hf(
            "OPTConfig",
            "OPTForCausalLM",
            _text,
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            use_cache=False,
        ),
    ),
    ZooModel("hf/gpt_neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", _text, use_cache=False, **_TEXT)),
    ZooModel(
        "hf/bloom",
        _hf(
            "BloomConfig",
            "BloomForCausalLM",
            _text,
            vocab_size=100,
            hidden_size=32,
            n_layer=2,
            n_head=2,
            use_cache=False,
        ),
    ),
    ZooModel(
        "hf/gpt_bigcode-mqa",
        _hf(
            "GPTBigCodeConfig",
            "GPTBigCodeForCausalLM",
            _text,
            vocab_size=100,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=1,
            eos_token_id=2,
            use_cache=False,
        ),
    ),
    # --- transformers: mixture of experts (3-D expert stacks, grouped_mm or the per-expert loop) --------
    ZooModel("hf/mixtral-moe", _moe("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)),
    ZooModel(
        "hf/mixtral-moe-eager-loop",
        _moe("MixtralConfig", "MixtralForCausalLM", "eager", num_local_experts=4, num_experts_per_tok=2),
    ),
    ZooModel(
        "hf/qwen2_moe-shared-expert",
        _moe("Qwen2MoeConfig", "Qwen2MoeForCausalLM", shared_expert_intermediate_size=32, **_MOE),
    ),
    ZooModel("hf/qwen3_moe", _moe("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_MOE)),
    ZooModel(
        "hf/olmoe",
        _moe("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, pad_token_id=1, eos_token_id=2),
    ),
    ZooModel(
        "hf/gpt_oss-transposed-experts",  # experts stored (E, in, out), with biases
        _moe(
            "GptOssConfig",
            "GptOssForCausalLM",
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            max_position_embeddings=131072,  # 32 x 4096: the YaRN factor the config sets
            layer_types=["full_attention", "full_attention"],
        ),
    ),
    ZooModel("hf/phi", _hf("PhiConfig", "PhiForCausalLM", _text, use_cache=False, **_TEXT)),
    ZooModel(
        "hf/vit",
        _hf(
            "ViTConfig",
            "ViTForImageClassification",
            _pixels(),
            image_size=64,
            patch_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
    ),
    ZooModel(
        "hf/swin",
        _hf(
            "SwinConfig",
            "SwinForImageClassification",
            _pixels(),
            image_size=64,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=4,
        ),
    ),
    ZooModel(
        "hf/convnext",
        _hf(
            "ConvNextConfig",
            "ConvNextForImageClassification",
            _pixels(),
            hidden_sizes=[8, 16, 32, 64],
            depths=[1, 1, 1, 1],
            drop_path_rate=0.1,
        ),
    ),
    ZooModel(
        "hf/segformer",
        _hf(
            "SegformerConfig",
            "SegformerForSemanticSegmentation",
            _pixels(),
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
            num_labels=3,
        ),
    ),
    ZooModel(
        "hf/wav2vec2-weight_norm",
        _hf(
            "Wav2Vec2Config",
            "Wav2Vec2ForCTC",
            lambda: {"input_values": torch.randn(2, 400)},
            vocab_size=20,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
    ),
    ZooModel(
        "hf/whisper-tied",
        _hf(
            "WhisperConfig",
            "WhisperForConditionalGeneration",
            lambda: {"input_features": torch.randn(2, 16, 32), "decoder_input_ids": _tokens(6)},
            vocab_size=100,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            use_cache=False,
        ),
    ),
]

ZOO_BY_NAME = {entry.name: entry for entry in ZOO}
