"""The InfoTok regularizer (Eq. 10): closed forms, gradients, modes, robustness."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from pipeline.infotok import (
    InfoTokConfig,
    InfoTokDims,
    InfoTokRegularizer,
    gaussian_kl,
    info_nce,
)

DIMS = InfoTokDims(token_dim=32, text_dim=24, vocab_size=500, latent_patch_dim=16)
B_U, B_G, N, L = 4, 3, 9, 6


def make_inputs(seed: int = 0, scale: float = 1.0, grad: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B_U, L, dtype=torch.bool)
    mask[0, 4:] = False  # a padded answer
    inputs = {
        "z_u": torch.randn(B_U, N, DIMS.token_dim, generator=g) * scale,
        "z_g": torch.randn(B_G, N, DIMS.token_dim, generator=g) * scale,
        "text_u": torch.randn(B_U, DIMS.text_dim, generator=g) * scale,
        "text_g": torch.randn(B_G, DIMS.text_dim, generator=g) * scale,
        "answer_ids": torch.randint(0, DIMS.vocab_size, (B_U, L), generator=g),
        "answer_mask": mask,
        "target_patches": torch.randn(B_G, N, DIMS.latent_patch_dim, generator=g),
    }
    if grad:
        for key in ("z_u", "z_g"):
            inputs[key].requires_grad_(True)
    return inputs


def make_regularizer(mode: str = "csa", **overrides) -> InfoTokRegularizer:
    torch.manual_seed(0)
    return InfoTokRegularizer(InfoTokConfig(mode=mode, **overrides), DIMS)


# -- closed forms -------------------------------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(5, 7, 3), torch.randn(5, 7, 3)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)
    assert gaussian_kl(mu, logvar).shape == (5, 7)


def test_gaussian_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(2, 4, 8)
    assert gaussian_kl(zeros, zeros).abs().max() == 0
    assert (gaussian_kl(torch.full((2, 4, 8), 0.1), zeros) > 0).all()
    assert (gaussian_kl(zeros, torch.full((2, 4, 8), -0.1)) > 0).all()


def test_info_nce_matches_a_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    txt = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    tau = 0.5
    # cosine similarities: img0·txt0 = 1, img0·txt1 = 1/√2, img1·txt0 = 0, img1·txt1 = 1/√2
    s = torch.tensor([[1.0, 2**-0.5], [0.0, 2**-0.5]]) / tau
    expected = 0.5 * ((s[0, 0] - torch.logsumexp(s[0], 0)) + (s[1, 1] - torch.logsumexp(s[1], 0)))
    torch.testing.assert_close(info_nce(img, txt, tau), expected)
    # Perfectly aligned, well separated pairs approach the maximum 0; shuffled pairs score lower.
    eye = torch.eye(4)
    assert info_nce(eye, eye, 0.01) > -1e-6
    assert info_nce(eye, eye.flip(0), 0.01) < -10


def test_info_nce_with_extra_negatives_uses_the_given_positive_rows():
    img = torch.randn(3, 5)
    txt = torch.randn(7, 5)
    positives = torch.tensor([4, 5, 6])
    logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t() / 0.1
    expected = logits.log_softmax(-1)[torch.arange(3), positives].mean()
    torch.testing.assert_close(info_nce(img, txt, 0.1, positives), expected)


# -- the regularizer ----------------------------------------------------------------------------


def test_terms_and_total_follow_eq_10():
    cfg_kwargs = dict(lam=0.3, beta_u=2.0, beta_g=0.5, alpha_u=1.5, alpha_g=0.7)
    reg = make_regularizer(**cfg_kwargs)
    out = reg(**make_inputs())
    t = out.terms
    expected = (t["kl_u"] + 2.0 * t["suff_u"] - 1.5 * t["align_u"]) + (
        t["kl_g"] + 0.5 * t["suff_g"] - 0.7 * t["align_g"]
    )
    torch.testing.assert_close(t["infotok"], expected)
    torch.testing.assert_close(out.total, 0.3 * expected)
    assert {
        "kl_u",
        "suff_u",
        "align_u",
        "kl_g",
        "suff_g",
        "align_g",
        "nats_per_image_u",
        "nats_per_image_g",
    } <= set(t)
    assert t["align_u"] <= 0 and t["align_g"] <= 0
    assert t["kl_u"] > 0 and t["suff_u"] > 0


def test_kl_term_is_the_posterior_kl_in_nats_per_token():
    reg = make_regularizer()
    inputs = make_inputs()
    torch.manual_seed(1)
    out = reg(**inputs)
    mu, logvar = reg.posterior["u"](inputs["z_u"])
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(out.terms["kl_u"], ref.mean())
    torch.testing.assert_close(out.terms["nats_per_image_u"], ref.sum(1).mean())


def test_sufficiency_terms_are_proper_likelihoods():
    """suff_u is the mean answer-token NLL; suff_g the Gaussian NLL per latent element."""
    reg = make_regularizer(mode="cs")
    inputs = make_inputs()
    torch.manual_seed(3)
    out = reg(**inputs)
    torch.manual_seed(3)
    mu, logvar = reg.posterior["u"](inputs["z_u"])
    z_u = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    mu, logvar = reg.posterior["g"](inputs["z_g"])
    z_g = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
    # Answer decoder: a distribution over the vocabulary at each position (sums to one).
    dec = reg.answer_decoder
    torch.testing.assert_close(
        out.terms["suff_u"], dec(z_u, inputs["answer_ids"], inputs["answer_mask"])
    )
    # Latent decoder: the Gaussian density of torch.distributions.
    lat = reg.latent_decoder
    std = (0.5 * lat.logvar).exp()
    ref = -Normal(lat.mean(z_g), std).log_prob(inputs["target_patches"]).mean()
    torch.testing.assert_close(out.terms["suff_g"], ref)


def test_answer_decoder_is_autoregressive_and_ignores_padding():
    reg = make_regularizer(mode="cs")
    dec = reg.answer_decoder
    z = torch.randn(2, N, 64)
    ids = torch.randint(0, DIMS.vocab_size, (2, L))
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[:, 3:] = False
    base = dec(z, ids, mask)
    changed = ids.clone()
    changed[:, 3:] = (changed[:, 3:] + 7) % DIMS.vocab_size  # padding content must not matter
    torch.testing.assert_close(dec(z, changed, mask), base)
    other = ids.clone()
    other[:, 1] = (other[:, 1] + 1) % DIMS.vocab_size  # a real answer token does
    assert not torch.allclose(dec(z, other, mask), base)


def test_answer_decoder_loss_does_not_depend_on_how_far_answers_are_padded():
    """Adapters pad answers to a bound known from shapes (no host sync), not to the longest."""
    dec = make_regularizer(mode="cs").answer_decoder
    inputs = make_inputs()
    z, ids, mask = torch.randn(B_U, N, 64), inputs["answer_ids"], inputs["answer_mask"]
    longer_ids = torch.cat([ids, torch.randint(0, DIMS.vocab_size, (B_U, 5))], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(B_U, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(dec(z, longer_ids, longer_mask), dec(z, ids, mask))


@pytest.mark.parametrize("mode", ["cs", "csa"])
def test_gradients_reach_the_shared_tokens_from_every_active_term(mode):
    reg = make_regularizer(mode)
    terms = ["kl", "suff"] + (["align"] if mode == "csa" else [])
    for branch in ("u", "g"):
        for term in terms:
            inputs = make_inputs(grad=True)
            out = reg(**inputs)
            (grad,) = torch.autograd.grad(out.terms[f"{term}_{branch}"], inputs[f"z_{branch}"])
            assert grad.abs().sum() > 0, f"{term}_{branch} sends no gradient to z_{branch}"
            assert torch.isfinite(grad).all()


def test_cs_mode_has_no_alignment_term_or_parameters():
    reg = make_regularizer("cs")
    out = reg(**make_inputs())
    assert not any(k.startswith("align") for k in out.terms)
    assert not hasattr(reg, "text_proj")
    # text features are not needed in cs
    inputs = make_inputs()
    inputs.pop("text_u"), inputs.pop("text_g")
    reg(**inputs)


def test_off_mode_builds_nothing_and_returns_zero():
    reg = make_regularizer("off")
    assert sum(p.numel() for p in reg.parameters()) == 0
    out = reg(**make_inputs())
    assert out.total.item() == 0 and out.terms == {}


def test_a_missing_branch_is_skipped():
    reg = make_regularizer()
    inputs = make_inputs()
    only_u = {k: v for k, v in inputs.items() if not k.endswith("_g") and k != "target_patches"}
    out = reg(**only_u)
    assert "kl_u" in out.terms and not any(k.endswith("_g") for k in out.terms)
    only_g = {k: inputs[k] for k in ("z_g", "text_g", "target_patches")}
    out = reg(**only_g)
    assert "kl_g" in out.terms and not any(k.endswith("_u") for k in out.terms)
    assert reg().total.item() == 0


def test_a_present_branch_without_its_targets_is_a_clear_error():
    reg = make_regularizer()
    inputs = make_inputs()
    inputs.pop("answer_ids")
    with pytest.raises(ValueError, match="answer_ids"):
        reg(**inputs)


def test_target_mask_drops_tokens_without_a_target():
    reg = make_regularizer("cs")
    inputs = {k: make_inputs()[k] for k in ("z_g", "target_patches")}
    mask = torch.ones(B_G, N, dtype=torch.bool)
    mask[:, -3:] = False
    garbage = inputs["target_patches"].clone()
    garbage[:, -3:] = 1e6
    torch.manual_seed(0)
    a = reg(z_g=inputs["z_g"], target_patches=inputs["target_patches"], target_mask=mask)
    torch.manual_seed(0)
    b = reg(z_g=inputs["z_g"], target_patches=garbage, target_mask=mask)
    torch.testing.assert_close(a.terms["suff_g"], b.terms["suff_g"])


def test_non_finite_targets_of_masked_tokens_reach_neither_the_loss_nor_the_gradients():
    reg = make_regularizer("cs")
    inputs = make_inputs(grad=True)
    mask = torch.ones(B_G, N, dtype=torch.bool)
    mask[:, -3:] = False
    garbage = inputs["target_patches"].clone()
    garbage[0, -3:], garbage[1, -1] = float("nan"), float("inf")
    runs = []
    for target in (inputs["target_patches"], garbage):
        torch.manual_seed(0)
        suff = reg(z_g=inputs["z_g"], target_patches=target, target_mask=mask).terms["suff_g"]
        runs.append((suff, *torch.autograd.grad(suff, [inputs["z_g"], reg.latent_decoder.logvar])))
    for clean, dirty in zip(*runs):
        assert torch.isfinite(dirty).all()
        torch.testing.assert_close(dirty, clean)


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_outputs_stay_finite_for_extreme_inputs(scale):
    reg = make_regularizer()
    inputs = make_inputs(scale=scale, grad=True)
    out = reg(**inputs)
    assert all(torch.isfinite(v) for v in out.terms.values()), out.terms
    out.total.backward()
    assert torch.isfinite(inputs["z_u"].grad).all() and torch.isfinite(inputs["z_g"].grad).all()


def test_log_variance_is_clamped():
    reg = make_regularizer(logvar_limit=5.0)
    with torch.no_grad():
        reg.posterior["u"].proj.bias.fill_(1e4)
    _, logvar = reg.posterior["u"](torch.randn(2, 3, DIMS.token_dim))
    assert logvar.abs().max() <= 5.0


def test_bf16_autocast_and_bf16_weights_give_finite_close_results():
    reg = make_regularizer()
    inputs = make_inputs()
    torch.manual_seed(0)
    ref = reg(**inputs)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = reg(**inputs)
    for key, value in ref.terms.items():
        assert torch.isfinite(auto.terms[key])
        torch.testing.assert_close(auto.terms[key].float(), value, rtol=0.1, atol=0.1)
    # DeepSpeed bf16 casts the whole module and feeds bf16 tokens (no autocast).
    bf16 = make_regularizer().to(torch.bfloat16)
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out = bf16(**cast)
    out.total.backward()
    assert all(torch.isfinite(v) for v in out.terms.values())


def test_deterministic_under_a_fixed_seed():
    inputs = make_inputs()
    torch.manual_seed(7)
    a = make_regularizer()(**inputs)
    torch.manual_seed(7)
    b = make_regularizer()(**inputs)
    for key in a.terms:
        assert torch.equal(a.terms[key], b.terms[key])


def test_answer_decoder_is_a_normalised_distribution_over_the_whole_vocabulary():
    """Summing p(y | context) over every token id of a small vocabulary gives at most one (mass on
    pairs past V is wasted), and the decoder's NLL is exactly -log of that probability."""
    vocab = 50
    reg = InfoTokRegularizer(InfoTokConfig(mode="cs"), InfoTokDims(8, 8, vocab, 4))
    dec = reg.answer_decoder
    z = torch.randn(1, 3, InfoTokConfig().latent_dim)
    with torch.no_grad():
        nll = torch.stack(
            [dec(z, torch.tensor([[7, y]]), torch.tensor([[False, True]])) for y in range(vocab)]
        )
    total = (-nll).exp().sum()
    assert 0.5 < total <= 1.0 + 1e-5
    assert dec.bucket**2 >= vocab


def test_answer_decoder_stays_small_at_a_151k_vocabulary():
    dims = InfoTokDims(token_dim=1536, text_dim=1536, vocab_size=151_665, latent_patch_dim=64)
    cfg = InfoTokConfig()
    with torch.device("meta"):
        reg = InfoTokRegularizer(cfg, dims)
    tables = sum(p.numel() for n, p in reg.named_parameters() if "embed_" in n)
    assert tables == (390 + 389) * cfg.vocab_rank  # ceil(sqrt(V)) = 390 buckets, 389 classes
    assert sum(p.numel() for p in reg.parameters()) < 2_000_000


def test_config_rejects_heads_not_dividing_hidden():
    with pytest.raises(ValueError, match="divisible"):
        InfoTokConfig(decoder_hidden=30, decoder_heads=4)
