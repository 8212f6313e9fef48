"""The adapter contract, the family registry and the checkpoint IO helpers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.config import ConfigError
from model_helpers import i2t_sample, t2i_sample, trained_parameters
from pipeline.models import (
    MLLMAdapter,
    MLLMOutput,
    ModelConfig,
    adapter_class,
    build_model,
    family_specs,
)
from pipeline.models.common.latents import patchify
from pipeline.models.common.text import answer_tokens, masked_mean
from pipeline.models.common.weights import (
    CheckpointMismatchError,
    find_weight_files,
    load_strict,
    read_state_dict,
    save_state_dict,
)


def _output(**fields) -> MLLMOutput:
    defaults = dict(
        loss_i2t=None,
        loss_t2i=None,
        z_u=None,
        z_g=None,
        text_u=None,
        text_g=None,
        answer_ids=None,
        answer_mask=None,
        target_patches=None,
        target_mask=None,
        num_text_tokens=0,
        num_image_tokens=0,
    )
    return MLLMOutput(**{**defaults, **fields})


def test_infotok_inputs_are_exactly_the_regularizer_arguments():
    z = torch.zeros(2, 3, 4)
    inputs = _output(z_u=z, num_text_tokens=5).infotok_inputs()
    assert list(inputs) == [
        "z_u",
        "z_g",
        "text_u",
        "text_g",
        "answer_ids",
        "answer_mask",
        "target_patches",
        "target_mask",
    ]
    assert inputs["z_u"] is z and inputs["z_g"] is None


def test_adapter_contract_is_abstract():
    class Incomplete(MLLMAdapter):
        family = "incomplete"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    assert {
        "forward",
        "build",
        "from_pretrained",
        "save_pretrained",
        "generate",
        "answer",
        "autoencoder_pass",
        "autoencoder_options",
    } <= MLLMAdapter.__abstractmethods__


class _Adapter(MLLMAdapter):
    """The shared adapter code on a toy module tree: ``enc`` is V_enc, ``head`` a trainable group
    (the abstract entry points are not called here)."""

    family = "toy"
    ENCODER_PREFIXES = ("enc.",)
    TRAINABLE_GROUPS = {"head": ("head.",)}
    forward = build = from_pretrained = save_pretrained = generate = answer = None
    autoencoder_pass = autoencoder_options = vae_posterior = None

    def __init__(self, trainable: list[str]) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            llm=SimpleNamespace(hidden_size=4), trainable=trainable, latent_patch_dim=6
        )
        self.vocab_size = self._vocab_size(None, ["a", "b", "c"])
        self.enc, self.head, self.other = nn.Linear(2, 4), nn.Linear(4, 3), nn.Linear(4, 4)
        self.vae = nn.Dropout()
        self._set_trainable()


def test_shared_adapter_code_follows_the_class_attributes():
    model = _Adapter(["head"])
    assert [name for name, _ in trained_parameters(model)] == [
        "enc.weight",
        "enc.bias",
        "head.weight",
        "head.bias",
    ]
    assert not any(p.requires_grad for p in _Adapter([]).head.parameters())
    assert model.ENCODER_PREFIXES == ("enc.",)
    assert model.infotok_dims() == {
        "token_dim": 4,
        "text_dim": 4,
        "vocab_size": 3,
        "latent_patch_dim": 6,
    }
    assert (
        model.train() is model and model.training and model.enc.training and not model.vae.training
    )
    model.vae.register_buffer("scale", torch.ones(1))
    assert "vae.scale" in model.state_dict() and not any(
        k.startswith("vae.") for k in model.checkpoint_state_dict()
    )
    with pytest.raises(ConfigError, match="vocab_size is null"):
        MLLMAdapter._vocab_size(None, None)
    with pytest.raises(ConfigError, match="tokenizer has 3 tokens but the embedding only 2 rows"):
        MLLMAdapter._vocab_size(2, ["a", "b", "c"])


def test_answer_tokens_and_masked_mean():
    labels = torch.tensor([[-100, 5, -100, 6], [-100, -100, 7, -100]])
    ids, mask = answer_tokens(labels)
    assert ids.tolist() == [[5, 6], [7, 0]] and mask.tolist() == [[True, True], [True, False]]
    x = torch.tensor([[[1.0], [3.0], [9.0]]])
    assert masked_mean(x, torch.tensor([[True, True, False]])).tolist() == [[2.0]]


def test_registry_dispatches_on_family_name():
    for family in ("showo2", "harmon", "openuni"):
        assert adapter_class(family).family == family
    assert set(family_specs()) == {"showo2", "harmon", "openuni"}
    with pytest.raises(
        ConfigError, match="unknown family 'show02'.*available: harmon, openuni, showo2"
    ):
        adapter_class("show02")
    assert ModelConfig().family == "showo2"


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2, bias=False)


def test_sharded_save_and_read_roundtrip(tmp_path):
    module = _Tiny()
    save_state_dict(module.state_dict(), tmp_path, max_shard_bytes=40)
    files = find_weight_files(tmp_path)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    state = read_state_dict(tmp_path)
    assert all(torch.equal(state[k], v) for k, v in module.state_dict().items())


def test_bin_checkpoints_are_read(tmp_path):
    torch.save(_Tiny().state_dict(), tmp_path / "pytorch_model.bin")
    assert set(read_state_dict(tmp_path)) == {"a.weight", "a.bias", "b.weight"}


def test_missing_weights_and_shards_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights"):
        find_weight_files(tmp_path)
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "gone.bin"}})
    )
    with pytest.raises(FileNotFoundError, match="gone.bin"):
        find_weight_files(tmp_path)


def test_load_strict_names_every_bad_key():
    module = _Tiny()
    state = dict(module.state_dict())
    del state["a.bias"]
    state["c.weight"] = torch.zeros(1)
    state["b.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointMismatchError) as info:
        load_strict(module, state, source="x")
    message = str(info.value)
    assert "missing keys (1): a.bias" in message
    assert "unexpected keys (1): c.weight" in message
    assert "shape mismatches (1): b.weight: checkpoint (5, 5) vs model (2, 4)" in message


def test_load_strict_optional_and_ignored_keys():
    module, source = _Tiny(), _Tiny()
    state = {"a.weight": source.a.weight.detach()}
    load_strict(module, state, source="x", optional={"a.bias"}, ignore_prefixes=("b.",))
    assert torch.equal(module.a.weight, source.a.weight)


def test_patchify_maps_token_n_to_its_patch():
    latents = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    patches = patchify(latents, 2, "cpq")
    assert patches.shape == (2, 2 * 3, 3 * 2 * 2)
    # token 4 = grid row 1, column 1 -> latent rows 2..3, columns 2..3, all channels
    torch.testing.assert_close(patches[1, 4], latents[1, :, 2:4, 2:4].reshape(-1))
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 5, 4), 2, "cpq")


@pytest.mark.parametrize("family", ["showo2", "harmon", "openuni"])
def test_a_spec_names_the_repeated_blocks_of_its_tiny_model(family, tokenizer_dir):
    spec = family_specs()[family]
    model = build_model(
        ModelConfig(family=family, preset="tiny", tokenizer_path=str(tokenizer_dir))
    )
    for path in spec.repeated_blocks:
        blocks = model.get_submodule(path)
        assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0, path
        assert len({type(block) for block in blocks}) == 1, path
    assert spec.adapter() is type(model) and spec.presets["tiny"]


@pytest.mark.parametrize("family", ["showo2", "harmon", "openuni"])
def test_without_infotok_inputs_the_clean_generation_pass_is_left_out(family, tokenizer_dir):
    """``infotok.mode=off`` trains without the ``V_enc`` pass over the clean T2I targets (only
    ``z_g`` needs it); the task losses and ``z_u`` are those of the full forward."""
    model = build_model(
        ModelConfig(family=family, preset="tiny", tokenizer_path=str(tokenizer_dir))
    )
    model.eval()
    samples = [i2t_sample(1), i2t_sample(2), t2i_sample(3), t2i_sample(4), t2i_sample(5)]
    batch = model.collate([model.processor(s) for s in samples])
    encoded: list[int] = []
    encode = model.encode_shared_tokens

    def counting(*args, **kwargs):
        encoded.append(len(args[0]))
        return encode(*args, **kwargs)

    model.encode_shared_tokens = counting
    outputs = {}
    with torch.no_grad():
        for with_inputs in (True, False):
            encoded.clear()
            outputs[with_inputs] = (
                model(batch, torch.Generator().manual_seed(0), infotok_inputs=with_inputs),
                sum(encoded),
            )
    (full, full_rows), (lean, lean_rows) = outputs[True], outputs[False]
    assert full_rows - lean_rows == 3, "the three T2I targets are encoded clean only for InfoTok"
    assert full.z_g is not None and lean.z_g is None
    for name in ("loss_i2t", "loss_t2i", "z_u", "text_u", "text_g", "target_patches"):
        torch.testing.assert_close(getattr(lean, name), getattr(full, name), msg=name)
