"""Harmon (wusize/Harmon) as an InfoTok adapter.

Architecture as released (``src/models/harmon.py``, ``src/models/harmon_dev.py``): images go through
the frozen KL-16 VAE (posterior mode × 0.2325) into 16-channel latent tokens (patch 1, stride 16).
The shared visual tokenizer ``V_enc`` is the MAR encoder (``mar.z_proj`` → ``buffer_size`` buffer
tokens filled with ``mar.fake_latent`` + learned positions, bilinearly resized from the 256-px
table to the image grid → ``mar.encoder_blocks``) followed by ``proj_in`` into the Qwen2.5 width; the
LLM ``llm`` sees the image tokens first and the buffers last, under plain causal attention.

- I2T: all tokens unmasked; the features enter the user turn with their gradient scaled by
  ``grad_scale`` (0.1); text cross-entropy on the answer tokens.
- T2I: a random ``ceil(N·r)`` of the tokens is masked, r ~ N(1, 0.25²) truncated to [0.7, 1], one
  r per batch; the prompt (dropped to ``"Generate an image."`` with p = 0.1 by the processor) is
  followed by the encoder features of the kept tokens and the buffers. The kept tokens are padded
  to the most that r = ``mask_ratio_min`` keeps, padding that no other token attends to, so that
  the step has fixed shapes and reads nothing back from the device. The LLM output goes through
  ``proj_out`` and is added to the encoder features; the MAR decoder fills in mask tokens and its
  outputs condition the per-token diffusion MLP, whose loss is averaged over the masked tokens.

Released files (``wusize/harmon``: ``harmon_0.5b.pth`` / ``harmon_1.5b.pth`` on top of
``Qwen/Qwen2.5-{0.5B,1.5B}-Instruct``, and ``kl16.ckpt``; transformers-format repos
``wusize/Harmon-0_5B`` / ``wusize/Harmon-1_5B``) are read from local paths only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from pipeline.config import ConfigError, from_dict
from pipeline.models.base import MLLMAdapter, MLLMOutput, ModelConfig, in_chunks
from pipeline.models.common.decoding import decode_texts, greedy_decode
from pipeline.models.common.latents import cached_posterior, patchify, unpatchify
from pipeline.models.common.model_dir import read_adapter_record, write_config_json
from pipeline.models.common.presets import deep_merge
from pipeline.models.common.processing import to_pil
from pipeline.models.common.qwen import qwen2_config
from pipeline.models.common.text import (
    IMAGE_PLACEHOLDER,
    answer_loss,
    answer_tokens,
    left_pad_prompts,
    masked_mean,
)
from pipeline.models.common.tokenizer import tokenizer_dir
from pipeline.models.common.weights import (
    CheckpointMismatchError,
    load_strict,
    read_state_dict,
    read_weight_file,
)
from pipeline.models.harmon.config import HarmonConfig, harmon_config
from pipeline.models.harmon.mar import (
    MAR,
    mask_first,
    max_kept,
    random_orders,
    slot_valid,
    training_mask,
)
from pipeline.models.harmon.processor import (
    HarmonProcessor,
    expand_to_square,
    load_tokenizer,
    to_tensor,
)
from pipeline.models.harmon.vae import kl16_vae, load_vae, load_vae_state, unwrap_state

TOKENIZER_HINT = "tokenizer_path (the Qwen2.5-Instruct tokenizer directory) or llm_path"
# proj_in.0.weight shape [LLM width, MAR encoder width] of the released sizes.
RELEASED_BY_PROJ_IN = {(896, 768): "0.5b", (1536, 1280): "1.5b"}


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def causal_mask(key_valid: Tensor, query_len: int, dtype: torch.dtype) -> Tensor:
    """Additive mask [B, 1, Lq, Lk] for the last ``query_len`` of ``Lk`` positions: causal over valid keys.

    Every query sees itself, so padding rows stay finite.
    """
    length = key_valid.shape[1]
    q_pos = torch.arange(length - query_len, length, device=key_valid.device)[:, None]
    k_pos = torch.arange(length, device=key_valid.device)[None]
    allowed = ((k_pos <= q_pos)[None] & key_valid[:, None, :]) | (k_pos == q_pos)[None]
    additive = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def build_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class Harmon(MLLMAdapter):
    """The Harmon adapter. Top-level attribute names are the released checkpoint's key prefixes.

    The MAR encoder and ``proj_in`` always train; the LLM and the generation side (MAR decoder,
    diffusion MLP, ``proj_out``) per ``config.trainable``; never MAR's unused ``class_emb``.
    """

    family = "harmon"
    ENCODER_PREFIXES = (
        "mar.fake_latent",
        "mar.z_proj.",
        "mar.z_proj_ln.",
        "mar.encoder_pos_embed_learned",
        "mar.encoder_blocks.",
        "mar.encoder_norm.",
        "proj_in.",
    )
    TRAINABLE_GROUPS = {
        "llm": ("llm.",),
        "decoder": (
            "mar.decoder_embed.",
            "mar.mask_token",
            "mar.decoder_pos_embed_learned",
            "mar.decoder_blocks.",
            "mar.decoder_norm.",
            "mar.diffusion_pos_embed_learned",
            "mar.diffloss.",
            "proj_out.",
        ),
    }
    config: HarmonConfig
    LATENT_TASKS = ("i2t", "t2i")
    vae: AutoencoderKL

    def __init__(
        self,
        config: HarmonConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        vae: AutoencoderKL | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = self._vocab_size(config.llm.vocab_size, tokenizer)
        width, encoder_width = config.llm.hidden_size, config.mar.encoder_embed_dim
        self.llm = Qwen2ForCausalLM(
            qwen2_config(config.llm, self.vocab_size, config.attn_implementation)
        )
        self.mar = MAR(
            config.mar, config.latent_patch_dim, config.position_side, config.gradient_checkpointing
        )
        self.proj_in = build_mlp(encoder_width, width, width)
        self.proj_out = build_mlp(width, width, encoder_width)
        self.vae = vae if vae is not None else kl16_vae(config.vae)
        self.vae.requires_grad_(False)
        self.processor = HarmonProcessor(tokenizer, config) if tokenizer is not None else None
        self._set_trainable()
        if config.gradient_checkpointing:
            self.llm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )

    # ----------------------------------------------------------------- shared pieces

    @property
    def _dtype(self) -> torch.dtype:
        return self.proj_in[0].weight.dtype

    @property
    def _device(self) -> torch.device:
        return self.proj_in[0].weight.device

    def _grid(self, latents: Tensor) -> tuple[int, int]:
        """The token grid of VAE latents [B, C, h, w]."""
        patch = self.config.mar.patch_size
        return latents.shape[-2] // patch, latents.shape[-1] // patch

    @torch.no_grad()
    def vae_posterior(self, pixels: Tensor) -> dict[str, Tensor]:
        """Pixels [B, 3, H, W] in [-1, 1] → the KL-16 posterior's ``mean`` (Harmon takes the mode,
        so nothing else is drawn), [B, C, H/16, W/16]."""
        return {"mean": self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()}

    def latent_tokens(self, mode: Tensor) -> Tensor:
        """Posterior mode [B, C, h, w] → latent tokens [B, N, P]: × scaling factor, patchified."""
        return patchify(
            mode.float() * self.config.vae.scaling_factor, self.config.mar.patch_size, "cpq"
        )

    def encode_latents(self, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] → latent tokens [B, N, P]."""
        return self.latent_tokens(self.vae_posterior(pixels)["mean"])

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Latent tokens [B, N, P] → pixels [B, 3, H, W] in [-1, 1]."""
        latents = unpatchify(
            tokens.float(), self.config.vae.latent_channels, self.config.mar.patch_size, grid, "cpq"
        )
        return self.vae.decode(
            (latents / self.config.vae.scaling_factor).to(self.vae.dtype)
        ).sample.float()

    def autoencoder_pass(
        self, pixels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.mode() if generator is None else posterior.sample(generator)
        return self.vae.decode(latents).sample.float(), posterior.kl().mean()

    def autoencoder_options(self, pixels: Tensor) -> dict[str, Any]:
        """``vae.scaling_factor`` (the official ``vae_scale``): one over the std of the posterior modes."""
        modes = in_chunks(
            lambda x: self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode().float(), pixels
        )
        return {"vae": {"scaling_factor": 1 / max(float(modes.std()), 1e-3)}}

    def encode_shared_tokens(
        self,
        tokens: Tensor,
        mask: Tensor | None,
        grid: tuple[int, int],
        slots: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``V_enc``: MAR encoder features [B, buffer + kept, E] and the LLM-side tokens [B, kept + buffer, D]
        (``proj_in`` of the same features with the buffers moved to the end, as the LLM reads them).

        ``mask`` None keeps every token; ``slots`` pads the kept ones to a fixed count (see
        :meth:`MAR.forward_encoder`).
        """
        features = self.mar.forward_encoder(tokens, mask, grid, slots)
        z = self.proj_in(features)
        buffers = self.config.mar.buffer_size
        return features, torch.cat([z[:, buffers:], z[:, :buffers]], dim=1)

    def _from_llm(self, hidden: Tensor) -> Tensor:
        """LLM outputs of an image (buffers last) → MAR order (buffers first) through ``proj_out``."""
        split = hidden.shape[1] - self.config.mar.buffer_size
        return self.proj_out(torch.cat([hidden[:, split:], hidden[:, :split]], dim=1))

    def _run_llm(
        self, embeds: Tensor, key_valid: Tensor, cache: DynamicCache | None = None
    ) -> Tensor:
        """Last hidden states of ``embeds``, the tail of ``key_valid`` [B, Lk]; positions count valid keys."""
        query_len = embeds.shape[1]
        positions = (key_valid.long().cumsum(1) - 1).clamp_min(0)[:, -query_len:]
        mask = causal_mask(key_valid, query_len, embeds.dtype)
        return self.llm.model(
            inputs_embeds=embeds,
            attention_mask={"full_attention": mask},
            position_ids=positions,
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state

    def _i2t_embeds(self, input_ids: Tensor, offsets: Tensor, image_tokens: Tensor) -> Tensor:
        """Token embeddings with each sample's image slots replaced by its visual tokens."""
        embeds = self.llm.model.embed_tokens(input_ids)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None]
        cols = offsets[:, None] + torch.arange(image_tokens.shape[1], device=input_ids.device)[None]
        return embeds.index_put((rows.expand_as(cols), cols), image_tokens.to(embeds.dtype))

    # ----------------------------------------------------------------- training step

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        *,
        infotok_inputs: bool = True,
    ) -> MLLMOutput:
        """Both branches of a collated batch (one LLM pass each, as the official per-task batches).

        Random draws from ``generator``, in order: the T2I mask ratio, the token orders, the diffusion
        timesteps, the diffusion noise. MAR's dropout (0.1) draws from the global RNG, as officially.
        ``z_u`` and ``z_g`` come from one batched ``V_enc`` pass over all clean (unmasked) images: for
        I2T it is the tensor the LLM consumes (the LLM path applies the gradient scale; ``z_u`` itself
        is unscaled); for T2I, whose task pass encodes masked images, it is an extra clean pass,
        left out without ``infotok_inputs``.
        """
        has_u, has_g = "u_input_ids" in batch, "g_input_ids" in batch
        branches = [p for p in ("u_", "g_") if f"{p}input_ids" in batch]
        cached = [cached_posterior(batch, p) for p in branches]
        if all(cached):
            mode = torch.cat([c["mean"] for c in cached])
        else:  # one VAE pass over both branches' images
            mode = self.vae_posterior(torch.cat([batch[f"{p}pixel_values"] for p in branches]))
            mode = mode["mean"]
        grid = self._grid(mode)
        tokens = self.latent_tokens(mode)
        n_u = len(batch["u_input_ids"]) if has_u else 0
        clean_images = tokens if infotok_inputs else tokens[:n_u]
        clean = None
        if len(clean_images):
            _, clean = self.encode_shared_tokens(clean_images, None, grid)
        out = MLLMOutput(
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
        if has_u:
            self._i2t_step(batch, clean[:n_u], out)
        if has_g:
            z_g = clean[n_u:] if infotok_inputs else None
            self._t2i_step(batch, tokens[n_u:], z_g, grid, generator, out)
        return out

    def _i2t_step(self, batch: Mapping[str, Any], z_u: Tensor, out: MLLMOutput) -> None:
        ids, valid, labels = batch["u_input_ids"], batch["u_attention_mask"], batch["u_labels"]
        scaled = ScaleGradient.apply(z_u, self.config.grad_scale)
        hidden = self._run_llm(self._i2t_embeds(ids, batch["u_image_offset"], scaled), valid)
        # Image slots hold no answer token: a bound from shapes when the batch does not say.
        max_answer = batch.get("u_max_answer", labels.shape[1] - z_u.shape[1])
        out.loss_i2t = answer_loss(self.llm.lm_head, hidden, labels, max_answer)
        out.z_u = z_u
        out.text_u = masked_mean(hidden, batch["u_text_mask"])
        out.answer_ids, out.answer_mask = answer_tokens(labels, max_answer)
        out.num_text_tokens += valid.sum() - z_u.shape[0] * z_u.shape[1]
        out.num_image_tokens += z_u.shape[0] * z_u.shape[1]

    def _t2i_step(
        self,
        batch: Mapping[str, Any],
        tokens: Tensor,
        z_g: Tensor | None,
        grid: tuple[int, int],
        generator: torch.Generator | None,
        out: MLLMOutput,
    ) -> None:
        ids, valid = batch["g_input_ids"], batch["g_attention_mask"]
        b, n, p = tokens.shape
        ratio_min, buffers = self.config.mar.mask_ratio_min, self.config.mar.buffer_size
        mask = training_mask(b, n, ratio_min, generator, tokens.device)
        # The kept count is random: the sequence has room for the most and ignores the padding.
        slots = max_kept(n, ratio_min)
        features, z = self.encode_shared_tokens(tokens, mask, grid, slots)
        z_valid = slot_valid(mask, buffers, slots).roll(-buffers, dims=1)
        embeds = torch.cat([self.llm.model.embed_tokens(ids), z.to(self._dtype)], dim=1)
        hidden = self._run_llm(embeds, torch.cat([valid, z_valid], dim=1))
        cond = self.mar.forward_decoder(
            features + self._from_llm(hidden[:, ids.shape[1] :]), mask, grid
        )
        out.loss_t2i = self.mar.diffloss(
            tokens.reshape(b * n, p), cond.reshape(b * n, -1), mask.reshape(-1), generator
        )
        out.z_g = z_g
        out.text_g = masked_mean(hidden[:, : ids.shape[1]], valid)
        out.target_patches = torch.cat([tokens, tokens.new_zeros(b, buffers, p)], dim=1)
        out.target_mask = torch.cat([mask.new_ones(b, n), mask.new_zeros(b, buffers)], dim=1)
        out.num_text_tokens += valid.sum()
        out.num_image_tokens += z_valid.sum()

    # ----------------------------------------------------------------- inference

    def _processor(self) -> HarmonProcessor:
        if self.processor is None:
            raise RuntimeError(
                "this Harmon model was built without a tokenizer; pass tokenizer_path"
            )
        return self.processor

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        guidance_scale: float | None = None,
        num_iter: int | None = None,
        temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """MAR iterative masked generation (official ``Harmon.sample``) with classifier-free guidance.

        Each of ``num_iter`` rounds encodes the known tokens, runs the LLM after the cached prompt,
        decodes conditions for every token and samples the tokens due this round (a cosine schedule
        of the masked count over a random order) with the diffusion head; guidance mixes the noise
        predictions of the prompt and of the unconditional prompt (``guidance_scale = 1`` disables).
        ``generator`` (on the model's device) draws the order and all diffusion noise.
        """
        processor, cfg = self._processor(), self.config
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        steps = num_iter or cfg.num_iter
        temperature = cfg.temperature if temperature is None else temperature
        guided = scale != 1.0
        rows = [processor.t2i_sequence(p)["input_ids"] for p in prompts]
        if guided:
            rows += [processor.t2i_sequence(None)["input_ids"]] * len(prompts)
        ids, valid = (t.to(self._device) for t in processor.pad_ids(rows))
        cache = DynamicCache(config=self.llm.config)
        self._run_llm(self.llm.model.embed_tokens(ids), valid, cache)
        b, grid = len(prompts), (cfg.grid_size, cfg.grid_size)
        n = grid[0] * grid[1]
        tokens = torch.zeros(b, n, cfg.latent_patch_dim, device=self._device)
        mask = torch.ones(b, n, dtype=torch.bool, device=self._device)
        orders = random_orders(b, n, generator, self._device)

        def both(x: Tensor) -> Tensor:
            return torch.cat([x, x]) if guided else x

        for step in range(steps):
            features, z = self.encode_shared_tokens(both(tokens), both(mask), grid)
            hidden = self._run_llm(
                z, torch.cat([valid, valid.new_ones(len(z), z.shape[1])], dim=1), cache
            )
            cache.crop(-z.shape[1])
            cond = self.mar.forward_decoder(features + self._from_llm(hidden), both(mask), grid)
            count = math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps))
            count = max(1, min(int(mask[0].sum()) - 1, count))
            mask_next = mask_first(orders, count)
            due = mask if step == steps - 1 else mask & ~mask_next
            step_scale = (
                scale if cfg.cfg_schedule == "constant" else 1 + (scale - 1) * (n - count) / n
            )
            tokens = tokens.clone()
            tokens[due] = self.mar.diffloss.sample(
                cond[:b][due],
                cond[b:][due] if guided else None,
                scale=step_scale,
                temperature=temperature,
                generator=generator,
            )
            mask = mask_next
        return to_pil(self.decode_tokens(tokens, grid))

    @torch.no_grad()
    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy decoding with a KV cache over left-padded prompts (official ``scripts/image2text.py``)."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        processor, size = self._processor(), self.config.image_size
        sequences = [
            processor.i2t_sequence([{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}])
            for q in questions
        ]
        ids, offsets, valid = left_pad_prompts(sequences, processor.ids.pad, self._device)
        squares = [
            expand_to_square(im.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
            for im in images
        ]
        pixels = torch.stack([to_tensor(square) for square in squares]).to(self._device)
        mode = self.vae_posterior(pixels)["mean"]
        _, z = self.encode_shared_tokens(self.latent_tokens(mode), None, self._grid(mode))
        cache = DynamicCache(config=self.llm.config)
        hidden = self._run_llm(self._i2t_embeds(ids, offsets, z), valid, cache)

        def step(next_ids: Tensor) -> Tensor:
            nonlocal valid
            valid = torch.cat([valid, valid.new_ones(len(valid), 1)], dim=1)
            return self._run_llm(self.llm.model.embed_tokens(next_ids[:, None]), valid, cache)

        rows = greedy_decode(hidden, step, self.llm.lm_head, processor.ids.eos, max_new_tokens)
        return decode_texts(processor.tokenizer, rows)

    # ----------------------------------------------------------------- checkpoints

    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` (this adapter's config), ``model.safetensors`` with the released key names
        (``llm.*``, ``mar.*``, ``proj_in.*``, ``proj_out.*``), tokenizer files and the VAE in ``vae/``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_config_json(path, {"_class_name": "Harmon"}, self.family, self.saved_config())
        self._save_weights(path, tied_lm_head="llm.lm_head.weight")
        self.vae.save_pretrained(str(path / "vae"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        llm_path: str | Path | None = None,
        vae_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        options: dict[str, Any] | None = None,
        preset: str | None = None,
    ) -> Harmon:
        """Load a released or exported Harmon checkpoint from local paths.

        ``path`` is one of: a directory written by :meth:`save_pretrained`; a transformers-format
        directory (weights with the released keys, ``vae.*`` included or not, tokenizer files); a
        released state-dict file (``harmon_0.5b.pth`` / ``harmon_1.5b.pth``). ``llm_path`` is a
        Qwen2.5-Instruct directory loaded under ``llm.`` first, the checkpoint on top (the released
        ``.pth`` files are applied to the base LLM this way). The size comes from the saved config,
        else from the checkpoint's ``proj_in`` shape (released sizes), else ``preset``; ``options``
        override settings.
        The tokenizer comes from ``tokenizer_path``, ``path`` or ``llm_path``; the VAE from the
        checkpoint's ``vae.*`` keys, ``vae_path`` (``kl16.ckpt`` or a diffusers directory) or ``path/vae``.
        """
        path = Path(path)
        if path.is_dir():
            state, source = read_state_dict(path), str(path)
        elif path.is_file():
            state, source = unwrap_state(read_weight_file(path)), str(path)
        else:
            raise FileNotFoundError(f"no Harmon checkpoint at {path}")
        config = cls._config_for(path, state, options or {}, preset)
        tokenizer = load_tokenizer(
            tokenizer_dir(
                [tokenizer_path, path if path.is_dir() else None, llm_path], TOKENIZER_HINT
            )
        )
        vae_state = {
            k[len("vae.") :]: state.pop(k) for k in [k for k in state if k.startswith("vae.")]
        }
        if vae_state:
            vae = load_vae_state(kl16_vae(config.vae), vae_state, f"{source} (vae.*)")
        elif vae_path is not None or (path / "vae").is_dir():
            vae = load_vae(vae_path if vae_path is not None else path / "vae", config.vae)
        else:
            raise FileNotFoundError(f"{source} has no vae.* weights: pass vae_path (kl16.ckpt)")
        merged = (
            {f"llm.{k}": v for k, v in read_state_dict(llm_path).items()}
            if llm_path is not None
            else {}
        )
        merged.update(state)
        model = cls._allocated(config, tokenizer, vae)
        optional = {"llm.lm_head.weight"} if config.llm.tie_word_embeddings else set()
        lacks_llm = llm_path is None and any(
            k.startswith("llm.model.") and k not in merged for k in model.state_dict()
        )
        try:
            load_strict(model, merged, source=source, optional=optional, ignore_prefixes=("vae.",))
        except CheckpointMismatchError as error:
            if lacks_llm:
                raise CheckpointMismatchError(
                    f"{error}\n  (a released .pth applies on top of the base LLM: pass "
                    "llm_path, the Qwen2.5-Instruct directory)"
                ) from None
            raise
        return model

    @staticmethod
    def _config_for(
        path: Path, state: Mapping[str, Tensor], options: dict[str, Any], preset: str | None
    ) -> HarmonConfig:
        config_file = path / "config.json" if path.is_dir() else None
        record = (
            read_adapter_record(config_file)
            if config_file is not None and config_file.is_file()
            else None
        )
        if record is not None:
            return from_dict(
                HarmonConfig, deep_merge(record["config"], options), source=str(config_file)
            )
        shape = tuple(state["proj_in.0.weight"].shape) if "proj_in.0.weight" in state else None
        preset = RELEASED_BY_PROJ_IN.get(shape, preset)
        if preset is None:
            raise ConfigError(
                f"{path}: proj_in.0.weight shape {shape} is not a released Harmon size; pass preset"
            )
        embed = state.get("llm.model.embed_tokens.weight")
        if embed is not None and "vocab_size" not in options.get("llm", {}):
            options = deep_merge({"llm": {"vocab_size": embed.shape[0]}}, options)
        return harmon_config(preset, options, source=str(path))

    @classmethod
    def _allocated(
        cls, config: HarmonConfig, tokenizer: PreTrainedTokenizerBase, vae: AutoencoderKL
    ) -> Harmon:
        """The model with uninitialised storage (weights are loaded next) and the given VAE."""
        with torch.device("meta"):
            model = cls(config, tokenizer, vae=kl16_vae(config.vae))
        model.to_empty(device="cpu")
        model.llm.tie_weights()  # to_empty re-creates parameters, untying lm_head from embed_tokens
        model.llm.model.rotary_emb = Qwen2RotaryEmbedding(
            model.llm.config
        )  # non-persistent buffers
        model.mar.diffloss.reset_schedules()
        model.vae = vae.requires_grad_(False).eval()
        return model

    @classmethod
    def build(cls, config: ModelConfig) -> Harmon:
        if config.path:
            # A released .pth applies on top of Qwen2.5-Instruct, whose directory also holds the tokenizer.
            base = config.tokenizer_path if Path(config.path).is_file() else None
            return cls.from_pretrained(
                config.path,
                llm_path=base,
                vae_path=config.vae_path,
                tokenizer_path=config.tokenizer_path,
                options=config.options,
                preset=config.preset,
            )
        cfg = harmon_config(config.preset, config.options)
        tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        vae = load_vae(config.vae_path, cfg.vae) if config.vae_path else None
        return cls(cfg, tokenizer, vae)
