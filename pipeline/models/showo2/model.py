"""Show-o2 (showlab/Show-o, ``show-o2/``) as an InfoTok adapter.

Architecture as released (``models/modeling_showo2_qwen2_5.py``): Wan2.1 VAE latents feed a
dual-path visual tokenizer ``V_enc`` — a semantic path (2×2 patch embedding ``image_embedder_und``
+ SigLIP position embeddings + SigLIP encoder layers ``und_trans``) and a low-level path (2×2
patch embedding ``image_embedder_gen``), fused by ``fusion_proj``. Each image occupies N+1
sequence slots of the Qwen2.5 LLM ``showo``: a timestep embedding, then the N visual tokens.
Attention is causal over text and bidirectional inside an image. The LLM's last hidden states go
to ``lm_head`` (text) and, through ``diff_proj``, to the flow head (``diffusion_head_a`` blocks
modulated by ``time_embed`` and the final layer ``diffusion_head_b``) predicting velocities.

Released checkpoints (hub ids ``showlab/show-o2-1.5B``, ``showlab/show-o2-7B``; the VAE is
``Wan2.1_VAE.pth`` of ``Wan-AI/Wan2.1-T2V-14B``) are read from local paths only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from PIL import Image
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM, SiglipVisionConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.models.base import MLLMAdapter, MLLMOutput, ModelConfig, in_chunks
from pipeline.models.common.decoding import decode_texts, greedy_decode
from pipeline.models.common.device import filled
from pipeline.models.common.latents import cached_posterior, patchify
from pipeline.models.common.model_dir import read_adapter_record, write_config_json
from pipeline.models.common.presets import deep_merge
from pipeline.models.common.qwen import qwen2_config
from pipeline.models.common.text import (
    IMAGE_PLACEHOLDER,
    answer_loss,
    answer_tokens,
    left_pad_prompts,
    masked_mean,
)
from pipeline.models.common.tokenizer import tokenizer_dir
from pipeline.models.common.weights import load_strict, read_state_dict, read_weight_file
from pipeline.models.showo2.config import Showo2Config, options_from_official, showo2_config
from pipeline.models.showo2.flow import (
    resolution_shift,
    sample_timesteps,
    sampling_grid,
    velocity_from_data,
    velocity_latents,
    velocity_rows,
)
from pipeline.models.showo2.layers import (
    FinalLayer,
    ModulatedAttentionBlock,
    PatchEmbed,
    TimestepEmbedder,
    flow_llama_config,
)
from pipeline.models.showo2.processor import (
    Showo2Processor,
    load_tokenizer,
    resize_and_pad,
    to_pil,
    to_tensor,
)
from pipeline.models.showo2.vae import single_frame_fast_path

TOKENIZER_HINT = "tokenizer_path (the Qwen2.5-Instruct tokenizer directory)"


def omni_attention_mask(
    length: int, offsets: Tensor, span: int, dtype: torch.dtype, key_valid: Tensor | None = None
) -> Tensor:
    """Additive mask [B, 1, L, L]: causal, plus full attention inside ``[offset, offset+span)``.

    ``key_valid`` [B, L] hides keys (left padding); every query still sees itself.
    """
    pos = torch.arange(length, device=offsets.device)
    allowed = (pos[None, :, None] >= pos[None, None, :]).expand(len(offsets), -1, -1)
    inside = (pos[None] >= offsets[:, None]) & (pos[None] < offsets[:, None] + span)
    allowed = allowed | (inside[:, :, None] & inside[:, None, :])
    if key_valid is not None:
        allowed = (allowed & key_valid[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=offsets.device
        )
    additive = torch.zeros(allowed.shape, dtype=dtype, device=offsets.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class Showo2(MLLMAdapter):
    """The Show-o2 adapter. Top-level attribute names are the released checkpoint's key prefixes.

    The dual-path tokenizer always trains; the LLM and the flow head per ``config.trainable``.
    """

    family = "showo2"
    ENCODER_PREFIXES = (
        "image_embedder_und.",
        "image_embedder_gen.",
        "position_embedding.",
        "und_trans.",
        "fusion_proj.",
    )
    TRAINABLE_GROUPS = {
        "llm": ("showo.",),
        "flow_head": (
            "time_embed.",
            "time_embed_proj.",
            "diff_proj.",
            "diffusion_head_a.",
            "diffusion_head_b.",
        ),
    }
    LATENT_TASKS = ("i2t", "t2i")
    config: Showo2Config
    vae: AutoencoderKLWan

    def __init__(
        self,
        config: Showo2Config,
        tokenizer: PreTrainedTokenizerBase | None = None,
        vae: AutoencoderKLWan | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = self._vocab_size(config.llm.vocab_size, tokenizer)
        width, sem, flow = config.llm.hidden_size, config.semantic, config.flow_head
        z_dim, patch = config.vae.z_dim, config.patch_size

        self.showo = Qwen2ForCausalLM(
            qwen2_config(config.llm, self.vocab_size, config.attn_implementation)
        )
        self.image_embedder_und = PatchEmbed(z_dim, sem.hidden_size, patch)
        self.image_embedder_gen = PatchEmbed(z_dim, width, patch)
        self.position_embedding = nn.Embedding(sem.num_positions, sem.hidden_size)
        self.und_trans = SiglipEncoder(self._siglip_config())
        self.fusion_proj = nn.Sequential(
            LlamaRMSNorm(sem.hidden_size + width),
            nn.Linear(sem.hidden_size + width, width),
            nn.GELU(),
            nn.Linear(width, width),
        )
        self.time_embed = TimestepEmbedder(flow.hidden_size)
        self.diff_proj: nn.Module | None = None
        self.time_embed_proj: nn.Module | None = None
        if width != flow.hidden_size:
            self.diff_proj = nn.Sequential(
                nn.Linear(width, flow.hidden_size),
                nn.GELU(),
                nn.Linear(flow.hidden_size, flow.hidden_size),
            )
            self.time_embed_proj = nn.Linear(flow.hidden_size, width)
        head_config = flow_llama_config(flow)
        self.diffusion_head_a = nn.ModuleList(
            ModulatedAttentionBlock(head_config) for _ in range(flow.num_layers)
        )
        self.diffusion_head_b = FinalLayer(flow.hidden_size, config.latent_patch_dim)
        self.flow_rotary = LlamaRotaryEmbedding(head_config)
        self.vae = single_frame_fast_path(
            vae if vae is not None else AutoencoderKLWan(**to_dict(config.vae))
        )
        self.vae.requires_grad_(False)
        self.processor = Showo2Processor(tokenizer, config) if tokenizer is not None else None
        self._init_show_o2_weights()
        self._set_trainable()
        if config.gradient_checkpointing:
            self.showo.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )

    # ----------------------------------------------------------------- construction

    def _siglip_config(self) -> SiglipVisionConfig:
        sem = self.config.semantic
        return SiglipVisionConfig(
            hidden_size=sem.hidden_size,
            intermediate_size=sem.intermediate_size,
            num_hidden_layers=sem.num_layers,
            num_attention_heads=sem.num_attention_heads,
            layer_norm_eps=sem.layer_norm_eps,
            attn_implementation=self.config.attn_implementation,
        )

    def _init_show_o2_weights(self) -> None:
        """The official ``reset_parameters``: xavier linears, N(0, 0.02) time MLP, zero adaLN and
        output."""
        for module in (self.image_embedder_und, self.image_embedder_gen):
            nn.init.xavier_uniform_(module.proj.weight.view(module.proj.weight.shape[0], -1))
            nn.init.zeros_(module.proj.bias)
        for root in (self.und_trans, self.fusion_proj, self.diffusion_head_a):
            for module in root.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.diffusion_head_a:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for layer in (self.diffusion_head_b.adaLN_modulation[1], self.diffusion_head_b.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ----------------------------------------------------------------- shared pieces

    @property
    def _dtype(self) -> torch.dtype:
        return self.fusion_proj[1].weight.dtype

    @torch.no_grad()
    def vae_posterior(self, pixels: Tensor) -> dict[str, Tensor]:
        """Pixels [B, 3, H, W] in [-1, 1] → the Wan posterior's ``mean`` and ``std``, [B, C, H/8,
        W/8] each (one frame)."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)[:, :, None]).latent_dist
        return {"mean": posterior.mean[:, :, 0], "std": posterior.std[:, :, 0]}

    @torch.no_grad()
    def latents_from(
        self,
        posterior: Mapping[str, Tensor],
        *,
        sample: bool,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A Wan posterior (:meth:`vae_posterior`) → normalised latents [B, C, h, w].

        Like the official ``WanVAE.sample``: ``(μ − mean)/std`` plus, when ``sample``, the posterior
        std times unit noise (the noise is not divided by ``std``; the released models trained so).
        """
        mu = posterior["mean"]
        mean = filled(self.config.vae.latents_mean, mu.device).view(1, -1, 1, 1)
        std = filled(self.config.vae.latents_std, mu.device).view(1, -1, 1, 1)
        latents = (mu.float() - mean) / std
        if sample:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device)
            latents = latents + posterior["std"].float() * noise
        return latents.to(self._dtype)

    def encode_latents(
        self, pixels: Tensor, *, sample: bool, generator: torch.Generator | None = None
    ) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] → normalised Wan latents [B, C, H/8, W/8]."""
        return self.latents_from(self.vae_posterior(pixels), sample=sample, generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] → pixels [B, 3, H, W] in [-1, 1]."""
        mean = filled(self.config.vae.latents_mean, latents.device).view(1, -1, 1, 1, 1)
        std = filled(self.config.vae.latents_std, latents.device).view(1, -1, 1, 1, 1)
        raw = latents.float()[:, :, None] * std + mean
        return self.vae.decode(raw.to(self.vae.dtype)).sample[:, :, 0].float()

    def autoencoder_pass(
        self, pixels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(pixels.to(self.vae.dtype)[:, :, None]).latent_dist
        latents = posterior.mean
        if generator is not None:
            latents = latents + posterior.std * torch.randn(
                latents.shape, generator=generator, device=latents.device
            )
        return self.vae.decode(latents).sample[:, :, 0].float(), posterior.kl().mean()

    def autoencoder_options(self, pixels: Tensor) -> dict[str, Any]:
        """Per-channel mean and std of the posterior means, as the released ``latents_mean/std``."""
        means = in_chunks(
            lambda x: self.vae.encode(x.to(self.vae.dtype)[:, :, None]).latent_dist.mean.float(),
            pixels,
        )
        return {
            "vae": {
                "latents_mean": means.mean(dim=(0, 2, 3, 4)).tolist(),
                "latents_std": means.std(dim=(0, 2, 3, 4)).clamp_min(1e-3).tolist(),
            }
        }

    def _positions(self) -> Tensor:
        """SigLIP position embeddings for the token grid, bicubic-resized when the grid differs."""
        weight = self.position_embedding.weight
        grid = self.config.grid_size
        if weight.shape[0] == grid * grid:
            return weight[None]
        side = int(round(weight.shape[0] ** 0.5))
        square = weight.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(
            square.float(), size=(grid, grid), mode="bicubic", align_corners=False
        )
        return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(weight.dtype)

    def _maybe_checkpoint(self, layer: nn.Module, *args: Any) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode_shared_tokens(self, latents: Tensor) -> Tensor:
        """``V_enc``: normalised latents [B, C, h, w] → shared visual tokens [B, N, D]."""
        semantic = self.image_embedder_und(latents) + self._positions()
        for layer in self.und_trans.layers:
            semantic = self._maybe_checkpoint(layer, semantic, None)
        low_level = self.image_embedder_gen(latents)
        return self.fusion_proj(torch.cat([semantic, low_level], dim=-1))

    def _time_embeddings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Flow-head conditioning [B, F] and the LLM time token [B, D] for timesteps ``t``."""
        t_emb = self.time_embed(t)
        return t_emb, (self.time_embed_proj(t_emb) if self.time_embed_proj is not None else t_emb)

    def _llm_inputs(
        self, input_ids: Tensor, offsets: Tensor, time_tokens: Tensor, image_tokens: Tensor
    ) -> Tensor:
        """Token embeddings with each image slot filled: the time token, then the N visual
        tokens."""
        embeds = self.showo.model.embed_tokens(input_ids)
        n = image_tokens.shape[1]
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None]
        cols = offsets[:, None] + torch.arange(n + 1, device=input_ids.device)[None]
        slots = torch.cat(
            [time_tokens[:, None].to(embeds.dtype), image_tokens.to(embeds.dtype)], dim=1
        )
        return embeds.index_put((rows.expand_as(cols), cols), slots)

    def _image_span(self, length: int, offsets: Tensor) -> Tensor:
        pos = torch.arange(length, device=offsets.device)[None]
        inside = (pos >= offsets[:, None]) & (
            pos < offsets[:, None] + self.config.num_image_tokens + 1
        )
        return inside[..., None].to(self._dtype)

    def _velocity(
        self, hidden: Tensor, t_emb: Tensor, offsets: Tensor, mask: Tensor, noisy: Tensor, t: Tensor
    ) -> Tensor:
        """Flow head on the LLM's last hidden states → velocity rows [B, N, p·p·C] of the image
        tokens.

        ``noisy`` [B, C, h, w] are the latents x_t the visual tokens were encoded from.
        """
        h = self.diff_proj(hidden) if self.diff_proj is not None else hidden
        length = h.shape[1]
        span = self._image_span(length, offsets)
        rope = self.flow_rotary(h, torch.arange(length, device=h.device)[None])
        for block in self.diffusion_head_a:
            h = self._maybe_checkpoint(block, h, t_emb, span, mask, rope)
        out = self.diffusion_head_b(h, t_emb, span)
        n = self.config.num_image_tokens
        index = (offsets[:, None] + 1 + torch.arange(n, device=h.device)[None])[..., None]
        rows = out.gather(1, index.expand(-1, -1, out.shape[-1]))
        if self.config.flow_prediction == "velocity":
            return rows
        noisy_rows = velocity_rows(noisy, self.config.patch_size, self.config.flow_layout)
        return velocity_from_data(rows, noisy_rows.to(rows.dtype), t)

    def _run_llm(
        self, input_ids: Tensor, offsets: Tensor, image_tokens: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """LLM last hidden states, flow conditioning and mask for visual tokens at timesteps
        ``t``."""
        t_emb, time_tokens = self._time_embeddings(t)
        embeds = self._llm_inputs(input_ids, offsets, time_tokens, image_tokens)
        mask = omni_attention_mask(
            input_ids.shape[1], offsets, self.config.num_image_tokens + 1, embeds.dtype
        )
        hidden = self.showo.model(
            inputs_embeds=embeds, attention_mask={"full_attention": mask}
        ).last_hidden_state
        return hidden, t_emb, mask

    # ----------------------------------------------------------------- training step

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        *,
        infotok_inputs: bool = True,
    ) -> MLLMOutput:
        """One training step of both branches in one LLM pass (as the official mixed batches).

        Random draws, in order, from ``generator``: the VAE posterior noise of every image (train
        mode), the flow noise x0 of the T2I latents, the logit-normal variables of their timesteps.
        I2T images enter clean at t = 1 (official ``und_max_t0 = 1``), so ``z_u`` is the task
        tensor itself. T2I images enter noisy; ``z_g`` is a second ``V_enc`` pass over the clean
        latents, batched with the task pass.
        """
        input_ids, offsets = batch["input_ids"], batch["image_offset"]
        und, gen = batch["und_index"], batch["gen_index"]
        device = input_ids.device
        x1 = self.latents_from(
            cached_posterior(batch) or self.vae_posterior(batch["pixel_values"]),
            sample=self.config.sample_vae_posterior and self.training,
            generator=generator,
        )
        x1_gen = x1.index_select(0, gen)
        latents, t = x1, torch.ones(len(x1), device=device)
        if len(gen):
            x0 = torch.randn(x1_gen.shape, generator=generator, device=device).to(x1.dtype)
            shift = self.config.train_time_shift
            if shift is None:
                shift = resolution_shift(self.config.num_image_tokens + 1)
            t_gen = sample_timesteps(len(gen), shift, generator, device)
            t_view = t_gen.view(-1, 1, 1, 1).to(x1.dtype)
            latents = x1.index_copy(0, gen, t_view * x1_gen + (1 - t_view) * x0)
            t = t.index_copy(0, gen, t_gen)
        clean_gen = x1_gen if infotok_inputs else x1[:0]
        tokens = self.encode_shared_tokens(torch.cat([latents, clean_gen]))
        task_tokens, clean_gen_tokens = tokens[: len(x1)], tokens[len(x1) :]
        hidden, t_emb, mask = self._run_llm(input_ids, offsets, task_tokens, t)
        slots = self.config.num_image_tokens + 1
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
            num_text_tokens=batch["lengths"].sum() - slots * len(x1),
            num_image_tokens=self.config.num_image_tokens * len(x1),
        )
        if len(und):
            labels = batch["labels"].index_select(0, und)
            hidden_u = hidden.index_select(0, und)
            # An I2T row's BOS and image block (<boi>, the slots, <eoi>) are no answer tokens.
            max_answer = batch.get("max_answer", max(labels.shape[1] - slots - 3, 1))
            out.loss_i2t = answer_loss(self.showo.lm_head, hidden_u, labels, max_answer)
            out.z_u = task_tokens.index_select(0, und)
            out.text_u = masked_mean(hidden_u, batch["text_mask"].index_select(0, und))
            out.answer_ids, out.answer_mask = answer_tokens(labels, max_answer)
        if len(gen):
            # A gather per consumer of ``hidden``: one shared gather would reorder the sum of
            # their gradients (same value up to float rounding).
            velocity = self._velocity(
                hidden.index_select(0, gen),
                t_emb.index_select(0, gen),
                offsets.index_select(0, gen),
                mask.index_select(0, gen),
                latents.index_select(0, gen),
                t_gen,
            )
            target = velocity_rows(x1_gen - x0, self.config.patch_size, self.config.flow_layout)
            out.loss_t2i = F.mse_loss(velocity.float(), target.float())
            out.z_g = clean_gen_tokens if infotok_inputs else None
            out.text_g = masked_mean(
                hidden.index_select(0, gen), batch["text_mask"].index_select(0, gen)
            )
            out.target_patches = patchify(x1_gen, self.config.patch_size, "pqc")
            out.target_mask = torch.ones(
                out.target_patches.shape[:2], dtype=torch.bool, device=device
            )
        return out

    # ----------------------------------------------------------------- inference

    def _processor(self) -> Showo2Processor:
        if self.processor is None:
            raise RuntimeError(
                "this Show-o2 model was built without a tokenizer; pass tokenizer_path"
            )
        return self.processor

    @property
    def _device(self) -> torch.device:
        return self.fusion_proj[1].weight.device

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """Euler flow-matching sampler (official ``sample_ode``) with classifier-free guidance.

        ``v = v_uncond + s·(v_cond − v_uncond)`` with the empty prompt as unconditional input;
        ``s = 0`` disables guidance. ``generator`` (on the model's device) draws the start noise.
        """
        processor = self._processor()
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        steps = num_steps or self.config.num_inference_steps
        sequences = [processor.t2i_sequence(p) for p in prompts]
        if scale > 0:
            sequences += [processor.t2i_sequence("") for _ in prompts]
        batch = processor.pad_sequences(sequences)
        ids, offsets = batch["input_ids"].to(self._device), batch["image_offset"].to(self._device)
        size, channels = self.config.latent_size, self.config.vae.z_dim
        z = torch.randn(
            len(prompts), channels, size, size, generator=generator, device=self._device
        )
        grid = sampling_grid(steps, self.config.time_shifting_factor).tolist()
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            x = (torch.cat([z, z]) if scale > 0 else z).to(self._dtype)
            t = torch.full((len(x),), t_now, device=self._device)
            hidden, t_emb, mask = self._run_llm(ids, offsets, self.encode_shared_tokens(x), t)
            rows = self._velocity(hidden, t_emb, offsets, mask, x, t).float()
            velocity = velocity_latents(
                rows, channels, size, self.config.patch_size, self.config.flow_layout
            )
            if scale > 0:
                v_cond, v_uncond = velocity.chunk(2)
                velocity = v_uncond + scale * (v_cond - v_uncond)
            z = z + (t_next - t_now) * velocity
        return to_pil(self.decode_latents(z))

    @torch.no_grad()
    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy decoding with a KV cache over left-padded prompts (clean images at t = 1)."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        processor = self._processor()
        conversations = [
            [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{q}"}] for q in questions
        ]
        sequences = [processor.i2t_sequence(c) for c in conversations]
        ids, offsets, key_valid = left_pad_prompts(sequences, processor.ids.pad, self._device)
        positions = (key_valid.long().cumsum(1) - 1).clamp_min(0)
        pixels = torch.stack(
            [to_tensor(resize_and_pad(im.convert("RGB"), self.config.image_size)) for im in images]
        )
        tokens = self.encode_shared_tokens(
            self.encode_latents(pixels.to(self._device), sample=False)
        )
        _, time_tokens = self._time_embeddings(torch.ones(len(images), device=self._device))
        embeds = self._llm_inputs(ids, offsets, time_tokens, tokens)
        mask = omni_attention_mask(
            ids.shape[1], offsets, self.config.num_image_tokens + 1, embeds.dtype, key_valid
        )
        cache = DynamicCache(config=self.showo.config)
        hidden = self.showo.model(
            inputs_embeds=embeds,
            attention_mask={"full_attention": mask},
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state

        def step(next_ids: Tensor) -> Tensor:
            nonlocal key_valid, positions
            key_valid = torch.cat([key_valid, torch.ones_like(key_valid[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            step_mask = torch.zeros(key_valid.shape, dtype=embeds.dtype, device=self._device)
            step_mask = step_mask.masked_fill(~key_valid, torch.finfo(embeds.dtype).min)[
                :, None, None
            ]
            return self.showo.model(
                input_ids=next_ids[:, None],
                attention_mask={"full_attention": step_mask},
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state

        rows = greedy_decode(hidden, step, self.showo.lm_head, processor.ids.eos, max_new_tokens)
        return decode_texts(processor.tokenizer, rows)

    # ----------------------------------------------------------------- checkpoints

    def save_pretrained(self, path: str | Path) -> None:
        """Released layout: ``config.json`` (official fields + this adapter's config), weights,
        tokenizer files and the VAE in ``vae/`` (diffusers format)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        grid = self.config.grid_size
        official = {
            "_class_name": "Showo2Qwen2_5",
            "llm_vocab_size": self.vocab_size,
            "hidden_size": self.config.llm.hidden_size,
            "image_latent_dim": self.config.vae.z_dim,
            "image_latent_height": grid,
            "image_latent_width": grid,
            "video_latent_height": grid,
            "video_latent_width": grid,
            "patch_size": self.config.patch_size,
            "clip_latent_dim": self.config.semantic.hidden_size,
            "num_diffusion_layers": self.config.flow_head.num_layers,
            "add_time_embeds": True,
            "add_qk_norm": True,
            "load_from_showo": True,
        }
        write_config_json(path, official, self.family, self.saved_config())
        self._save_weights(path, tied_lm_head="showo.lm_head.weight")
        self.vae.save_pretrained(str(path / "vae"))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        vae_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        options: dict[str, Any] | None = None,
        preset: str | None = None,
    ) -> Showo2:
        """Load a released (``showlab/show-o2-*``) or exported checkpoint directory.

        The size comes from its ``config.json`` (``preset`` names it for a released-format config
        of another width); ``options`` override settings on top.
        The tokenizer is read from ``tokenizer_path`` or ``path`` (released checkpoints need the
        Qwen2.5-Instruct tokenizer directory); the VAE from ``vae_path`` (``Wan2.1_VAE.pth`` or a
        diffusers ``AutoencoderKLWan`` directory) or ``path/vae``.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist")
        record = read_adapter_record(config_file)
        if record is not None:
            saved = deep_merge(record["config"], options or {})
            config = from_dict(Showo2Config, saved, source=str(config_file))
        else:
            raw = json.loads(config_file.read_text())
            preset, official = options_from_official(raw, preset)
            config = showo2_config(
                preset, deep_merge(official, options or {}), source=str(config_file)
            )
        tokenizer = load_tokenizer(tokenizer_dir([tokenizer_path, path], TOKENIZER_HINT))
        vae = load_vae(vae_path if vae_path is not None else path / "vae", config)
        model = cls._allocated(config, tokenizer, vae)
        optional = {"showo.lm_head.weight"} if config.llm.tie_word_embeddings else set()
        load_strict(
            model,
            read_state_dict(path),
            source=str(path),
            optional=optional,
            ignore_prefixes=("vae.",),
        )
        return model

    @classmethod
    def _allocated(
        cls, config: Showo2Config, tokenizer: PreTrainedTokenizerBase, vae: AutoencoderKLWan
    ) -> Showo2:
        """The model with uninitialised storage (weights are loaded next) and the given VAE."""
        with torch.device("meta"):
            model = cls(config, tokenizer)
        model.to_empty(device="cpu")
        # to_empty re-creates parameters, untying lm_head from embed_tokens
        model.showo.tie_weights()
        # Non-persistent buffers are not in checkpoints: rebuild the RoPE tables.
        model.showo.model.rotary_emb = Qwen2RotaryEmbedding(model.showo.config)
        model.flow_rotary = LlamaRotaryEmbedding(flow_llama_config(config.flow_head))
        model.vae = single_frame_fast_path(vae.requires_grad_(False).eval())
        return model

    @classmethod
    def build(cls, config: ModelConfig) -> Showo2:
        if config.path:
            return cls.from_pretrained(
                config.path,
                vae_path=config.vae_path,
                tokenizer_path=config.tokenizer_path,
                options=config.options,
            )
        cfg = showo2_config(config.preset, config.options)
        tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        vae = load_vae(config.vae_path, cfg) if config.vae_path else None
        return cls(cfg, tokenizer, vae)


def load_vae(source: str | Path, config: Showo2Config) -> AutoencoderKLWan:
    """The frozen Wan2.1 VAE from a diffusers directory or an original/diffusers weight file."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file():
        vae = AutoencoderKLWan.from_pretrained(
            str(source), local_files_only=True, low_cpu_mem_usage=False
        )
        if vae.config.z_dim != config.vae.z_dim:
            raise ConfigError(
                f"VAE {source} has z_dim {vae.config.z_dim}, the model expects {config.vae.z_dim}"
            )
        return vae.requires_grad_(False).eval()
    if not source.is_file():
        raise FileNotFoundError(
            f"no VAE at {source}: pass vae_path (Wan2.1_VAE.pth or a diffusers AutoencoderKLWan "
            "directory)"
        )
    state = read_weight_file(source)
    if any(key.startswith(("encoder.middle.", "encoder.conv1.")) for key in state):
        state = convert_wan_vae_to_diffusers(state)
    vae = AutoencoderKLWan(**to_dict(config.vae))
    load_strict(vae, state, source=str(source))
    return vae.requires_grad_(False).eval()
