"""Local files of OpenUni: the saved layout, released ``openuni_*.pth`` files, base-model directories.

Nothing is downloaded: every component is read from a local directory in the format of its hub
repository (InternVL3: ``config.json`` + ``model*.safetensors`` + tokenizer; SANA and DC-AE:
diffusers ``config.json`` + ``diffusion_pytorch_model*``). The directory :meth:`OpenUni.save_pretrained`
writes has the same pieces side by side, so both go through :func:`locate`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC
from torch import Tensor

from pipeline.config import from_dict
from pipeline.models.openuni.config import (
    OpenUniConfig,
    infer_preset,
    openuni_config,
    options_from_dcae,
    options_from_internvl,
    options_from_sana,
)
from pipeline.models.common.model_dir import read_adapter_record
from pipeline.models.common.presets import deep_merge
from pipeline.models.common.weights import load_strict, read_weight_file

LAYOUT = {"internvl": "internvl3", "sana": "sana", "vae": "vae", "checkpoint": "openuni.pth"}


@dataclass
class Assembly:
    """Where each part of a model lives, and the config they make together."""

    config: OpenUniConfig
    internvl: Path
    sana: Path
    vae: Path
    checkpoint: Path | None


def locate(
    path: str | Path | None,
    *,
    internvl_path: str | Path | None,
    sana_path: str | Path | None,
    vae_path: str | Path | None,
    preset: str | None,
    options: dict[str, Any],
) -> Assembly:
    """A saved directory (its ``config.json`` names the parts), or a released assembly.

    For a released ``openuni_*.pth`` (or ``path=None``: the base models alone) the dims come from
    the base models' ``config.json`` files and the connector from ``preset`` (inferred from the
    LLM width and the SANA latent size when not given).
    """
    record = None
    if path is not None and (Path(path) / "config.json").is_file():
        record = read_adapter_record(Path(path) / "config.json")
    if record is not None:
        root = Path(path)
        raw = json.loads((root / "config.json").read_text())
        config = from_dict(
            OpenUniConfig, deep_merge(record["config"], options), source=str(root / "config.json")
        )
        return Assembly(
            config,
            root / raw["internvl"],
            transformer_dir(root / raw["sana"]),
            root / raw["vae"],
            root / raw["checkpoint"],
        )
    internvl = _required_dir(
        internvl_path or options.get("internvl_path"), "internvl_path", "the InternVL3 directory"
    )
    sana = transformer_dir(
        _required_dir(
            sana_path or options.get("sana_path"), "sana_path", "the SANA diffusers directory"
        )
    )
    vae = _required_dir(
        vae_path, "vae_path", "the DC-AE directory (dc-ae-f32c32-sana-1.1-diffusers)"
    )
    checkpoint = _released_checkpoint(Path(path)) if path is not None else None
    return Assembly(
        _config_from_components(internvl, sana, vae, preset, options),
        internvl,
        sana,
        vae,
        checkpoint,
    )


def _required_dir(value: str | Path | None, name: str, what: str) -> Path:
    if value is None:
        raise FileNotFoundError(f"a released OpenUni checkpoint needs {name}: {what}")
    if not Path(value).is_dir():
        raise FileNotFoundError(f"{name} {value} is not a directory ({what})")
    return Path(value)


def transformer_dir(directory: Path) -> Path:
    """A SANA pipeline directory's ``transformer/`` subfolder, or the directory itself."""
    return (
        directory / "transformer"
        if (directory / "transformer" / "config.json").is_file()
        else directory
    )


def _released_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.pth")) if path.is_dir() else []
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{path}: expected an openuni_*.pth file or a directory holding exactly one .pth "
            f"(found {len(candidates)})"
        )
    return candidates[0]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text())


def _config_from_components(
    internvl: Path, sana: Path, vae: Path, preset: str | None, options: dict[str, Any]
) -> OpenUniConfig:
    sana_raw, dcae_raw = _read_json(sana / "config.json"), _read_json(vae / "config.json")
    components = deep_merge(
        options_from_internvl(_read_json(internvl / "config.json")), options_from_sana(sana_raw)
    )
    components.update(options_from_dcae(dcae_raw))
    sample_size = sana_raw.get("sample_size", 32)
    components["image_size"] = sample_size * 2 ** (
        len(dcae_raw.get("encoder_block_out_channels", [0] * 6)) - 1
    )
    preset = preset or infer_preset(components["llm"].get("hidden_size", 896), sample_size)
    return openuni_config(preset, deep_merge(components, options), source=str(internvl))


def read_diffusers_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of a diffusers model directory (``diffusion_pytorch_model*``, sharded or not)."""
    for index in sorted(directory.glob("diffusion_pytorch_model*.index.json")):
        state: dict[str, Tensor] = {}
        for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_weight_file(directory / name))
        return state
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (directory / name).is_file():
            return read_weight_file(directory / name)
    variants = sorted(directory.glob("diffusion_pytorch_model.*.safetensors"))
    if len(variants) == 1:
        return read_weight_file(variants[0])
    raise FileNotFoundError(
        f"no diffusers weights in {directory}: expected diffusion_pytorch_model.safetensors"
    )


def read_openuni_checkpoint(path: Path) -> dict[str, Tensor]:
    """A released ``openuni_*.pth``: a state dict, possibly wrapped in ``state_dict`` / ``module``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def load_vae(source: str | Path, config: OpenUniConfig) -> AutoencoderDC:
    """The frozen DC-AE from a diffusers directory (or a pipeline directory's ``vae/``)."""
    source = Path(source)
    if (source / "vae" / "config.json").is_file():
        source = source / "vae"
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"no DC-AE at {source}: pass vae_path (dc-ae-f32c32-sana-1.1-diffusers directory)"
        )
    vae = AutoencoderDC(**config.vae.diffusers_kwargs())
    load_strict(vae, read_diffusers_weights(source), source=str(source))
    return vae.requires_grad_(False).eval()


def internvl_config_json(config: OpenUniConfig, vocab_size: int) -> dict[str, Any]:
    """An InternVL3 ``config.json`` (``InternVLChatConfig`` fields) describing ``config``."""
    vision, llm = config.vision, config.llm
    rope = None
    if llm.rope_dynamic_factor is not None:
        rope = {"rope_type": "dynamic", "type": "dynamic", "factor": llm.rope_dynamic_factor}
    vision_keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "patch_size",
        "image_size",
        "qkv_bias",
        "qk_normalization",
        "norm_type",
        "layer_norm_eps",
        "initializer_factor",
    )
    llm_keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
    )
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "template": "internvl2_5",
        "downsample_ratio": config.downsample_ratio,
        "force_image_size": vision.image_size,
        "select_layer": -1,
        "ps_version": "v2",
        "tie_word_embeddings": llm.tie_word_embeddings,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_act": "gelu",
            "num_channels": 3,
            **{k: getattr(vision, k) for k in vision_keys},
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_act": "silu",
            "vocab_size": vocab_size,
            "rope_scaling": rope,
            **{k: getattr(llm, k) for k in llm_keys},
        },
    }
