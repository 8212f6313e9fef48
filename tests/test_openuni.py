"""OpenUni adapter on the ``tiny`` preset: same classes as the released model, tiny dims, CPU."""

from __future__ import annotations

import json
from unittest.mock import patch

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from model_helpers import (
    trained_parameters,
    assert_mismatch_named,
    assert_same_outputs,
    collated_batch,
    draw_image,
    i2t_sample,
    t2i_sample,
)
from openuni_helpers import Capture, tiny_openuni
from pipeline.config import ConfigError
from pipeline.models import ModelConfig, build_model
from pipeline.models.base import INFOTOK_INPUT_KEYS
from pipeline.models.openuni.model import OpenUni
from pipeline.models.openuni.config import openuni_config
from pipeline.models.openuni.flow import sample_timesteps, training_scheduler
from pipeline.models.openuni.internvl import InternVLRotaryEmbedding, pixel_shuffle
from pipeline.models.common.text import IGNORE
from pipeline.models.openuni.processor import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def model(tokenizer_dir) -> OpenUni:
    return tiny_openuni(tokenizer_dir).train()


def _encode(model, text):
    return model.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- processor


def test_i2t_sequence_is_the_internvl_chat_template(model):
    proc, n = model.processor, model.config.num_image_tokens
    sample = proc(i2t_sample(0, question="describe", answer="two shapes"))
    ids, labels = sample["input_ids"].tolist(), sample["labels"]
    text = proc.tokenizer.decode(ids)
    image = "<img>" + "<IMG_CONTEXT>" * n + "</img>"
    assert text == (
        f"<|im_start|>system\n{model.config.system_message}<|im_end|>\n"
        f"<|im_start|>user\n{image}\ndescribe<|im_end|>\n<|im_start|>assistant\ntwo shapes<|im_end|>\n"
    )
    # Targets: the answer and <|im_end|>, not the assistant prefix nor the final newline.
    assert labels[labels != IGNORE].tolist() == _encode(model, "two shapes<|im_end|>")
    assert labels[-1] == IGNORE
    text_mask = sample["text_mask"]
    assert not text_mask[torch.tensor(ids) == proc.ids.img_context].any() and text_mask[0]
    assert not text_mask[labels != IGNORE].any()
    assert sample["pixel_values"].shape == (3, 56, 56)


def test_i2t_image_placeholder_is_added_when_absent_and_may_appear_once(model):
    proc = model.processor
    plain = proc.i2t_sequence([{"role": "user", "content": "describe"}])["input_ids"].tolist()
    marked = proc.i2t_sequence([{"role": "user", "content": "<image>\ndescribe"}])[
        "input_ids"
    ].tolist()
    assert plain == marked and proc.tokenizer.decode(plain).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="one <image>"):
        proc.i2t_sequence([{"role": "user", "content": "<image> and <image>"}])
    with pytest.raises(ValueError, match="task"):
        proc({"task": "x"})


def test_i2t_image_vit_normalisation(model):
    image = draw_image(3, (56, 56))
    pixels = model.processor(i2t_sample(0) | {"image": image})["pixel_values"]
    raw = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    torch.testing.assert_close(pixels, expected)


def test_t2i_sequence_and_stateless_cfg_dropout(model):
    proc = model.processor
    sample = proc(t2i_sample(0, prompt=" a cat "))
    text = proc.tokenizer.decode(sample["input_ids"].tolist())
    assert (
        text == "<|im_start|>user\nGenerate an image: a cat<|im_end|>\n<|im_start|>assistant\n<img>"
    )
    assert sample["pixel_values"].shape == (3, 32, 32) and sample["pixel_values"].abs().max() <= 1
    cfg = proc.tokenizer.decode(
        proc.t2i_sequence("x", message=model.config.cfg_prompt)["input_ids"].tolist()
    )
    dropped = [proc(t2i_sample(i))["input_ids"].tolist() == _encode(model, cfg) for i in range(400)]
    assert dropped == [
        proc(t2i_sample(i))["input_ids"].tolist() == _encode(model, cfg) for i in range(400)
    ]
    assert 0.05 < sum(dropped) / len(dropped) < 0.15
    long = proc.t2i_sequence("cat " * 400)["input_ids"]
    assert len(long) == model.config.max_prompt_len


def test_collate_splits_the_tasks_into_right_padded_groups(model):
    b = collated_batch(model, "uggu")
    assert b["i2t_input_ids"].shape[0] == 2 and b["t2i_input_ids"].shape[0] == 2
    assert (
        b["t2i_attention_mask"].dtype == torch.bool
        and b["i2t_labels"].shape == b["i2t_input_ids"].shape
    )
    assert set(collated_batch(model, "g")) == {
        "t2i_input_ids",
        "t2i_attention_mask",
        "t2i_pixel_values",
    }


# ----------------------------------------------------------------------------- V_enc geometry


def test_pixel_shuffle_token_covers_a_2x2_block_of_patches():
    grid = torch.arange(8 * 8).view(1, 8, 8, 1).float()  # ViT patch (r, c) holds r*8+c
    tokens = pixel_shuffle(grid, 0.5)
    assert tokens.shape == (1, 4, 4, 4)
    i, j = 1, 2
    assert tokens[0, i, j].tolist() == [
        (2 * i) * 8 + 2 * j,
        (2 * i) * 8 + 2 * j + 1,
        (2 * i + 1) * 8 + 2 * j,
        (2 * i + 1) * 8 + 2 * j + 1,
    ]


def test_target_patches_are_the_latents_under_each_token(model):
    b = collated_batch(model, "g")
    with torch.no_grad():
        out = model(b, generator=torch.Generator().manual_seed(1))
    latents = model.encode_latents(b["t2i_pixel_values"])
    p, grid = model.config.latent_patch, model.config.token_grid
    assert (p, grid) == (2, 4) and out.target_mask.all()
    row, col = 1, 3
    patch = (
        latents[0, :, row * p : (row + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(-1)
    )
    torch.testing.assert_close(out.target_patches[0, row * grid + col], patch)


# ----------------------------------------------------------------------------- training step


def test_forward_returns_every_infotok_input(model):
    out = model(collated_batch(model), generator=torch.Generator().manual_seed(0))
    d, n = model.config.llm.hidden_size, model.config.num_image_tokens
    assert torch.isfinite(out.loss_i2t) and torch.isfinite(out.loss_t2i)
    assert out.z_u.shape == out.z_g.shape == (2, n, d)
    assert out.text_u.shape == out.text_g.shape == (2, d)
    assert out.target_patches.shape == (2, n, model.infotok_dims()["latent_patch_dim"])
    assert out.answer_ids.shape == out.answer_mask.shape and out.answer_mask.dtype == torch.bool
    assert set(out.infotok_inputs()) == set(INFOTOK_INPUT_KEYS)
    assert out.num_image_tokens == 2 * n + 2 * model.config.num_queries and out.num_text_tokens > 0


def test_single_task_batches_leave_the_other_branch_empty(model):
    with torch.no_grad():
        u = model(collated_batch(model, "uu"))
        g = model(collated_batch(model, "g"))
    assert (
        u.loss_t2i is None and u.z_g is None and u.target_patches is None and u.loss_i2t is not None
    )
    assert g.loss_i2t is None and g.z_u is None and g.answer_ids is None and g.loss_t2i is not None


def test_loss_i2t_is_cross_entropy_over_the_answer_tokens(model):
    b = collated_batch(model, "uu")
    with torch.no_grad(), Capture(model.lmm.language_model.model) as llm:
        out = model(b)
    logits = model.lmm.language_model.lm_head(llm.calls[0][2].last_hidden_state)
    labels = b["i2t_labels"]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss_i2t, expected)
    answer = _encode(model, "a red circle on a blue square<|im_end|>")
    assert out.answer_ids[0][out.answer_mask[0]].tolist() == answer


def test_z_u_is_the_tensor_the_llm_consumed(model):
    b = collated_batch(model, "u")
    with torch.no_grad(), Capture(model.lmm.language_model.model) as llm:
        out = model(b)
    embeds = llm.calls[0][1]["inputs_embeds"]
    slots = b["i2t_input_ids"][0] == model.processor.ids.img_context
    torch.testing.assert_close(embeds[0, slots], out.z_u[0])
    torch.testing.assert_close(out.z_u, model.lmm.extract_feature(b["i2t_pixel_values"]))


def test_loss_t2i_is_the_openuni_flow_matching_formula_on_a_fixed_seed(model):
    b = collated_batch(model, "gg")
    with torch.no_grad(), Capture(model.transformer) as dit:
        out = model(b, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    x = model.vae.encode(b["t2i_pixel_values"]).latent * 0.41407
    noise = torch.randn(x.shape, generator=g)
    index = (torch.rand(2, generator=g) * 1000).long()
    t = (1000 - index).float()  # FlowMatchEuler (shift 1): timesteps 1000 … 1
    sigma = (t / 1000).view(-1, 1, 1, 1)
    args, kwargs, prediction = dit.calls[0]
    torch.testing.assert_close(args[0], (1 - sigma) * x + sigma * noise)
    torch.testing.assert_close(kwargs["timestep"], t)
    assert kwargs["encoder_hidden_states"].shape == (
        2,
        model.config.num_queries,
        model.config.sana.caption_channels,
    )
    torch.testing.assert_close(out.loss_t2i, ((prediction[0] - (noise - x)) ** 2).mean())


def test_z_g_is_v_enc_of_the_target_resized_for_the_vit(model):
    b = collated_batch(model, "g")
    with torch.no_grad():
        out = model(b, generator=torch.Generator().manual_seed(0))
    pixels = (b["t2i_pixel_values"] + 1) / 2
    pixels = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    vit = F.interpolate(pixels, size=(56, 56), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.z_g, model.lmm.extract_feature(vit))


def _grads(model, prefixes):
    return [p.grad for name, p in model.named_parameters() if name.startswith(prefixes)]


def test_gradients_reach_v_enc_from_understanding_and_from_z_g(model):
    """``loss_i2t`` reaches ``V_enc`` through the frozen LLM; ``z_g`` (the InfoTok g-branch) does too.

    OpenUni's own ``loss_t2i`` never reads an image through ``V_enc`` (its conditions are the
    meta queries), so it trains the generation modules and leaves ``V_enc`` untouched.
    """
    encoder = model.ENCODER_PREFIXES
    for name in ("loss_i2t", "z_g"):
        model.zero_grad()
        out = model(collated_batch(model), generator=torch.Generator().manual_seed(0))
        value = getattr(out, name)
        (value if value.ndim == 0 else value.square().mean()).backward()
        assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, encoder)), name
    model.zero_grad()
    model(collated_batch(model), generator=torch.Generator().manual_seed(0)).loss_t2i.backward()
    assert all(g is None for g in _grads(model, encoder))
    generation = ("meta_queries", "connector.", "projector.", "transformer.")
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, generation))
    assert not any(p.requires_grad for p in model.lmm.language_model.parameters())


def test_trainable_groups(tokenizer_dir):
    frozen = tiny_openuni(tokenizer_dir, trainable=[])
    names = {name for name, _ in trained_parameters(frozen)}
    assert names and all(name.startswith(("lmm.vision_model.", "lmm.mlp1.")) for name in names)
    with_llm = tiny_openuni(tokenizer_dir, trainable=["llm"])
    assert all(p.requires_grad for p in with_llm.lmm.language_model.parameters())
    assert not with_llm.meta_queries.requires_grad and not any(
        p.requires_grad for p in with_llm.vae.parameters()
    )
    with pytest.raises(ConfigError, match="trainable"):
        openuni_config("tiny", {"trainable": ["vae"]})
    with pytest.raises(ConfigError, match="connector.hidden_size"):
        openuni_config("tiny", {"connector": {"hidden_size": 32}})


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(model, tokenizer_dir):
    checkpointed = tiny_openuni(tokenizer_dir, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(model.state_dict())
    b = collated_batch(model)
    results = []
    for m in (model, checkpointed):
        m.zero_grad()
        out = m(b, generator=torch.Generator().manual_seed(0))
        (out.loss_i2t + out.loss_t2i).backward()
        results.append(
            (
                out.loss_i2t,
                out.loss_t2i,
                m.lmm.vision_model.encoder.layers[0].attn.qkv.weight.grad,
                m.transformer.transformer_blocks[0].ff.conv_point.weight.grad,
            )
        )
    for a, c in zip(*results):
        torch.testing.assert_close(a, c)


def test_infotok_dims(model):
    assert model.infotok_dims() == {
        "token_dim": 64,
        "text_dim": 64,
        "vocab_size": len(model.processor.tokenizer),
        "latent_patch_dim": 16,
    }


# ----------------------------------------------------------------- sync-free training step


def _padded_batch(model):
    """Rows of different lengths in both tasks."""
    samples = [
        i2t_sample(1),
        i2t_sample(2, "what", "a red circle"),
        t2i_sample(3, "a cat"),
        t2i_sample(4, "a photo of a very small cat on the left side"),
    ]
    return model.collate([model.processor(s) for s in samples])


def _fake_in_place(module: torch.nn.Module, mode: FakeTensorMode) -> None:
    """Replace every parameter and buffer of ``module`` by a fake twin (shared ones stay shared)."""
    twins: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                if id(p) not in twins:
                    fake = mode.from_tensor(p.detach())
                    twins[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                sub._parameters[name] = twins[id(p)]
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = twins.setdefault(id(b), mode.from_tensor(b))


@pytest.mark.parametrize("padded", [False, True])
def test_training_step_runs_on_fake_tensors(tokenizer_dir, padded):
    """No host sync and no data-dependent shape in forward + backward: fake tensors (no shape
    env) raise on ``.item()``, ``nonzero``, boolean indexing and on reading a real tensor."""
    model = tiny_openuni(tokenizer_dir, gradient_checkpointing=padded).train()
    batch = _padded_batch(model) if padded else collated_batch(model)
    assert batch["i2t_padded"] is padded
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    _fake_in_place(model, mode)
    batch = {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}
    with mode:
        out = model(batch, generator=torch.Generator().manual_seed(0))
        loss = out.loss_i2t + out.loss_t2i + out.z_u.mean() + out.z_g.mean()
        loss = loss + out.text_u.mean() + out.text_g.mean()
        loss.backward()
    assert isinstance(out.num_text_tokens, FakeTensor) and out.num_text_tokens.ndim == 0
    assert model.meta_queries.grad is not None
    assert model.lmm.vision_model.embeddings.patch_embedding.weight.grad is not None


class _NoHostReads(TorchDispatchMode):
    """Fails on the ops that read tensor values to the host or size their output by them; on
    real tensors it also sees the reads that libraries skip for fake ones."""

    READS = {
        torch.ops.aten._local_scalar_dense,
        torch.ops.aten.nonzero,
        torch.ops.aten.masked_select,
        torch.ops.aten._unique2,
        torch.ops.aten.unique_consecutive,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        boolean_index = func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put_)
        boolean_index = boolean_index and any(
            torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func.overloadpacket in self.READS or boolean_index:
            raise AssertionError(f"host read in the training step: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [False, True])
def test_training_step_reads_no_value_back_to_the_host(model, padded):
    batch = _padded_batch(model) if padded else collated_batch(model)
    model.zero_grad()
    with _NoHostReads():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        (out.loss_i2t + out.loss_t2i + out.z_u.mean() + out.z_g.mean()).backward()
    model.zero_grad()


def test_collate_counts_padding_and_answer_length_on_the_host(model):
    b = collated_batch(model, "uu")
    answers = (b["i2t_labels"] != IGNORE).sum(1)
    assert b["i2t_padded"] is False and b["i2t_max_answer"] == int(answers.max())
    b = _padded_batch(model)
    answers = (b["i2t_labels"] != IGNORE).sum(1)
    assert b["i2t_padded"] is True and b["i2t_max_answer"] == int(answers.max())
    assert answers.tolist()[0] != answers.tolist()[1]


@pytest.mark.parametrize("padded", [False, True])
def test_host_side_batch_facts_change_no_value(model, padded):
    """Without collate's ``i2t_padded`` / ``i2t_max_answer`` the step takes the safe defaults
    (materialised mask, answers as long as the rows): the same values, answers padded wider."""
    b = _padded_batch(model) if padded else collated_batch(model)
    plain = {k: v for k, v in b.items() if k not in ("i2t_padded", "i2t_max_answer")}
    with torch.no_grad():
        out = model(b, generator=torch.Generator().manual_seed(0))
        ref = model(plain, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.loss_i2t, ref.loss_i2t)
    torch.testing.assert_close(out.text_u, ref.text_u)
    width = out.answer_ids.shape[1]
    assert width == b["i2t_max_answer"] < ref.answer_ids.shape[1]
    assert torch.equal(out.answer_ids, ref.answer_ids[:, :width])
    assert torch.equal(out.answer_mask, ref.answer_mask[:, :width])
    assert not ref.answer_mask[:, width:].any()


def test_llm_runs_match_transformers_own_masking(model):
    """The prepared masks give exactly what the LLM computes from the 2-D mask itself."""
    llm = model.lmm.language_model.model
    for b in (collated_batch(model, "uu"), _padded_batch(model)):
        ids, mask = b["i2t_input_ids"], b["i2t_attention_mask"]
        with torch.no_grad():
            embeds = llm.embed_tokens(ids)
            expected = llm(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
            hidden = model._run_llm(embeds, mask if b["i2t_padded"] else None)
        assert torch.equal(hidden, expected)


def test_token_counts_are_device_tensors(model):
    b = _padded_batch(model)
    with torch.no_grad():
        out = model(b, generator=torch.Generator().manual_seed(0))
    n_u, n_g = b["i2t_attention_mask"].sum(), b["t2i_attention_mask"].sum()
    assert torch.is_tensor(out.num_text_tokens) and out.num_text_tokens.ndim == 0
    assert out.num_text_tokens.item() == n_u + n_g - 2 * model.config.num_image_tokens
    assert out.num_image_tokens == 2 * model.config.num_image_tokens + 2 * model.config.num_queries


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7])
@pytest.mark.parametrize("steps", [1000, 37])
def test_timesteps_are_the_scheduler_tables_bit_for_bit(steps, shift):
    scheduler = training_scheduler(steps, shift)
    u = (torch.arange(steps) + 0.5) / steps
    u = torch.cat([u, torch.rand(500, generator=torch.Generator().manual_seed(0))])
    index = (u * steps).long()
    with patch("torch.rand", return_value=u):
        timesteps, sigmas = sample_timesteps(scheduler, len(u), None, torch.device("cpu"))
    assert torch.equal(timesteps, scheduler.timesteps[index])
    assert torch.equal(sigmas, scheduler.sigmas[index])


def test_bounded_positions_skip_only_a_no_op_dynamic_rope_update(model):
    """Within ``positions_below`` the frequencies are the ones ``transformers`` would use, read
    with no host sync; past ``max_position_embeddings`` its own dynamic NTK update runs."""
    rotary = model.lmm.language_model.model.rotary_emb
    reference = Qwen2RotaryEmbedding(model.lmm.language_model.config)
    assert rotary.rope_type == "dynamic"
    x = torch.zeros(1, 5, 8)
    positions = torch.arange(5)[None]
    with model.lmm.positions_below(5), _NoHostReads():
        cos, sin = rotary(x, positions)
    assert rotary.bound is None
    expected = reference(x, positions)
    assert torch.equal(cos, expected[0]) and torch.equal(sin, expected[1])
    longest = rotary.original_max_seq_len
    fresh = InternVLRotaryEmbedding(model.lmm.language_model.config)
    fresh.bound = 2 * longest + 1
    far = torch.tensor([[0, 2 * longest]])
    grown = fresh(x[:, :2], far)
    expected = reference(x[:, :2], far)
    assert torch.equal(grown[0], expected[0]) and fresh.max_seq_len_cached > longest


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("openuni_tiny")
    model.save_pretrained(path)
    return path


def test_save_then_load_gives_identical_outputs(model, saved_dir):
    assert {p.name for p in saved_dir.iterdir()} == {
        "config.json",
        "internvl3",
        "sana",
        "vae",
        "openuni.pth",
    }
    internvl = json.loads((saved_dir / "internvl3" / "config.json").read_text())
    assert (
        internvl["vision_config"]["hidden_size"] == 32
        and internvl["llm_config"]["hidden_size"] == 64
    )
    assert set(torch.load(saved_dir / "openuni.pth")) == {
        k for k in model.state_dict() if k.startswith(("meta_queries", "connector.", "projector."))
    }
    loaded = OpenUni.from_pretrained(saved_dir).train()
    assert_same_outputs(model, loaded, collated_batch(model))


def test_assembles_a_released_pth_on_top_of_the_base_models(model, saved_dir, tmp_path):
    """A fine-tuned ``openuni_*.pth`` carries the DiT too; its tensors win over the SANA directory's."""
    state = {k: v.clone() for k, v in torch.load(saved_dir / "openuni.pth").items()}
    state.update(
        {k: v + 1 for k, v in model.state_dict().items() if k.startswith("transformer.proj_out.")}
    )
    released = tmp_path / "openuni_b_internvl3_1b_sana_0_6b_512_hf_blip3o60k.pth"
    torch.save(state, released)
    with pytest.raises(FileNotFoundError, match="internvl_path"):
        OpenUni.from_pretrained(released, sana_path=saved_dir / "sana", vae_path=saved_dir / "vae")
    loaded = OpenUni.from_pretrained(
        released,
        internvl_path=saved_dir / "internvl3",
        sana_path=saved_dir / "sana",
        vae_path=saved_dir / "vae",
        preset="tiny",
    )
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        shift = 1 if key.startswith("transformer.proj_out.") else 0
        assert torch.equal(value, expected[key] + shift), key


def test_base_models_alone_start_fresh_openuni_modules(model, saved_dir):
    loaded = OpenUni.from_pretrained(
        None,
        internvl_path=saved_dir / "internvl3",
        sana_path=saved_dir / "sana",
        vae_path=saved_dir / "vae",
        preset="tiny",
    )
    assert torch.equal(loaded.lmm.mlp1[1].weight, model.lmm.mlp1[1].weight)
    assert loaded.meta_queries.std().item() == pytest.approx(1 / 8, rel=0.3)
    assert torch.isfinite(loaded.connector.layers[0].mlp.fc1.weight).all()


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_checkpoint_mismatch_fails_naming_the_key(saved_dir, tmp_path, change):
    pth, internvl = tmp_path / "openuni.pth", tmp_path / "internvl3"
    internvl.mkdir()
    for item in (saved_dir / "internvl3").iterdir():
        (internvl / item.name).write_bytes(item.read_bytes())
    state = torch.load(saved_dir / "openuni.pth")
    if change == "missing":
        key, source = "connector.layers.1.mlp.fc2.bias", str(pth)
        del state[key]
    elif change == "extra":
        key, source = "connector.layers.9.mlp.fc2.bias", str(pth)
        state[key] = torch.zeros(3)
    else:
        key, source = "vision_model.encoder.layers.0.attn.qkv.weight", str(internvl)
        weights = load_file(internvl / "model.safetensors")
        weights[key] = torch.zeros(5, 5)
        save_file(weights, internvl / "model.safetensors")
    torch.save(state, pth)
    message = assert_mismatch_named(
        lambda: OpenUni.from_pretrained(
            pth,
            internvl_path=internvl,
            sana_path=saved_dir / "sana",
            vae_path=saved_dir / "vae",
            preset="tiny",
        ),
        key,
        change,
    )
    assert source in message


def test_build_model_registry(tokenizer_dir, saved_dir, monkeypatch):
    built = build_model(
        ModelConfig(family="openuni", preset="tiny", tokenizer_path=str(tokenizer_dir))
    )
    assert isinstance(built, OpenUni) and built.processor is not None
    from_path = build_model(
        ModelConfig(family="openuni", path=str(saved_dir), options={"trainable": []})
    )
    assert from_path.config.trainable == [] and not from_path.meta_queries.requires_grad
    with pytest.raises(ConfigError, match="options.sana.num_layer"):
        build_model(
            ModelConfig(family="openuni", preset="tiny", options={"sana": {"num_layer": 3}})
        )


# ----------------------------------------------------------------------------- inference


def test_generate_returns_images_of_the_configured_size(model):
    model.eval()
    with Capture(model.transformer) as dit:
        guided = model.generate(
            ["a cat", "two shapes"], num_steps=3, generator=torch.Generator().manual_seed(0)
        )
    plain = model.generate(
        ["a cat"], num_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    assert [im.size for im in guided + plain] == [(32, 32)] * 3 and all(
        im.mode == "RGB" for im in guided
    )
    assert len(dit.calls) == 3 and dit.calls[0][0][0].shape[0] == 4  # conditional and CFG halves


def test_answer_returns_one_string_per_image_and_matches_single_decoding(model):
    """Left-padded cached decoding sees what one unpadded prompt sees."""
    model.eval()
    images = [draw_image(5), draw_image(6)]
    questions = ["what is in this image", "describe the small shapes on the left"]
    with Capture(model.lmm.language_model.lm_head) as head:
        batched = model.answer(images, questions, max_new_tokens=4)
    first = head.calls[0][0][0]
    single = []
    for k, (image, question) in enumerate(zip(images, questions)):
        with Capture(model.lmm.language_model.lm_head) as head:
            single.append(model.answer([image], [question], max_new_tokens=4)[0])
        torch.testing.assert_close(first[k], head.calls[0][0][0][0], rtol=1e-4, atol=1e-5)
    model.train()
    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)
    assert batched == single
