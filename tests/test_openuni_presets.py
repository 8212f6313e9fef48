"""The released OpenUni sizes, built on the meta device: parameter counts and checkpoint keys.

Expected values are derived here from the official sources, independently of the adapter code:

- wusize/OpenUni ``configs/models/openuni_b_internvl3_1b_sana_0_6b_512_hf.py`` and
  ``openuni_l_internvl3_2b_sana_1_6b_{512,1024}_hf.py``: ``num_queries=256``, connector
  896/3072/6 layers/14 heads (B) and 1536/8960/6/24 (L), the InternVL3, SANA and DC-AE ids.
- wusize/OpenUni ``src/models/openuni/internvl3_sana_hf.py`` l.93-114: ``connector`` =
  ``ConnectorEncoder``, ``projector`` = Linear(connector width → ``caption_channels``)
  (``enc_proj``), ``meta_queries`` [num_queries, LLM width]; ``src/models/connector/
  modeling_connector.py`` l.170-191, 414-436, 479-485: SigLIP encoder layers (q/k/v/out
  projections with bias, ``layer_norm1/2``, ``mlp.fc1/fc2``), no final norm.
- wusize/OpenUni ``src/models/internvl3/modeling_intern_vit.py`` l.133-281 (class token, patch
  conv, positions, fused ``qkv``, ``proj``, ``norm1/2``, ``ls1/2``, ``mlp.fc1/fc2``) and
  ``modeling_internvl_chat.py`` l.61-83 (``vision_model``, ``language_model``, ``mlp1`` =
  LayerNorm, Linear, GELU, Linear over 4 merged ViT tokens).
- InternVL3-1B ``config.json``: InternViT-300M 1024/4096/24 layers, patch 14, 448 px, qkv bias,
  LayerNorm; Qwen2.5 896/4864/24 layers/14 heads/2 KV heads, vocab 151674, untied ``lm_head``.
  InternVL3-2B: Qwen2.5-1.5B 1536/8960/28 layers/12 heads/2 KV heads.
- huggingface/diffusers ``scripts/convert_sana_to_diffusers.py``: the diffusers SANA key layout
  and dims (SanaMS_600M_P1_D28: 36×32 heads, 28 layers, cross 16×72; SanaMS_1600M_P1_D20 and
  SANA 1.5 1.6B: 70×32, 20 layers, cross 20×112; SANA 1.5 adds q/k RMS norms in both
  attentions), ``caption_channels`` 2304, ``mlp_ratio`` 2.5 (GLUMBConv), 32 latent channels.
"""

from __future__ import annotations

import json

import pytest
import torch

from model_helpers import assert_keys_match, parameter_counts
from pipeline.models.openuni.model import OpenUni
from pipeline.models.openuni.config import openuni_config
from pipeline.models.openuni.files import locate

VIT = dict(width=1024, mlp=4096, layers=24, patch=14, size=448)
LLM = {
    "1b": dict(width=896, mlp=4864, layers=24, heads=14, kv=2),
    "2b": dict(width=1536, mlp=8960, layers=28, heads=12, kv=2),
}
VOCAB = 151674
CONNECTOR = {"b": dict(mlp=3072, layers=6), "l": dict(mlp=8960, layers=6)}
SANA = {
    "600m": dict(heads=36, head_dim=32, layers=28, cross_heads=16, cross_head_dim=72),
    "1600m": dict(heads=70, head_dim=32, layers=20, cross_heads=20, cross_head_dim=112),
}
CAPTION, LATENT, QUERIES = 2304, 32, 256
# size -> (InternVL3 LLM, connector, SANA, SANA 1.5 qk-norm)
SIZES = {
    "b_512": ("1b", "b", "600m", False),
    "l_512": ("2b", "l", "1600m", False),
    "l_1024": ("2b", "l", "1600m", True),
}


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def expected_counts(size: str) -> dict[str, int]:
    llm_name, connector_name, sana_name, qk_norm = SIZES[size]
    llm, con, sana = LLM[llm_name], CONNECTOR[connector_name], SANA[sana_name]
    v, h = VIT["width"], llm["width"]
    vit_layer = (
        linear(v, 3 * v)
        + linear(v, v)
        + linear(v, VIT["mlp"])
        + linear(VIT["mlp"], v)
        + 4 * v
        + 2 * v
    )
    positions = (VIT["size"] // VIT["patch"]) ** 2 + 1
    kv = llm["kv"] * h // llm["heads"]
    qwen_layer = (
        linear(h, h)
        + 2 * linear(h, kv)
        + linear(h, h, False)
        + 3 * linear(h, llm["mlp"], False)
        + 2 * h
    )
    connector_layer = 4 * linear(h, h) + linear(h, con["mlp"]) + linear(con["mlp"], h) + 4 * h
    d = sana["heads"] * sana["head_dim"]
    dc = sana["cross_heads"] * sana["cross_head_dim"]
    ff = int(2.5 * d)
    attention = 3 * linear(d, d, False) + linear(d, d) + 3 * linear(d, dc) + linear(dc, d)
    glumbconv = linear(d, 2 * ff) + (2 * ff * 9 + 2 * ff) + linear(ff, d, False)
    sana_layer = 6 * d + attention + glumbconv + (2 * d + 2 * dc if qk_norm else 0)
    sana_rest = (
        linear(LATENT, d)
        + linear(256, d)
        + linear(d, d)
        + linear(d, 6 * d)
        + linear(CAPTION, d)
        + linear(d, d)
        + d
        + 2 * d
        + linear(d, LATENT)
    )
    return {
        "lmm.vision_model": v
        + 3 * VIT["patch"] ** 2 * v
        + v
        + positions * v
        + VIT["layers"] * vit_layer,
        "lmm.mlp1": 2 * 4 * v + linear(4 * v, h) + linear(h, h),
        "lmm.language_model": 2 * VOCAB * h + llm["layers"] * qwen_layer + h,
        "meta_queries": QUERIES * h,
        "connector": con["layers"] * connector_layer,
        "projector": linear(h, CAPTION),
        "transformer": sana["layers"] * sana_layer + sana_rest,
    }


def key_patterns(size: str) -> dict[str, int]:
    """Regex → number of checkpoint keys it must match (together they must cover every key)."""
    llm_name, _, sana_name, qk_norm = SIZES[size]
    vit, llm, sana = VIT["layers"], LLM[llm_name]["layers"], SANA[sana_name]["layers"]
    patterns = {
        r"lmm\.vision_model\.embeddings\.(class_embedding|position_embedding|patch_embedding\.(weight|bias))": 4,
        r"lmm\.vision_model\.encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|norm[12])\.(weight|bias)": 12
        * vit,
        r"lmm\.vision_model\.encoder\.layers\.\d+\.ls[12]": 2 * vit,
        r"lmm\.mlp1\.[013]\.(weight|bias)": 6,
        r"lmm\.language_model\.model\.embed_tokens\.weight": 1,
        r"lmm\.language_model\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)": 6 * llm,
        r"lmm\.language_model\.model\.layers\.\d+\.self_attn\.o_proj\.weight": llm,
        r"lmm\.language_model\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight": 3 * llm,
        r"lmm\.language_model\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight": 2
        * llm,
        r"lmm\.language_model\.model\.norm\.weight": 1,
        r"lmm\.language_model\.lm_head\.weight": 1,
        r"meta_queries": 1,
        r"connector\.layers\.\d+\.(layer_norm[12]|self_attn\.([qkv]|out)_proj|mlp\.fc[12])\.(weight|bias)": 16
        * 6,
        r"projector\.(weight|bias)": 2,
        r"transformer\.patch_embed\.proj\.(weight|bias)": 2,
        r"transformer\.time_embed\.(emb\.timestep_embedder\.linear_[12]|linear)\.(weight|bias)": 6,
        r"transformer\.caption_projection\.linear_[12]\.(weight|bias)": 4,
        r"transformer\.caption_norm\.weight": 1,
        r"transformer\.transformer_blocks\.\d+\.scale_shift_table": sana,
        r"transformer\.transformer_blocks\.\d+\.attn1\.to_[qkv]\.weight": 3 * sana,
        r"transformer\.transformer_blocks\.\d+\.attn2\.to_[qkv]\.(weight|bias)": 6 * sana,
        r"transformer\.transformer_blocks\.\d+\.attn[12]\.to_out\.0\.(weight|bias)": 4 * sana,
        r"transformer\.transformer_blocks\.\d+\.ff\.(conv_(inverted|depth)\.(weight|bias)|conv_point\.weight)": 5
        * sana,
        r"transformer\.(scale_shift_table|proj_out\.(weight|bias))": 3,
    }
    if qk_norm:
        patterns[r"transformer\.transformer_blocks\.\d+\.attn[12]\.norm_[qk]\.weight"] = 4 * sana
    return patterns


@pytest.fixture(scope="module", params=list(SIZES))
def released(request):
    with torch.device("meta"):
        return request.param, OpenUni(openuni_config(request.param))


def test_released_size_has_the_official_parameters(released):
    size, model = released
    counts = parameter_counts(
        model,
        lambda name: (
            ".".join(name.split(".")[:2]) if name.startswith("lmm.") else name.split(".")[0]
        ),
    )
    assert counts == expected_counts(size)


def test_released_size_has_the_official_checkpoint_keys(released):
    size, model = released
    assert_keys_match(model.checkpoint_state_dict(), key_patterns(size))


def test_released_geometry(released):
    """256 tokens of the 448 px ViT (16×16 after the 2×2 pixel shuffle) tile the DC-AE latent."""
    size, model = released
    cfg = model.config
    assert cfg.num_image_tokens == 256 and cfg.num_queries == 256 and cfg.vision.image_size == 448
    assert cfg.image_size == int(size.split("_")[1]) and cfg.latent_size == cfg.image_size // 32
    assert (
        cfg.latent_patch == cfg.image_size // 512
        and cfg.latent_patch_dim == cfg.latent_patch**2 * 32
    )
    assert model.meta_queries.shape == (QUERIES, LLM[SIZES[size][0]]["width"])


def test_dc_ae_is_f32c32_sana_1_1():
    cfg = openuni_config("b_512").vae
    kwargs = cfg.diffusers_kwargs()
    assert (
        cfg.spatial_factor == 32
        and kwargs["latent_channels"] == 32
        and kwargs["scaling_factor"] == 0.41407
    )
    assert kwargs["encoder_block_types"] == ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    assert kwargs["encoder_block_out_channels"] == (128, 256, 512, 512, 1024, 1024)
    assert kwargs["encoder_layers_per_block"] == (2, 2, 2, 3, 3, 3)
    assert kwargs["decoder_layers_per_block"] == (3,) * 6
    assert kwargs["encoder_qkv_multiscales"] == ((), (), (), (5,), (5,), (5,))


def test_released_totals():
    """Without the frozen DC-AE: InternVL3-1B 938.2M + SANA-0.6B 591.7M + OpenUni 54.7M, and the L sizes."""
    assert sum(expected_counts("b_512").values()) == 1_584_601_504
    assert sum(expected_counts("l_512").values()) == 3_919_265_184
    assert sum(expected_counts("l_1024").values()) == 3_919_444_384


def _internvl3_config(llm: dict[str, int]) -> dict:
    """The fields of InternVL3-{1B,2B} ``config.json`` that describe the architecture."""
    return {
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": 0.5,
        "force_image_size": 448,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internvl2_5",
        "tie_word_embeddings": False,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "patch_size": 14,
            "image_size": 448,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "initializer_factor": 0.1,
            "drop_path_rate": 0.1,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": llm["width"],
            "intermediate_size": llm["mlp"],
            "num_hidden_layers": llm["layers"],
            "num_attention_heads": llm["heads"],
            "num_key_value_heads": llm["kv"],
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e6,
            "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
            "max_position_embeddings": 32768,
            "vocab_size": VOCAB,
            "tie_word_embeddings": False,
        },
    }


def _sana_config(name: str, image_size: int, qk_norm: bool) -> dict:
    """diffusers ``SanaTransformer2DModel`` kwargs as ``convert_sana_to_diffusers.py`` writes them."""
    s = SANA[name]
    return {
        "in_channels": 32,
        "out_channels": 32,
        "num_attention_heads": s["heads"],
        "attention_head_dim": 32,
        "num_layers": s["layers"],
        "num_cross_attention_heads": s["cross_heads"],
        "cross_attention_head_dim": s["cross_head_dim"],
        "cross_attention_dim": s["heads"] * 32,
        "caption_channels": CAPTION,
        "mlp_ratio": 2.5,
        "attention_bias": False,
        "sample_size": image_size // 32,
        "patch_size": 1,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": None,
        "qk_norm": "rms_norm_across_heads" if qk_norm else None,
    }


DC_AE_CONFIG = {
    "in_channels": 3,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "upsample_block_type": "interpolate",
    "scaling_factor": 0.41407,
}


@pytest.mark.parametrize("size", list(SIZES))
def test_base_model_configs_give_the_preset(size, tmp_path):
    """A released assembly reads its dims from the base models' ``config.json`` files."""
    llm_name, _, sana_name, qk_norm = SIZES[size]
    image_size = int(size.split("_")[1])
    files = {
        "internvl": _internvl3_config(LLM[llm_name]),
        "sana": _sana_config(sana_name, image_size, qk_norm),
        "vae": DC_AE_CONFIG,
    }
    for name, raw in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(raw))
    parts = locate(
        None,
        internvl_path=tmp_path / "internvl",
        sana_path=tmp_path / "sana",
        vae_path=tmp_path / "vae",
        preset=None,
        options={},
    )
    assert parts.config == openuni_config(size) and parts.checkpoint is None
