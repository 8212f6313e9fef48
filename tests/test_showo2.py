"""Show-o2 adapter on the ``tiny`` preset: same classes as the released model, tiny dims, CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from model_helpers import (
    trained_parameters,
    assert_mismatch_named,
    assert_same_outputs,
    break_checkpoint,
    collated_batch,
    copy_checkpoint,
    draw_image,
    fill_zeroed,
    i2t_sample,
    t2i_sample,
)
from pipeline.config import ConfigError
from pipeline.models import ModelConfig, build_model
from pipeline.models.base import INFOTOK_INPUT_KEYS
from pipeline.models.showo2.model import Showo2, omni_attention_mask
from pipeline.models.showo2.config import showo2_config
from pipeline.models.showo2.flow import velocity_latents, velocity_rows
from pipeline.models.common.text import IGNORE, answer_tokens
from pipeline.models.showo2.processor import load_tokenizer


def _tiny(tokenizer_dir, **options) -> Showo2:
    torch.manual_seed(0)
    model = Showo2(showo2_config("tiny", options), load_tokenizer(tokenizer_dir))
    # The official init zeroes the flow head's output and adaLN layers (a trained head is not zero);
    # give them values so that gradients and velocities are informative.
    return fill_zeroed(model, "diffusion_head", std=0.02)


@pytest.fixture(scope="module")
def model(tokenizer_dir) -> Showo2:
    return _tiny(tokenizer_dir).train()


def _capture(module, store, key, output=True):
    def hook(_, args, out):
        store[key] = out if output else args

    return module.register_forward_hook(hook)


# ----------------------------------------------------------------------------- processor


def test_i2t_sequence_layout(model):
    proc, n = model.processor, model.config.num_image_tokens
    sample = proc(i2t_sample(0, question="describe", answer="two shapes"))
    ids, labels, offset = sample["input_ids"].tolist(), sample["labels"], sample["image_offset"]
    assert ids[0] == proc.ids.bos
    assert ids[offset - 1] == proc.ids.boi and ids[offset + n + 1] == proc.ids.eoi
    assert ids[offset : offset + n + 1] == [proc.ids.image_pad] * (n + 1)
    answer = proc.tokenizer("two shapes<|im_end|>", add_special_tokens=False)["input_ids"]
    assert labels[labels != IGNORE].tolist() == answer and ids[-len(answer) :] == answer
    decoded = proc.tokenizer.decode(ids[: offset - 1])
    assert (
        decoded == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    text = sample["text_mask"]
    assert (
        not text[offset - 1 : offset + n + 2].any() and text[0] and not text[labels != IGNORE].any()
    )
    assert sample["pixel_values"].shape == (3, 64, 64)


def test_t2i_sequence_layout_and_stateless_prompt_dropout(model):
    proc, n = model.processor, model.config.num_image_tokens
    sample = proc(t2i_sample(0, prompt="a cat"))
    prompt = proc.tokenizer("a cat", add_special_tokens=False)["input_ids"]
    ids = sample["input_ids"].tolist()
    image = [proc.ids.boi] + [proc.ids.image_pad] * (n + 1) + [proc.ids.eoi]
    assert ids == [proc.ids.bos] + prompt + image + [proc.ids.eos]
    assert sample["image_offset"] == len(prompt) + 2 and (sample["labels"] == IGNORE).all()
    assert sample["text_mask"].sum() == len(prompt) + 1
    dropped = [len(proc(t2i_sample(i))["input_ids"]) == n + 5 for i in range(400)]
    assert dropped == [len(proc(t2i_sample(i))["input_ids"]) == n + 5 for i in range(400)]
    assert 0.05 < sum(dropped) / len(dropped) < 0.15


def test_processor_rejects_bad_samples(model):
    bad = i2t_sample(0)
    bad["messages"][0]["content"] = "no image here"
    with pytest.raises(ValueError, match="exactly one <image>"):
        model.processor(bad)
    with pytest.raises(ValueError, match="task"):
        model.processor({"task": "x"})


# ----------------------------------------------------------------------------- attention mask


def test_attention_mask_causal_on_text_full_inside_image():
    mask = omni_attention_mask(10, torch.tensor([3]), 4, torch.float32)[0, 0] == 0
    expected = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    expected[3:7, 3:7] = True
    assert torch.equal(mask, expected)


def test_llm_attends_bidirectionally_inside_the_image_only(model):
    batch = collated_batch(model, "g")
    ids, offsets = batch["input_ids"], batch["image_offset"]
    n, start = model.config.num_image_tokens, int(offsets[0])
    tokens = torch.randn(1, n, model.config.llm.hidden_size)
    changed = tokens.clone()
    changed[0, -1] += 1.0  # the last visual token
    with torch.no_grad():
        before = model._run_llm(ids, offsets, tokens, torch.ones(1))[0]
        after = model._run_llm(ids, offsets, changed, torch.ones(1))[0]
    moved = (before - after).abs().amax(-1)[0] > 1e-6
    assert not moved[:start].any()  # text before the image is causal
    assert moved[start : start + n + 1].all()  # every slot of the image sees its last token
    assert moved[start + n + 1 :].all()  # text after the image sees it


# ----------------------------------------------------------------------------- training step


def test_forward_backward_both_branches(model):
    batch = collated_batch(model)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    d, n = model.config.llm.hidden_size, model.config.num_image_tokens
    assert math.isfinite(out.loss_i2t.item()) and math.isfinite(out.loss_t2i.item())
    assert out.z_u.shape == out.z_g.shape == (2, n, d)
    assert out.text_u.shape == out.text_g.shape == (2, d)
    assert (
        out.target_patches.shape == (2, n, model.infotok_dims()["latent_patch_dim"])
        and out.target_mask.all()
    )
    assert out.answer_ids.shape == out.answer_mask.shape and out.answer_mask.dtype == torch.bool
    assert set(out.infotok_inputs()) == set(INFOTOK_INPUT_KEYS)
    assert out.num_image_tokens == 4 * n and out.num_text_tokens > 0
    model.zero_grad()
    (out.loss_i2t + out.loss_t2i).backward()
    assert all(
        p.grad is not None
        for name, p in trained_parameters(model)
        if not name.startswith("showo.lm_head")
    )


def test_single_branch_batches_leave_the_other_branch_empty(model):
    with torch.no_grad():
        u = model(collated_batch(model, "uu"))
        g = model(collated_batch(model, "g"))
    assert (
        u.loss_t2i is None and u.z_g is None and u.target_patches is None and u.loss_i2t is not None
    )
    assert g.loss_i2t is None and g.z_u is None and g.answer_ids is None and g.loss_t2i is not None


def test_loss_i2t_is_cross_entropy_over_the_answer_tokens(model):
    batch = collated_batch(model, "uu")
    store = {}
    handle = _capture(model.showo.model, store, "llm")
    with torch.no_grad():
        out = model(batch)
    handle.remove()
    logits = model.showo.lm_head(store["llm"].last_hidden_state)
    labels = batch["labels"]
    vocab = logits.shape[-1]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss_i2t, expected)
    answer = model.processor.tokenizer(
        "a red circle on a blue square<|im_end|>", add_special_tokens=False
    )["input_ids"]
    assert out.answer_ids[0][out.answer_mask[0]].tolist() == answer


def test_batches_carry_task_rows_and_the_answer_bound_the_step_reads_without_a_sync(model):
    """The counts a training step needs are shapes or host ints from collate, never values it
    would read back from the device."""
    samples = [
        i2t_sample(0, answer="yes"),
        t2i_sample(1),
        i2t_sample(2, answer="a red circle on a blue square and a green line"),
        t2i_sample(3),
    ]
    batch = model.collate([model.processor(s) for s in samples])
    assert batch["und_index"].tolist() == [0, 2] and batch["gen_index"].tolist() == [1, 3]
    n = model.config.num_image_tokens
    labels = batch["labels"][[0, 2]]
    ids, mask = answer_tokens(labels)  # padded to the longest answer
    assert batch["max_answer"] == ids.shape[1] == int((labels != IGNORE).sum(1).max())
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(0))
        bound = dict(batch)
        del bound["max_answer"]  # without it: every position after the image block
        shaped = model(bound, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.answer_ids, ids) and torch.equal(out.answer_mask, mask)
    assert shaped.answer_ids.shape[1] == labels.shape[1] - n - 4 > ids.shape[1]
    assert torch.equal(shaped.answer_ids[:, : ids.shape[1]], ids)
    assert not shaped.answer_mask[:, ids.shape[1] :].any()
    torch.testing.assert_close(shaped.loss_i2t, out.loss_i2t)
    assert out.num_text_tokens.shape == () and out.num_text_tokens.dtype == torch.int64
    assert out.num_text_tokens == batch["lengths"].sum() - 4 * (n + 1)


def _official_rows(u, p):
    """The released target layout: the raster-flattened latent cut into runs of p*p positions."""
    return u.flatten(2).transpose(1, 2).reshape(len(u), -1, p * p * u.shape[1])


def _patch_rows(u, p):
    """Row n holds the p x p patch under visual token n, raster inside the patch, channels last."""
    rows = [
        u[i, :, r * p : (r + 1) * p, c * p : (c + 1) * p].permute(1, 2, 0).reshape(-1)
        for i in range(len(u))
        for r in range(u.shape[2] // p)
        for c in range(u.shape[3] // p)
    ]
    return torch.stack(rows).reshape(len(u), -1, p * p * u.shape[1])


@pytest.mark.parametrize(
    "layout, rows, prediction, shift",
    [
        ("official", _official_rows, "velocity", None),
        ("patch", _patch_rows, "velocity", None),
        ("patch", _patch_rows, "data", 3.0),
    ],
)
def test_loss_t2i_is_the_flow_matching_formula_on_a_fixed_seed(
    tokenizer_dir, layout, rows, prediction, shift
):
    model = _tiny(
        tokenizer_dir, flow_layout=layout, flow_prediction=prediction, train_time_shift=shift
    ).train()
    batch = collated_batch(model, "gg")
    store = {}
    handles = [
        _capture(model.diffusion_head_b, store, "v"),
        _capture(model.image_embedder_gen, store, "x", output=False),
    ]
    out = model(batch, generator=torch.Generator().manual_seed(7))
    for handle in handles:
        handle.remove()
    g = torch.Generator().manual_seed(7)
    x1 = model.encode_latents(batch["pixel_values"], sample=True, generator=g)
    x0 = torch.randn(x1.shape, generator=g)
    n, p = model.config.num_image_tokens, model.config.patch_size
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (
        n + 1 - 256
    )  # null: the official shift for n + 1 tokens
    odds = math.exp(mu) if shift is None else shift
    t = torch.sigmoid(torch.randn(2, generator=g))
    t = 1 - odds / (odds + (1 / (1 - t) - 1))
    xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    torch.testing.assert_close(store["x"][0][:2], xt)
    u = rows(x1 - x0, p)
    offsets = batch["image_offset"]
    v = torch.stack([store["v"][i, o + 1 : o + 1 + n] for i, o in enumerate(offsets.tolist())])
    if prediction == "data":
        v = (v - rows(xt, p)) / (1 - t).clamp(min=0.05).view(-1, 1, 1)
    torch.testing.assert_close(out.loss_t2i, ((v - u) ** 2).mean())


@pytest.mark.parametrize("layout", ["official", "patch"])
def test_velocity_layouts_round_trip(layout):
    latents = torch.randn(2, 3, 8, 8)
    rows = velocity_rows(latents, 2, layout)
    assert rows.shape == (2, 16, 12)
    torch.testing.assert_close(velocity_latents(rows, 3, 8, 2, layout), latents)


def test_the_tiny_preset_predicts_the_patch_under_each_token_and_released_sizes_the_official_rows():
    assert (
        showo2_config("tiny").flow_layout == "patch"
        and showo2_config("tiny").train_time_shift == 3.0
    )
    assert showo2_config("1.5b").train_time_shift is None
    assert showo2_config("1.5b").flow_layout == "official"
    assert showo2_config("7b").flow_layout == "official"


def test_target_patches_are_the_patches_under_each_token(model):
    with torch.no_grad():
        out = model(collated_batch(model, "g"), generator=torch.Generator().manual_seed(1))
    latents = model.encode_latents(
        collated_batch(model, "g")["pixel_values"],
        sample=True,
        generator=torch.Generator().manual_seed(1),
    )
    p, grid = model.config.patch_size, model.config.grid_size
    row, col = 1, 2
    patch = (
        latents[0, :, row * p : (row + 1) * p, col * p : (col + 1) * p].permute(1, 2, 0).reshape(-1)
    )
    torch.testing.assert_close(out.target_patches[0, row * grid + col], patch)


def test_z_u_is_the_tensor_the_llm_consumed(model):
    batch = collated_batch(model, "u")
    store = {}
    handle = _capture(model.showo.model.embed_tokens, store, "embeds")
    embeds_seen = {}

    def pre_hook(_, args, kwargs):
        embeds_seen["x"] = kwargs["inputs_embeds"]

    pre = model.showo.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    with torch.no_grad():
        out = model(batch)
    handle.remove()
    pre.remove()
    start, n = int(batch["image_offset"][0]), model.config.num_image_tokens
    torch.testing.assert_close(embeds_seen["x"][0, start + 1 : start + 1 + n], out.z_u[0])


def test_gradients_reach_the_shared_tokenizer_from_both_losses(model):
    encoder = [p for name, p in model.named_parameters() if name.startswith(model.ENCODER_PREFIXES)]
    for loss_name in ("loss_i2t", "loss_t2i"):
        model.zero_grad()
        out = model(collated_batch(model), generator=torch.Generator().manual_seed(0))
        getattr(out, loss_name).backward()
        for prefix in model.ENCODER_PREFIXES:
            grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
            assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), (loss_name, prefix)
    assert all(p.requires_grad for p in encoder)


def test_trainable_groups(tokenizer_dir):
    frozen = Showo2(showo2_config("tiny", {"trainable": []}), load_tokenizer(tokenizer_dir))
    names = {name for name, _ in trained_parameters(frozen)}
    assert names and all(name.startswith(frozen.ENCODER_PREFIXES) for name in names)
    assert not any(p.requires_grad for p in frozen.vae.parameters())
    with pytest.raises(ConfigError, match="trainable"):
        showo2_config("tiny", {"trainable": ["vae"]})


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(model, tokenizer_dir):
    checkpointed = _tiny(tokenizer_dir, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(model.state_dict())
    batch = collated_batch(model)
    grads = []
    for m in (model, checkpointed):
        m.zero_grad()
        out = m(batch, generator=torch.Generator().manual_seed(0))
        (out.loss_i2t + out.loss_t2i).backward()
        grads.append(
            (
                out.loss_i2t.item(),
                out.loss_t2i.item(),
                m.und_trans.layers[0].mlp.fc1.weight.grad.clone(),
                m.diffusion_head_a[0].mlp.up_proj.weight.grad.clone(),
            )
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_other_resolutions_resize_the_siglip_position_grid(tokenizer_dir):
    """32 px → 4×4 tokens from the 8×8 position table (released HQ models run 64×64 from 27×27)."""
    small = _tiny(tokenizer_dir, image_size=32).train()
    with torch.no_grad():
        out = small(collated_batch(small, "ug"), generator=torch.Generator().manual_seed(0))
    assert out.z_u.shape[1] == out.z_g.shape[1] == 16 and math.isfinite(out.loss_t2i.item())


def test_infotok_dims(model):
    assert model.infotok_dims() == {
        "token_dim": 64,
        "text_dim": 64,
        "vocab_size": len(model.processor.tokenizer),
        "latent_patch_dim": 64,
    }


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("showo2_tiny")
    model.save_pretrained(path)
    return path


def test_save_then_load_gives_identical_outputs(model, saved_dir):
    loaded = Showo2.from_pretrained(saved_dir).train()
    assert_same_outputs(model, loaded, collated_batch(model))
    assert loaded.showo.lm_head.weight is loaded.showo.model.embed_tokens.weight


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_checkpoint_mismatch_fails_naming_the_key(saved_dir, tmp_path, change):
    target = copy_checkpoint(saved_dir, tmp_path)
    key = break_checkpoint(
        target, change, "diffusion_head_a.0.self_attn.q_norm.weight", "fusion_proj.9.weight"
    )
    assert_mismatch_named(
        lambda: Showo2.from_pretrained(target, vae_path=saved_dir / "vae"), key, change
    )


def test_loads_the_released_layout(model, saved_dir, tmp_path):
    """Official ``config.json`` fields, sharded ``pytorch_model*.bin`` with the tied lm_head;
    the tokenizer and the VAE in other directories."""
    released = tmp_path / "released"
    released.mkdir()
    config = json.loads((saved_dir / "config.json").read_text())
    config.pop("_infotok_adapter")
    (released / "config.json").write_text(json.dumps(config))
    state = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[::2],
        "pytorch_model-00002-of-00002.bin": keys[1::2],
    }
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, released / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (released / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        Showo2.from_pretrained(released, vae_path=saved_dir / "vae", preset="tiny")
    loaded = Showo2.from_pretrained(
        released, tokenizer_path=saved_dir, vae_path=saved_dir / "vae", preset="tiny"
    )
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_build_model_registry(tokenizer_dir, saved_dir):
    built = build_model(
        ModelConfig(family="showo2", preset="tiny", tokenizer_path=str(tokenizer_dir))
    )
    assert isinstance(built, Showo2) and built.processor is not None
    from_path = build_model(
        ModelConfig(family="showo2", path=str(saved_dir), options={"trainable": []})
    )
    assert from_path.config.trainable == []
    with pytest.raises(ConfigError, match="unknown family 'nope'"):
        build_model(ModelConfig(family="nope"))
    with pytest.raises(ConfigError, match="options.llm.hidden_sise"):
        build_model(
            ModelConfig(
                preset="tiny",
                options={"llm": {"hidden_sise": 3}},
                tokenizer_path=str(tokenizer_dir),
            )
        )
    with pytest.raises(ConfigError, match="vae.latents_mean has 16 entries; vae.z_dim is 8"):
        build_model(
            ModelConfig(
                preset="tiny", options={"vae": {"z_dim": 8}}, tokenizer_path=str(tokenizer_dir)
            )
        )


# ----------------------------------------------------------------------------- inference


def test_generate_returns_images_of_the_configured_size(model):
    model.eval()
    images = model.generate(
        ["a cat", "two shapes"], num_steps=3, generator=torch.Generator().manual_seed(0)
    )
    plain = model.generate(
        ["a cat"], num_steps=3, guidance_scale=0.0, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    assert [im.size for im in images + plain] == [(64, 64)] * 3
    assert all(im.mode == "RGB" for im in images)


@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_a_data_predicting_head_steers_the_sampler_onto_its_prediction(
    tokenizer_dir, monkeypatch, scale
):
    """x1 = (t_next − t)/(1 − t) blends toward the head's clean latent; the last step lands on it."""
    model = _tiny(tokenizer_dir, flow_prediction="data").eval()
    clean_row = torch.randn(
        model.config.latent_patch_dim, generator=torch.Generator().manual_seed(3)
    )
    model.diffusion_head_b.register_forward_hook(
        lambda _, args, out: clean_row.expand_as(out).clone()
    )
    decoded = []
    monkeypatch.setattr(
        model, "decode_latents", lambda z: decoded.append(z) or torch.zeros(len(z), 3, 64, 64)
    )
    model.generate(
        ["a cat", "two shapes"],
        num_steps=4,
        guidance_scale=scale,
        generator=torch.Generator().manual_seed(0),
    )
    p, size = model.config.patch_size, model.config.latent_size
    expected = clean_row.reshape(p, p, -1).permute(2, 0, 1).repeat(1, size // p, size // p)
    torch.testing.assert_close(decoded[0], expected.expand(2, -1, -1, -1))


def test_answer_returns_one_string_per_image_and_matches_the_training_path(model):
    """Left-padded, cached decoding sees what the training forward sees for the same prompt."""
    model.eval()
    images = [draw_image(5), draw_image(6)]
    questions = ["what is in this image", "describe the small shapes on the left"]
    seen = []
    handle = model.showo.lm_head.register_forward_hook(lambda _, args, out: seen.append(args[0]))
    batched = model.answer(images, questions, max_new_tokens=4)
    first_batched = seen[0]
    single = []
    for image, question in zip(images, questions):
        seen.clear()
        single.append(model.answer([image], [question], max_new_tokens=4)[0])
        torch.testing.assert_close(first_batched[len(single) - 1], seen[0][0], rtol=1e-4, atol=1e-5)
    handle.remove()
    sample = model.processor.i2t_sequence([{"role": "user", "content": f"<image>\n{questions[1]}"}])
    pixels = model.processor(
        {
            "task": "i2t",
            "image": images[1],
            "messages": [{"role": "user", "content": f"<image>\n{questions[1]}"}],
        }
    )["pixel_values"][None]
    with torch.no_grad():
        tokens = model.encode_shared_tokens(model.encode_latents(pixels, sample=False))
        offsets = torch.tensor([sample["image_offset"]])
        hidden = model._run_llm(sample["input_ids"][None], offsets, tokens, torch.ones(1))[0]
    model.train()
    torch.testing.assert_close(first_batched[1], hidden[0, -1], rtol=1e-4, atol=1e-5)
    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)
    assert batched == single
