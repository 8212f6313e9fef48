"""The released Harmon sizes built on the meta device, and the KL-16 VAE layout.

Expected values are derived here from the official sources, independently of the adapter code
(github.com/wusize/Harmon unless noted):

- ``src/models/harmon.py`` l.35-53: top-level modules ``vae``, ``llm``, ``mar``, ``proj_in`` =
  Linear(E, H), SiLU, Linear(H, H) and ``proj_out`` = Linear(H, H), SiLU, Linear(H, E) (``build_mlp``
  l.12-16); ``src/models/harmon_dev.py`` l.58-63: the saved state dict drops ``vae.*``.
- ``src/models/mar/mar.py`` l.44-109: ``class_emb`` (class_num × E), ``fake_latent`` [1, E], ``z_proj``
  (16 → E), ``z_proj_ln``, ``encoder_pos_embed_learned`` [1, 256 + 64, E], timm ``Block`` ×
  depth (qkv bias, mlp_ratio 4), ``encoder_norm``, ``decoder_embed`` (E → D), ``mask_token``,
  ``decoder_pos_embed_learned``, decoder blocks, ``decoder_norm``, ``diffusion_pos_embed_learned``
  [1, 256, D], ``diffloss``; l.449-470: MAR-B 768/12/12, MAR-H 1280/20/16.
- ``src/models/mar/diffloss.py`` l.9-24, 59-239: ``net`` = SimpleMLPAdaLN(in 16, width w, out 32,
  z D, depth d): ``time_embed.mlp`` (256 → w → w), ``cond_embed``, ``input_proj``, ``res_blocks``
  (``in_ln``, ``mlp.0``, ``mlp.2``, ``adaLN_modulation.1`` → 3w), ``final_layer`` (``norm_final``
  without affine, ``linear`` → 32, ``adaLN_modulation.1`` → 2w).
- ``configs/models/qwen2_5_0_5b_kl16_mar_b.py`` / ``qwen2_5_1_5b_kl16_mar_h.py``: img_size 256,
  vae_stride 16, patch 1, buffer 64, class_num 1000, diffloss d/w 6/1024 and 12/1536; LLMs
  Qwen2.5-0.5B-Instruct (896 / 4864 / 24 layers / 14 heads / 2 KV heads) and Qwen2.5-1.5B-Instruct
  (1536 / 8960 / 28 / 12 / 2), both tied, vocabulary 151936 (their hub ``config.json``).
- ``src/models/mar/vae.py``: the LDM KL VAE (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, attention
  at 16×16 resolution = the last encoder level, none in the decoder's up path).
- Corroboration: huggingface.co/gatilin/harmon_0_5b_visual_mar_codec counts 684 ``mar.*``,
  ``vae.*``, ``proj_in.*``, ``proj_out.*`` tensors in the official Harmon-0.5B checkpoint; the
  patterns below give 372 (MAR + projections) and the VAE 312.
"""

from __future__ import annotations


import pytest
import torch

from harmon_helpers import ldm_vae_keys
from model_helpers import assert_keys_match, parameter_counts
from pipeline.config import ConfigError
from pipeline.models.harmon.model import Harmon
from pipeline.models.harmon.config import VAEConfig, harmon_config
from pipeline.models.harmon.vae import kl16_vae, ldm_to_diffusers

VOCAB, LATENT, BUFFER, SEQ = 151936, 16, 64, (256 // 16) ** 2
LLM = {
    "0.5b": dict(width=896, mlp=4864, layers=24, heads=14, kv=2),
    "1.5b": dict(width=1536, mlp=8960, layers=28, heads=12, kv=2),
}
MAR = {
    "0.5b": dict(width=768, depth=12, diff_depth=6, diff_width=1024),
    "1.5b": dict(width=1280, depth=20, diff_depth=12, diff_width=1536),
}


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def expected_counts(size: str) -> dict[str, int]:
    llm, mar = LLM[size], MAR[size]
    h, kv_dim = llm["width"], llm["kv"] * llm["width"] // llm["heads"]
    qwen_layer = (
        linear(h, h)
        + 2 * linear(h, kv_dim)
        + linear(h, h, False)
        + 3 * linear(h, llm["mlp"], False)
        + 2 * h
    )
    e = mar["width"]
    block = 2 * e + linear(e, 3 * e) + linear(e, e) + 2 * e + linear(e, 4 * e) + linear(4 * e, e)
    w, d = mar["diff_width"], mar["diff_depth"]
    diffloss = (
        linear(256, w)
        + linear(w, w)
        + linear(e, w)
        + linear(LATENT, w)
        + d * (2 * w + 2 * linear(w, w) + linear(w, 3 * w))
        + linear(w, 2 * LATENT)
        + linear(w, 2 * w)
    )
    mar_total = (
        1000 * e
        + e
        + linear(LATENT, e)
        + 2 * e
        + (SEQ + BUFFER) * e
        + 2 * mar["depth"] * block
        + 2 * e
        + linear(e, e)
        + e
        + (SEQ + BUFFER) * e
        + 2 * e
        + SEQ * e
        + diffloss
    )
    return {
        "llm": VOCAB * h + llm["layers"] * qwen_layer + h,
        "mar": mar_total,
        "proj_in": linear(e, h) + linear(h, h),
        "proj_out": linear(h, h) + linear(h, e),
    }


def key_patterns(size: str) -> dict[str, int]:
    """Regex → number of checkpoint keys it must match (together they must cover every key)."""
    layers, depth, diff_depth = LLM[size]["layers"], MAR[size]["depth"], MAR[size]["diff_depth"]
    return {
        r"llm\.model\.embed_tokens\.weight": 1,
        r"llm\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)": 6 * layers,
        r"llm\.model\.layers\.\d+\.self_attn\.o_proj\.weight": layers,
        r"llm\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight": 3 * layers,
        r"llm\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight": 2 * layers,
        r"llm\.model\.norm\.weight": 1,
        r"llm\.lm_head\.weight": 1,
        r"mar\.(class_emb\.weight|fake_latent|mask_token)": 3,
        r"mar\.(z_proj|z_proj_ln|decoder_embed|encoder_norm|decoder_norm)\.(weight|bias)": 10,
        r"mar\.(encoder|decoder|diffusion)_pos_embed_learned": 3,
        r"mar\.(en|de)coder_blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)": 2
        * 12
        * depth,
        r"mar\.diffloss\.net\.(time_embed\.mlp\.[02]|cond_embed|input_proj)\.(weight|bias)": 8,
        r"mar\.diffloss\.net\.res_blocks\.\d+\.(in_ln|mlp\.0|mlp\.2|adaLN_modulation\.1)\.(weight|bias)": 8
        * diff_depth,
        r"mar\.diffloss\.net\.final_layer\.(linear|adaLN_modulation\.1)\.(weight|bias)": 4,
        r"proj_(in|out)\.[02]\.(weight|bias)": 8,
    }


@pytest.mark.parametrize("size", ["0.5b", "1.5b"])
def test_released_size_has_the_official_parameters_and_keys(size):
    with torch.device("meta"):
        model = Harmon(harmon_config(size))
    assert parameter_counts(model) == expected_counts(size)
    keys = list(model.checkpoint_state_dict())
    assert_keys_match(keys, key_patterns(size))
    assert sum(not k.startswith("llm.") for k in keys) == {"0.5b": 372, "1.5b": 612}[size]
    state = model.checkpoint_state_dict()
    assert state["llm.model.embed_tokens.weight"].shape == (VOCAB, LLM[size]["width"])
    assert state["mar.encoder_pos_embed_learned"].shape == (1, SEQ + BUFFER, MAR[size]["width"])
    assert model.config.num_image_tokens == 1024 and model.config.num_llm_image_tokens == 1024 + 64


def test_released_totals():
    """Totals without the frozen KL-16 VAE (which adds 66,456,019)."""
    assert sum(expected_counts("0.5b").values()) == 704_942_880
    assert sum(expected_counts("1.5b").values()) == 2_494_774_048


def test_the_official_kl16_layout_maps_one_to_one_onto_the_diffusers_vae():
    ldm = ldm_vae_keys()
    assert len(ldm) == 312
    with torch.device("meta"):
        vae = kl16_vae(VAEConfig())
    expected = vae.state_dict()
    converted = ldm_to_diffusers({k: torch.empty(0) for k in ldm})
    assert set(converted) == set(expected)
    assert sum(p.numel() for p in vae.parameters()) == 66_456_019


def test_the_vae_stride_follows_its_levels():
    """Released: five levels, 16x (512 px → 32×32 tokens, 256-px tables → 16×16). Tiny: four levels, 8x."""
    released, tiny = harmon_config("1.5b"), harmon_config("tiny")
    assert (released.vae.stride, released.grid_size, released.position_side) == (16, 32, 16)
    assert (tiny.vae.stride, tiny.grid_size, tiny.position_side) == (8, 8, 4)
    with torch.device("meta"):
        vae = kl16_vae(tiny.vae)
    assert vae.encode(torch.empty(1, 3, 64, 64, device="meta")).latent_dist.mean.shape == (
        1,
        16,
        8,
        8,
    )
    with pytest.raises(ConfigError, match="vae.block_out_channels needs at least 2 levels"):
        harmon_config("tiny", {"vae": {"block_out_channels": [8]}})
    with pytest.raises(
        ConfigError, match="image_size 60 must be a multiple of VAE stride × patch = 8"
    ):
        harmon_config("tiny", {"image_size": 60})
