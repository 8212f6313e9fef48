"""OpenUni's family spec: what the registry, preflight and trainer know about it."""

from __future__ import annotations

from pathlib import Path

from pipeline.models.base import FamilySpec, MLLMAdapter, ModelConfig, Requirement
from pipeline.models.openuni.config import PRESETS, OpenUniConfig

TOKENIZER = "the InternVL3 directory holds it"


def adapter() -> type[MLLMAdapter]:
    from pipeline.models.openuni.model import OpenUni

    return OpenUni


def required_files(model: ModelConfig) -> list[Requirement]:
    """Random init needs a tokenizer. Otherwise the parts are found as loading finds them (a saved
    directory, or a released ``openuni_*.pth`` on InternVL3 + SANA + DC-AE directories; missing
    parts raise ``FileNotFoundError`` naming their key), and the tokenizer is ``tokenizer_path``
    or InternVL3's."""
    from pipeline.models.openuni.files import locate

    tokenizer_path = Path(model.tokenizer_path) if model.tokenizer_path else None
    options = dict(model.options)
    if model.path is None and not (options.get("internvl_path") or options.get("sana_path")):
        return [Requirement("model.tokenizer_path", tokenizer_path, "tokenizer", TOKENIZER)]
    preset = model.preset if model.preset in PRESETS else None
    parts = locate(
        model.path,
        internvl_path=None,
        sana_path=None,
        vae_path=model.vae_path,
        preset=preset,
        options=options,
    )
    return [
        Requirement(
            "model.tokenizer_path",
            tokenizer_path,
            "tokenizer",
            TOKENIZER,
            fallbacks=(parts.internvl,),
        )
    ]


SPEC = FamilySpec(
    name="openuni",
    title="OpenUni",
    adapter=adapter,
    options=OpenUniConfig,
    presets=PRESETS,
    required_files=required_files,
    repeated_blocks=(
        "lmm.vision_model.encoder.layers",
        "lmm.language_model.model.layers",
        "connector.layers",
        "transformer.transformer_blocks",
    ),
)
