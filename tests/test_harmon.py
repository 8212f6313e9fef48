"""Harmon adapter on the ``tiny`` preset: same classes as the released model, tiny dims, CPU."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from harmon_helpers import ldm_state
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
from pipeline.models.harmon.model import Harmon, causal_mask
from pipeline.models.harmon.config import harmon_config
from pipeline.models.harmon.diffloss import DiffLoss, cosine_betas
from pipeline.models.harmon.mar import max_kept, random_orders, sample_mask_ratio, training_mask
from pipeline.models.common.text import IGNORE
from pipeline.models.harmon.processor import load_tokenizer
from pipeline.models.common.weights import CheckpointMismatchError

NO_DROPOUT = {"mar": {"attn_dropout": 0.0, "proj_dropout": 0.0}}


def _tiny(tokenizer_dir, **options) -> Harmon:
    torch.manual_seed(0)
    model = Harmon(harmon_config("tiny", options), load_tokenizer(tokenizer_dir))
    # The official init zeroes the diffusion MLP's adaLN and output layers (a trained head is not
    # zero); give them values so that gradients and samples are informative.
    return fill_zeroed(model, "mar.diffloss", std=0.1)


@pytest.fixture(scope="module")
def model(tokenizer_dir) -> Harmon:
    return _tiny(tokenizer_dir, **NO_DROPOUT).train()


def _capture_kwargs(module, store):
    return module.register_forward_pre_hook(
        lambda _, args, kwargs: store.append(kwargs), with_kwargs=True
    )


# ----------------------------------------------------------------------------- processor


def test_i2t_sequence_layout(model):
    proc, slots = model.processor, model.config.num_llm_image_tokens
    sample = proc(i2t_sample(0, question="describe", answer="two shapes"))
    ids, labels, offset = sample["input_ids"].tolist(), sample["labels"], sample["image_offset"]
    encode = lambda text: proc.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer = encode("two shapes<|im_end|>")
    expected = (
        encode("<|im_start|>user\n")
        + [proc.ids.pad] * slots
        + encode("\ndescribe<|im_end|>\n<|im_start|>assistant\n")
        + answer
        + encode("\n")
    )
    assert ids == expected and offset == len(encode("<|im_start|>user\n"))
    assert labels[labels != IGNORE].tolist() == answer and labels[-1] == IGNORE
    text = sample["text_mask"]
    assert (
        not text[offset : offset + slots].any()
        and text[:offset].all()
        and not text[labels != IGNORE].any()
    )
    assert sample["pixel_values"].shape == (3, 64, 64)
    # 80x64 drawing padded to 80x80 with grey (127) rows at top and bottom, then resized.
    assert torch.allclose(
        sample["pixel_values"][:, 0, 0], torch.full((3,), 127 / 255 * 2 - 1), atol=0.02
    )


def test_t2i_sequence_and_stateless_prompt_dropout(model):
    proc = model.processor
    sample = proc(t2i_sample(0, prompt="  a cat "))
    template = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    encode = lambda text: proc.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    dropped_ids = encode(template.format("Generate an image."))
    assert sample["input_ids"].tolist() in (
        encode(template.format("Generate an image: a cat")),
        dropped_ids,
    )
    dropped = [proc(t2i_sample(i))["input_ids"].tolist() == dropped_ids for i in range(400)]
    assert dropped == [proc(t2i_sample(i))["input_ids"].tolist() == dropped_ids for i in range(400)]
    assert 0.05 < sum(dropped) / len(dropped) < 0.15
    assert sample["pixel_values"].shape == (3, 64, 64) and set(sample) == {
        "task",
        "input_ids",
        "pixel_values",
    }


def test_processor_rejects_bad_samples(model):
    bad = i2t_sample(0)
    bad["messages"][0]["content"] = "no image here"
    with pytest.raises(ValueError, match="exactly one <image>"):
        model.processor(bad)
    with pytest.raises(ValueError, match="task"):
        model.processor({"task": "x"})


def test_collate_splits_the_branches(model):
    batch = collated_batch(model, "ugg")
    assert batch["u_input_ids"].shape[0] == 1 and batch["g_input_ids"].shape[0] == 2
    assert batch["g_attention_mask"].dtype == torch.bool and batch["u_pixel_values"].shape == (
        1,
        3,
        64,
        64,
    )
    assert not any(key.startswith("u_") for key in collated_batch(model, "g"))


# ----------------------------------------------------------------------------- pieces


def test_causal_mask_over_valid_keys():
    valid = torch.tensor([[True, True, False, True, True]])
    allowed = causal_mask(valid, 2, torch.float32)[0, 0] == 0
    assert allowed.tolist() == [[True, True, False, True, False], [True, True, False, True, True]]


def test_mask_ratio_is_the_truncated_normal():
    g = torch.Generator().manual_seed(0)
    ratios = np.array([sample_mask_ratio(0.7, g, torch.device("cpu")) for _ in range(20000)])
    normal = NormalDist()
    alpha = (0.7 - 1) / 0.25
    mean = 1 + 0.25 * (normal.pdf(alpha) - normal.pdf(0)) / (0.5 - normal.cdf(alpha))
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    assert abs(ratios.mean() - mean) < 0.003
    assert (
        abs(np.median(ratios) - (1 + 0.25 * normal.inv_cdf((normal.cdf(alpha) + 0.5) / 2))) < 0.005
    )


def test_position_tables_resize_bilinearly(model):
    """The tiny tables cover 4x4 tokens (like the released 16x16 for 256 px) and serve an 8x8 grid."""
    mar = model.mar
    table = mar.encoder_pos_embed_learned
    buffers, image = table[:, :4], table[:, 4:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(image, size=(8, 8), mode="bilinear", align_corners=False)
        .flatten(2)
        .transpose(1, 2)
    )
    torch.testing.assert_close(
        mar._positions(table, (8, 8), buffers=True), torch.cat([buffers, expected], 1)
    )
    torch.testing.assert_close(mar._positions(table, (4, 4), buffers=True), table)


# ----------------------------------------------------------------------------- training step


def test_forward_backward_both_branches(model):
    out = model(collated_batch(model), generator=torch.Generator().manual_seed(0))
    d, n, slots = (
        model.config.llm.hidden_size,
        model.config.num_image_tokens,
        model.config.num_llm_image_tokens,
    )
    assert math.isfinite(out.loss_i2t.item()) and math.isfinite(out.loss_t2i.item())
    assert out.z_u.shape == out.z_g.shape == (2, slots, d)
    assert out.text_u.shape == out.text_g.shape == (2, d)
    assert out.target_patches.shape == (2, slots, 16) and out.target_mask.shape == (2, slots)
    assert (
        out.target_mask[:, :n].all()
        and not out.target_mask[:, n:].any()
        and not out.target_patches[:, n:].any()
    )
    assert out.answer_ids.shape == out.answer_mask.shape and out.answer_mask.dtype == torch.bool
    assert set(out.infotok_inputs()) == set(INFOTOK_INPUT_KEYS)
    assert out.num_image_tokens >= 2 * slots and out.num_text_tokens > 0
    model.zero_grad()
    (out.loss_i2t + out.loss_t2i).backward()
    missing = [name for name, p in trained_parameters(model) if p.grad is None]
    assert missing == []
    assert not model.mar.class_emb.weight.requires_grad


def test_single_branch_batches_leave_the_other_branch_empty(model):
    with torch.no_grad():
        u = model(collated_batch(model, "uu"))
        g = model(collated_batch(model, "g"), generator=torch.Generator().manual_seed(0))
    assert (
        u.loss_t2i is None and u.z_g is None and u.target_patches is None and u.loss_i2t is not None
    )
    assert g.loss_i2t is None and g.z_u is None and g.answer_ids is None and g.loss_t2i is not None


def test_loss_i2t_is_cross_entropy_over_the_answer_tokens(model):
    batch = collated_batch(model, "uu")
    store = []
    handle = model.llm.model.register_forward_hook(
        lambda _, args, out: store.append(out.last_hidden_state)
    )
    with torch.no_grad():
        out = model(batch)
    handle.remove()
    logits = model.llm.lm_head(store[0])
    labels = batch["u_labels"]
    vocab = logits.shape[-1]
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss_i2t, expected)
    answer = model.processor.tokenizer(
        "a red circle on a blue square<|im_end|>", add_special_tokens=False
    )["input_ids"]
    assert out.answer_ids[0][out.answer_mask[0]].tolist() == answer


def reference_token_losses(net, x0, cond, t, noise):
    """Improved-DDPM loss with learned-range variance (cosine schedule, 1000 steps), from the formulas."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    c1, c2 = betas * np.sqrt(ac_prev) / (1 - ac), (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)
    col = lambda a: torch.from_numpy(a)[t].float()[:, None]  # noqa: E731
    xt = col(np.sqrt(ac)) * x0 + col(np.sqrt(1 - ac)) * noise
    eps, v = net(xt, t, cond).float().chunk(2, dim=1)
    mse = ((noise - eps) ** 2).mean(1)
    logvar = (v + 1) / 2 * col(np.log(betas)) + (1 - v) / 2 * col(post_logvar)
    mean = col(c1) * (col(np.sqrt(1 / ac)) * xt - col(np.sqrt(1 / ac - 1)) * eps) + col(c2) * xt
    true_mean, true_logvar = col(c1) * x0 + col(c2) * xt, col(post_logvar)
    kl = 0.5 * (
        -1
        + logvar
        - true_logvar
        + torch.exp(true_logvar - logvar)
        + (true_mean - mean) ** 2 * torch.exp(-logvar)
    )
    phi = lambda y: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))  # noqa: E731
    inv_std = torch.exp(-0.5 * logvar)
    upper, lower = phi(inv_std * (x0 - mean + 1 / 255)), phi(inv_std * (x0 - mean - 1 / 255))
    log_p = torch.where(
        x0 < -0.999,
        torch.log(upper.clamp(min=1e-12)),
        torch.where(
            x0 > 0.999,
            torch.log((1 - lower).clamp(min=1e-12)),
            torch.log((upper - lower).clamp(min=1e-12)),
        ),
    )
    vb = torch.where(t == 0, -log_p.mean(1), kl.mean(1)) / math.log(2)
    return mse + vb


def test_diffusion_token_losses_match_the_formulas_at_every_timestep(model):
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 0, 1, 2, 500, 998, 999, 37])
    x0, noise = torch.randn(8, 16, generator=g) * 0.8, torch.randn(8, 16, generator=g)
    cond = torch.randn(8, model.config.mar.decoder_embed_dim, generator=g)
    diffloss = model.mar.diffloss
    with torch.no_grad():
        torch.testing.assert_close(
            diffloss.token_losses(x0, cond, t, noise),
            reference_token_losses(diffloss.net, x0, cond, t, noise),
            rtol=2e-5,
            atol=2e-5,
        )


class GaussianOracle(torch.nn.Module):
    """The exact E[ε | x_t] for data x0 ~ N(mean, std²), and the posterior variance (``var_values`` = −1)."""

    def __init__(self, mean: float, std: float, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.var, self.alphas_cumprod = mean, std**2, alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod[t][:, None].float()
        eps = (1 - ac).sqrt() * (x - ac.sqrt() * self.mean) / (ac * self.var + 1 - ac)
        return torch.cat([eps, -torch.ones_like(eps)], dim=1)


@pytest.mark.parametrize("steps", [100, 1000])
def test_the_sampler_draws_the_data_distribution_given_the_exact_noise_prediction(steps):
    """Ancestral sampling over the respaced cosine schedule, fed the exact ε of a Gaussian, returns that Gaussian."""
    head = DiffLoss(16, 8, harmon_config("tiny", {"mar": {"num_sampling_steps": steps}}).mar)
    head.net = GaussianOracle(0.5, 0.8, torch.cumprod(1 - cosine_betas(1000), 0))
    x = head.sample(torch.zeros(4000, 8), generator=torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - 0.5) < 0.04 and abs(x.std().item() - 0.8) < 0.04, (
        x.mean(),
        x.std(),
    )


def test_loss_t2i_is_the_masked_diffusion_formula_on_a_fixed_seed(model):
    batch = collated_batch(model, "gg")
    seen, llm_inputs = [], []
    hooks = [
        model.mar.diffloss.register_forward_pre_hook(lambda _, args: seen.append(args)),
        _capture_kwargs(model.llm.model, llm_inputs),
    ]
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(7))
    for hook in hooks:
        hook.remove()
    _, cond, mask_seen, _ = seen[0]
    b, n, mul = 2, model.config.num_image_tokens, model.config.mar.diffusion_batch_mul
    g = torch.Generator().manual_seed(7)
    normal = NormalDist()
    low = normal.cdf((0.7 - 1) / 0.25)
    ratio = 1 + 0.25 * normal.inv_cdf(
        low + float(torch.rand((), generator=g, dtype=torch.float64)) * (0.5 - low)
    )
    orders = torch.rand(b, n, generator=g).argsort(dim=1)
    mask = torch.zeros(b, n, dtype=torch.bool).scatter(1, orders[:, : math.ceil(n * ratio)], True)
    assert torch.equal(mask_seen, mask.reshape(-1))
    t = torch.randint(0, 1000, (mul * b * n,), generator=g)
    noise = torch.randn(mul * b * n, 16, generator=g)
    tokens = model.encode_latents(batch["g_pixel_values"]).reshape(b * n, 16)
    with torch.no_grad():
        losses = reference_token_losses(
            model.mar.diffloss.net, tokens.repeat(mul, 1), cond.repeat(mul, 1), t, noise
        )
    weights = mask.reshape(-1).float().repeat(mul)
    torch.testing.assert_close(
        out.loss_t2i, (losses * weights).sum() / weights.sum(), rtol=2e-5, atol=2e-5
    )


def test_visual_tokens_put_the_buffers_last(model):
    tokens = torch.randn(2, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    with torch.no_grad():
        features, z = model.encode_shared_tokens(tokens, mask, (4, 4))
        torch.testing.assert_close(z[:, -4:], model.proj_in(features[:, :4]))
        torch.testing.assert_close(z[:, :-4], model.proj_in(features[:, 4:]))


def test_z_u_is_the_tensor_the_llm_consumed_and_z_g_the_clean_encoding(model):
    batch = collated_batch(model, "ug")
    llm_inputs = []
    hook = _capture_kwargs(model.llm.model, llm_inputs)
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(1))
    hook.remove()
    start, slots = int(batch["u_image_offset"][0]), model.config.num_llm_image_tokens
    torch.testing.assert_close(llm_inputs[0]["inputs_embeds"][0, start : start + slots], out.z_u[0])
    with torch.no_grad():
        tokens = model.encode_latents(batch["g_pixel_values"])
        _, clean = model.encode_shared_tokens(tokens, torch.zeros(1, 64, dtype=torch.bool), (8, 8))
    torch.testing.assert_close(out.z_g, clean)
    # Row n of the targets is the latent under token n (raster order; patch size 1).
    latents = model.vae.encode(batch["g_pixel_values"]).latent_dist.mode() * 0.2325
    row, col = 1, 2
    torch.testing.assert_close(out.target_patches[0, row * 8 + col], latents[0, :, row, col])


def test_gradients_reach_the_shared_encoder_from_both_losses(model):
    # Seed 1 masks 12 of the 16 tokens (seed 0 masks all: then z_proj gets no T2I gradient).
    for loss_name in ("loss_i2t", "loss_t2i"):
        model.zero_grad()
        out = model(collated_batch(model), generator=torch.Generator().manual_seed(1))
        getattr(out, loss_name).backward()
        for prefix in model.ENCODER_PREFIXES:
            grads = [p.grad for name, p in model.named_parameters() if name.startswith(prefix)]
            assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads), (
                loss_name,
                prefix,
            )


def test_i2t_gradient_into_the_visual_features_is_scaled(model, tokenizer_dir):
    unscaled = _tiny(tokenizer_dir, grad_scale=1.0, **NO_DROPOUT).train()
    unscaled.load_state_dict(model.state_dict())
    batch = collated_batch(model, "uu")
    grads = []
    for m in (model, unscaled):
        m.zero_grad()
        m(batch).loss_i2t.backward()
        grads.append(
            (
                m.proj_in[0].weight.grad.clone(),
                m.mar.z_proj.weight.grad.clone(),
                m.llm.model.layers[0].mlp.up_proj.weight.grad.clone(),
            )
        )
    torch.testing.assert_close(grads[0][0], 0.1 * grads[1][0])
    torch.testing.assert_close(grads[0][1], 0.1 * grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])


def test_trainable_groups(tokenizer_dir):
    frozen = Harmon(harmon_config("tiny", {"trainable": []}), load_tokenizer(tokenizer_dir))
    names = {name for name, _ in trained_parameters(frozen)}
    assert names and all(name.startswith(frozen.ENCODER_PREFIXES) for name in names)
    assert not any(p.requires_grad for p in frozen.vae.parameters())
    decoder = Harmon(
        harmon_config("tiny", {"trainable": ["decoder"]}), load_tokenizer(tokenizer_dir)
    )
    names = {name for name, _ in trained_parameters(decoder)}
    assert "proj_out.0.weight" in names and "mar.diffloss.net.input_proj.weight" in names
    assert not any(name.startswith("llm.") for name in names)
    with pytest.raises(ConfigError, match="trainable"):
        harmon_config("tiny", {"trainable": ["vae"]})


def test_dropout_draws_from_the_global_rng(tokenizer_dir):
    dropping = _tiny(tokenizer_dir).train()
    batch = collated_batch(dropping, "u")
    losses = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(dropping(batch).loss_i2t)
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(model, tokenizer_dir):
    checkpointed = _tiny(tokenizer_dir, gradient_checkpointing=True, **NO_DROPOUT).train()
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
                m.mar.encoder_blocks[0].mlp.fc1.weight.grad.clone(),
                m.mar.diffloss.net.res_blocks[0].mlp[0].weight.grad.clone(),
            )
        )
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_infotok_dims(model):
    assert model.infotok_dims() == {
        "token_dim": 64,
        "text_dim": 64,
        "vocab_size": len(model.processor.tokenizer),
        "latent_patch_dim": 16,
    }


# ----------------------------------------------------------------------------- fixed shapes


@pytest.mark.parametrize(
    "length, ratio_min", [(64, 0.7), (10, 0.7), (256, 0.7), (9, 0.5), (9, 1.0)]
)
def test_training_mask_counts_on_the_device_as_python_does(length, ratio_min):
    """The masked count ``ceil(N·ratio)`` is computed on the device yet equals Python's on the drawn
    ratio, and never keeps more than ``max_kept`` tokens (the padded sequence's room)."""
    cpu = torch.device("cpu")
    for seed in range(40):
        mask = training_mask(3, length, ratio_min, torch.Generator().manual_seed(seed), cpu)
        g = torch.Generator().manual_seed(seed)
        ratio = float(sample_mask_ratio(ratio_min, g, cpu))
        orders = random_orders(3, length, g, cpu)[:, : math.ceil(length * ratio)]
        assert torch.equal(mask, torch.zeros(3, length, dtype=torch.bool).scatter(1, orders, True))
        assert (~mask).sum(1).max() <= max_kept(length, ratio_min)


def test_the_padded_encoder_sequence_matches_the_exact_one(model):
    """Training pads the kept tokens to ``max_kept`` slots that attention ignores: the buffers and
    the kept tokens come out as without padding, and the decoder reads either layout alike."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 64, 16, generator=g)
    mask = training_mask(3, 64, 0.7, g, torch.device("cpu"))
    kept, slots = int((~mask[0]).sum()), max_kept(64, 0.7)
    assert 0 < kept < slots
    with torch.no_grad():
        exact = model.mar.forward_encoder(tokens, mask, (8, 8))
        padded = model.mar.forward_encoder(tokens, mask, (8, 8), slots)
        assert exact.shape[1] == 4 + kept and padded.shape[1] == 4 + slots
        torch.testing.assert_close(padded[:, : 4 + kept], exact)
        torch.testing.assert_close(
            model.mar.forward_decoder(padded, mask, (8, 8)),
            model.mar.forward_decoder(exact, mask, (8, 8)),
        )


def test_t2i_llm_reads_the_kept_tokens_padded_to_a_fixed_length(model):
    """The prompt, the kept tokens, padding up to ``max_kept`` (no key for any other token, no
    position), then the buffers: whatever the drawn ratio, the same sequence length."""
    batch = collated_batch(model, "gg")
    llm_inputs = []
    hook = _capture_kwargs(model.llm.model, llm_inputs)
    with torch.no_grad():
        model(batch, generator=torch.Generator().manual_seed(7))
        hook.remove()
        mask = training_mask(2, 64, 0.7, torch.Generator().manual_seed(7), torch.device("cpu"))
        tokens = model.encode_latents(batch["g_pixel_values"])
        _, z = model.encode_shared_tokens(tokens, mask, (8, 8))
    kept, slots = int((~mask[0]).sum()), max_kept(64, 0.7)
    inputs, prompt = llm_inputs[0], batch["g_input_ids"].shape[1]
    embeds = inputs["inputs_embeds"]
    assert kept < slots and embeds.shape[1] == prompt + slots + 4
    torch.testing.assert_close(embeds[:, prompt : prompt + kept], z[:, :kept])
    torch.testing.assert_close(embeds[:, -4:], z[:, -4:])
    allowed = inputs["attention_mask"]["full_attention"][:, 0] == 0
    pad = torch.arange(prompt + kept, prompt + slots)
    only_itself = torch.arange(embeds.shape[1])[:, None] == pad[None]
    assert torch.equal(allowed[:, :, pad], only_itself.expand(2, -1, -1))
    first = batch["g_attention_mask"].sum(1, keepdim=True) + kept
    assert torch.equal(inputs["position_ids"][:, -4:], first + torch.arange(4))


def _fake_twins(model: torch.nn.Module, batch: dict, mode) -> dict:
    """``model``'s parameters and buffers become fake tensors (as the planner's); the fake batch."""
    twins = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and id(t) not in twins:
                    fake = mode.from_tensor(t.detach())
                    is_parameter = isinstance(t, torch.nn.Parameter)
                    twins[id(t)] = (
                        torch.nn.Parameter(fake, t.requires_grad) if is_parameter else fake
                    )
                if t is not None:
                    store[name] = twins[id(t)]
    return {k: mode.from_tensor(v) if torch.is_tensor(v) else v for k, v in batch.items()}


def test_the_training_step_runs_on_fake_tensors(tokenizer_dir):
    """No host sync and no data-dependent shape in the training step (both branches, the clean
    ``V_enc`` pass, backward): it runs under ``FakeTensorMode`` without a shape environment."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _tiny(tokenizer_dir).train()
    mode = FakeTensorMode()
    batch = _fake_twins(model, collated_batch(model, "ugg"), mode)
    with mode:
        out = model(batch, torch.Generator().manual_seed(0))
        (out.loss_i2t + out.loss_t2i + out.z_u.mean() + out.z_g.mean()).backward()
    slots = model.config.num_llm_image_tokens
    assert out.z_u.shape == (1, slots, 64) and out.z_g.shape == (2, slots, 64)
    assert torch.is_tensor(out.num_text_tokens) and torch.is_tensor(out.num_image_tokens)


def test_collate_counts_the_longest_answer_on_the_host(model):
    batch = collated_batch(model, "ugu")
    assert batch["u_max_answer"] == int((batch["u_labels"] != IGNORE).sum(1).max())
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert out.answer_ids.shape == (2, batch["u_max_answer"])


def test_diffusion_tables_move_with_the_module_but_stay_float64():
    head = DiffLoss(16, 8, harmon_config("tiny").mar).to(torch.bfloat16)
    t = torch.tensor([0, 1, 500, 999])
    expected = torch.cumprod(1 - cosine_betas(1000), 0).sqrt()[t].float()[:, None]
    assert torch.equal(head.train_schedule.at("sqrt_ac", t), expected)
    assert not any("schedule" in key for key in head.state_dict())


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("harmon_tiny")
    model.save_pretrained(path)
    return path


def test_save_then_load_gives_identical_outputs(model, saved_dir):
    loaded = Harmon.from_pretrained(saved_dir).train()
    assert_same_outputs(model, loaded, collated_batch(model))
    assert loaded.llm.lm_head.weight is loaded.llm.model.embed_tokens.weight
    assert "llm.lm_head.weight" not in load_file(saved_dir / "model.safetensors")


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_checkpoint_mismatch_fails_naming_the_key(saved_dir, tmp_path, change):
    target = copy_checkpoint(saved_dir, tmp_path)
    key = break_checkpoint(
        target,
        change,
        "mar.diffloss.net.res_blocks.1.adaLN_modulation.1.bias",
        "mar.encoder_blocks.7.norm1.weight",
    )
    assert_mismatch_named(
        lambda: Harmon.from_pretrained(target, vae_path=saved_dir / "vae"), key, change
    )


@pytest.fixture(scope="module")
def released(model, saved_dir, tmp_path_factory):
    """The official layout: ``harmon_tiny.pth`` (MAR, projections and part of the LLM) applied on a
    base Qwen directory (transformers format, with the tokenizer), and ``kl16.ckpt`` (LDM keys)."""
    root = tmp_path_factory.mktemp("released")
    base = root / "Qwen2.5-Instruct"
    torch.manual_seed(1)
    qwen = type(model.llm)(model.llm.config)
    qwen.save_pretrained(str(base))
    load_tokenizer(saved_dir).save_pretrained(str(base))
    state = {
        k: v.clone()
        for k, v in model.checkpoint_state_dict().items()
        if not k.startswith("llm.model.layers.1.")
    }
    torch.save(state, root / "harmon_tiny.pth")
    torch.save({"model": ldm_state(model.vae, (1, 2, 2, 2), 8, 1), "epoch": 3}, root / "kl16.ckpt")
    return root, base, qwen


def test_loads_the_released_pth_on_top_of_the_base_llm(model, released):
    root, base, qwen = released
    loaded = Harmon.from_pretrained(
        root / "harmon_tiny.pth", llm_path=base, vae_path=root / "kl16.ckpt", preset="tiny"
    )
    state = loaded.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("llm.model.layers.1."):
            assert torch.equal(state[key], qwen.state_dict()[key[len("llm.") :]]), key
        else:
            assert torch.equal(state[key], value), key
    pixels = collated_batch(model, "g")["g_pixel_values"]
    torch.testing.assert_close(
        loaded.encode_latents(pixels), model.encode_latents(pixels), rtol=1e-5, atol=1e-5
    )


def test_released_pth_without_the_base_llm_or_vae_fails_clearly(released):
    root, base, _ = released
    with pytest.raises(
        CheckpointMismatchError, match=r"llm\.model\.layers\.1\.mlp\.up_proj\.weight(.|\n)*llm_path"
    ):
        Harmon.from_pretrained(
            root / "harmon_tiny.pth",
            tokenizer_path=base,
            vae_path=root / "kl16.ckpt",
            preset="tiny",
        )
    with pytest.raises(FileNotFoundError, match="vae_path"):
        Harmon.from_pretrained(root / "harmon_tiny.pth", llm_path=base, preset="tiny")
    with pytest.raises(ConfigError, match="pass preset"):
        Harmon.from_pretrained(root / "harmon_tiny.pth", llm_path=base, vae_path=root / "kl16.ckpt")


def test_loads_a_transformers_format_directory_with_the_vae_inside(model, saved_dir, tmp_path):
    """Weights with the released names, ``vae.*`` in LDM layout included, tokenizer files, no adapter config."""
    target = tmp_path / "hf"
    target.mkdir()
    (target / "config.json").write_text(json.dumps({"architectures": ["Harmon"]}))
    state = dict(model.checkpoint_state_dict())
    state.update({f"vae.{k}": v for k, v in ldm_state(model.vae, (1, 2, 2, 2), 8, 1).items()})
    save_file({k: v.clone().contiguous() for k, v in state.items()}, target / "model.safetensors")
    load_tokenizer(saved_dir).save_pretrained(str(target))
    loaded = Harmon.from_pretrained(target, preset="tiny", options=NO_DROPOUT)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_build_model_registry(tokenizer_dir, saved_dir, monkeypatch):
    built = build_model(
        ModelConfig(family="harmon", preset="tiny", tokenizer_path=str(tokenizer_dir))
    )
    assert isinstance(built, Harmon) and built.processor is not None
    from_path = build_model(
        ModelConfig(family="harmon", path=str(saved_dir), options={"trainable": []})
    )
    assert from_path.config.trainable == []
    with pytest.raises(ConfigError, match="options.mar.encoder_dept"):
        build_model(
            ModelConfig(
                family="harmon",
                preset="tiny",
                options={"mar": {"encoder_dept": 3}},
                tokenizer_path=str(tokenizer_dir),
            )
        )
    with pytest.raises(ConfigError, match="unknown Harmon preset"):
        build_model(ModelConfig(family="harmon", preset="7b", tokenizer_path=str(tokenizer_dir)))


# ----------------------------------------------------------------------------- inference


def test_generate_returns_images_of_the_configured_size(model):
    model.eval()
    images = model.generate(
        ["a cat", "two shapes"], num_iter=3, generator=torch.Generator().manual_seed(0)
    )
    again = model.generate(
        ["a cat", "two shapes"], num_iter=3, generator=torch.Generator().manual_seed(0)
    )
    plain = model.generate(
        ["a cat"], num_iter=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    assert [im.size for im in images + plain] == [(64, 64)] * 3 and all(
        im.mode == "RGB" for im in images
    )
    assert [np.asarray(im).tolist() for im in images] == [np.asarray(im).tolist() for im in again]


def test_generate_samples_every_token_once_with_guided_noise(model, monkeypatch):
    calls = []
    original = model.mar.diffloss.sample

    def spy(cond, uncond=None, **kwargs):
        calls.append((len(cond), uncond is not None and len(uncond) == len(cond), kwargs["scale"]))
        return original(cond, uncond, **kwargs)

    monkeypatch.setattr(model.mar.diffloss, "sample", spy)
    model.eval()
    model.generate(
        ["a cat"], num_iter=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    # 64 tokens over 4 rounds: masked counts floor(64·cos(π/2·k/4)) = 59, 45, 24 → 5, 14, 21, 24 per round.
    assert [c[0] for c in calls] == [5, 14, 21, 24] and all(c[1] and c[2] == 3.0 for c in calls)


def test_answer_returns_one_string_per_image_and_matches_the_training_path(model):
    """Left-padded, cached decoding sees what the training forward sees for the same prompt."""
    model.eval()
    images = [draw_image(5), draw_image(6)]
    questions = ["what is in this image", "describe the small shapes on the left"]
    seen = []
    handle = model.llm.lm_head.register_forward_hook(lambda _, args, out: seen.append(args[0]))
    batched = model.answer(images, questions, max_new_tokens=4)
    first_batched = seen[0]
    single = []
    for image, question in zip(images, questions):
        seen.clear()
        single.append(model.answer([image], [question], max_new_tokens=4)[0])
        torch.testing.assert_close(first_batched[len(single) - 1], seen[0][0], rtol=1e-4, atol=1e-5)
    handle.remove()
    sample = model.processor(
        {
            "task": "i2t",
            "image": images[1],
            "messages": [{"role": "user", "content": f"<image>\n{questions[1]}"}],
        }
    )
    batch = model.collate([sample])
    store = []
    hook = model.llm.model.register_forward_hook(
        lambda _, args, out: store.append(out.last_hidden_state)
    )
    with torch.no_grad():
        model(batch)
    hook.remove()
    model.train()
    torch.testing.assert_close(first_batched[1], store[0][0, -1], rtol=1e-4, atol=1e-5)
    assert len(batched) == 2 and all(isinstance(text, str) for text in batched)
    assert batched == single
