"""The released Show-o2 sizes, built on the meta device: parameter counts and checkpoint keys.

Expected values are derived here from the official sources, independently of the adapter code:

- ``show-o2/models/modeling_showo2_qwen2_5.py`` (showlab/Show-o): the top-level modules
  ``showo`` (Qwen2ForCausalLM, embedding resized to ``llm_vocab_size``, l.57-60),
  ``image_embedder_und`` / ``image_embedder_gen`` (PatchEmbed 2×2 from 16 latent channels, l.63-74),
  ``position_embedding`` and ``und_trans`` (SigLIP embeddings / encoder minus its last layer,
  l.77-80), ``fusion_proj`` (RMSNorm, Linear, GELU, Linear, l.85-90), ``time_embed``,
  ``diff_proj`` and ``time_embed_proj`` (only when the LLM width is not 2048, l.93-101),
  ``diffusion_head_a`` (``num_diffusion_layers`` ModulatedAttentionBlocks, l.102-105) and
  ``diffusion_head_b`` (FinalLayer, l.106).
- ``show-o2/models/modules.py``: ``DiffusionHeadConfig`` (l.72-95: width 2048, MLP 8192, 32 heads,
  8 KV heads, head dim 64, qk-norm), ``ModulatedAttentionBlock`` (l.109-129), ``Attention``
  (l.354-390: bias-free q/k/v/o, q_norm/k_norm of head dim), ``MLP`` (l.603-612), ``PatchEmbed``
  (l.705-734), ``TimestepEmbedder`` (l.737-750, 256 frequencies), ``FinalLayer`` (l.778-791).
- ``show-o2/configs/showo2_{1.5b,7b}_stage_2_a.yaml``: ``num_diffusion_layers: 10``,
  ``clip_latent_dim: 1152``, ``patch_size: 2``, ``image_latent_dim: 16``, LLMs
  Qwen2.5-{1.5B,7B}-Instruct, SigLIP ``google/siglip-so400m-patch14-384``.
- ``show-o2/models/misc.py`` ``get_text_tokenizer``: 4 tokens added to the 151665 of Qwen2.5.
- Hub ``config.json`` of Qwen2.5-1.5B-Instruct (1536 / 8960 / 28 layers / 12 heads / 2 KV heads /
  tied embeddings), Qwen2.5-7B-Instruct (3584 / 18944 / 28 / 28 / 4 / untied) and
  siglip-so400m-patch14-384 (1152 / 4304 / 27 layers / 16 heads / 384 px, patch 14 → 729 positions).
"""

from __future__ import annotations

import re

import pytest
import torch

from model_helpers import assert_keys_match, parameter_counts
from pipeline.models.showo2.model import Showo2
from pipeline.models.showo2.config import showo2_config

VOCAB = 151665 + 4
LLM = {
    "1.5b": dict(width=1536, mlp=8960, layers=28, heads=12, kv=2, tied=True),
    "7b": dict(width=3584, mlp=18944, layers=28, heads=28, kv=4, tied=False),
}
SIGLIP = dict(width=1152, mlp=4304, layers=27 - 1, positions=(384 // 14) ** 2)
HEAD = dict(width=2048, mlp=8192, heads=32, kv=8, head_dim=64, layers=10, freq=256)
LATENT, PATCH = 16, 2


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def expected_counts(size: str) -> dict[str, int]:
    llm, sig, head = LLM[size], SIGLIP, HEAD
    d, kv_dim = llm["width"], llm["kv"] * llm["width"] // llm["heads"]
    qwen_layer = (
        linear(d, d)
        + 2 * linear(d, kv_dim)
        + linear(d, d, False)
        + 3 * linear(d, llm["mlp"], False)
        + 2 * d
    )
    s = sig["width"]
    siglip_layer = 4 * linear(s, s) + linear(s, sig["mlp"]) + linear(sig["mlp"], s) + 4 * s
    f, hd = head["width"], head["head_dim"]
    head_layer = (
        2 * linear(f, f, False)
        + 2 * linear(f, head["kv"] * hd, False)
        + 2 * hd
        + 3 * linear(f, head["mlp"], False)
        + 2 * f
        + linear(f, 6 * f)
    )
    return {
        "showo": VOCAB * d * (1 if llm["tied"] else 2) + llm["layers"] * qwen_layer + d,
        "image_embedder_und": LATENT * PATCH * PATCH * s + s,
        "image_embedder_gen": LATENT * PATCH * PATCH * d + d,
        "position_embedding": sig["positions"] * s,
        "und_trans": sig["layers"] * siglip_layer,
        "fusion_proj": (s + d) + linear(s + d, d) + linear(d, d),
        "time_embed": linear(head["freq"], f) + linear(f, f),
        "diff_proj": linear(d, f) + linear(f, f),
        "time_embed_proj": linear(f, d),
        "diffusion_head_a": head["layers"] * head_layer,
        "diffusion_head_b": f + linear(f, PATCH * PATCH * LATENT) + linear(f, 2 * f),
    }


def key_patterns(size: str) -> dict[str, int]:
    """Regex → number of checkpoint keys it must match (together they must cover every key)."""
    llm, sig, head = LLM[size], SIGLIP, HEAD
    return {
        r"showo\.model\.embed_tokens\.weight": 1,
        r"showo\.model\.layers\.\d+\.self_attn\.[qkv]_proj\.(weight|bias)": 6 * llm["layers"],
        r"showo\.model\.layers\.\d+\.self_attn\.o_proj\.weight": llm["layers"],
        r"showo\.model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight": 3 * llm["layers"],
        r"showo\.model\.layers\.\d+\.(input|post_attention)_layernorm\.weight": 2 * llm["layers"],
        r"showo\.model\.norm\.weight": 1,
        r"showo\.lm_head\.weight": 1,
        r"image_embedder_(und|gen)\.proj\.(weight|bias)": 4,
        r"position_embedding\.weight": 1,
        r"und_trans\.layers\.\d+\.(layer_norm[12]|self_attn\.([qkv]|out)_proj|mlp\.fc[12])\.(weight|bias)": 16
        * sig["layers"],
        r"fusion_proj\.0\.weight|fusion_proj\.[13]\.(weight|bias)": 5,
        r"time_embed\.mlp\.[02]\.(weight|bias)": 4,
        r"diff_proj\.[02]\.(weight|bias)": 4,
        r"time_embed_proj\.(weight|bias)": 2,
        r"diffusion_head_a\.\d+\.self_attn\.[qkvo]_proj\.weight": 4 * head["layers"],
        r"diffusion_head_a\.\d+\.self_attn\.[qk]_norm\.weight": 2 * head["layers"],
        r"diffusion_head_a\.\d+\.mlp\.(gate|up|down)_proj\.weight": 3 * head["layers"],
        r"diffusion_head_a\.\d+\.(input|post_attention)_layernorm\.weight": 2 * head["layers"],
        r"diffusion_head_a\.\d+\.adaLN_modulation\.1\.(weight|bias)": 2 * head["layers"],
        r"diffusion_head_b\.(norm_final\.weight|linear\.(weight|bias)|adaLN_modulation\.1\.(weight|bias))": 5,
    }


@pytest.mark.parametrize("size", ["1.5b", "7b"])
def test_released_size_has_the_official_parameters_and_keys(size):
    with torch.device("meta"):
        model = Showo2(showo2_config(size))
    assert parameter_counts(model) == expected_counts(size)
    keys = list(model.checkpoint_state_dict())
    assert_keys_match(keys, key_patterns(size))
    layer_ids = {
        int(m.group(1)) for k in keys if (m := re.match(r"showo\.model\.layers\.(\d+)\.", k))
    }
    assert layer_ids == set(range(LLM[size]["layers"]))
    shape = model.checkpoint_state_dict()["showo.model.embed_tokens.weight"].shape
    assert shape == (VOCAB, LLM[size]["width"])
    assert model.config.num_image_tokens == 729 and model.config.image_size == 432


def test_released_totals():
    """Totals without the frozen Wan VAE (which adds 126,892,531)."""
    assert sum(expected_counts("1.5b").values()) == 2_830_777_056
    assert sum(expected_counts("7b").values()) == 8_932_118_752
