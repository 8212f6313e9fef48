"""OpenUni (wusize/OpenUni, ``OpenUniInternVL3SANAHF``) as an InfoTok adapter.

Architecture as released: InternVL3 ``lmm`` (InternViT ``vision_model``, pixel shuffle and
``mlp1``, the Qwen2.5 ``language_model``), ``meta_queries`` appended to the T2I prompt, the
LLM's last hidden states of the queries through the SigLIP-style ``connector`` and the
``projector`` into the caption width of the SANA diffusion transformer ``transformer``, which
denoises DC-AE latents (``vae``) by flow matching.

OpenUni trains no understanding loss and its two tasks share no tokens, so the adapter defines
the shared tokenizer ``V_enc`` as InfoTok applies it: InternVL3's image path (InternViT + pixel
shuffle + ``mlp1``). ``z_u`` are its tokens of the understanding image, which the LLM reads
inside InternVL3's own chat template for a text cross-entropy (``loss_i2t``); ``z_g`` are its
tokens of the generation target. ``loss_t2i`` is OpenUni's own loss: its generation path never
reads images through ``V_enc``, so only ``L_InfoTok`` on ``z_g`` ties ``V_enc`` to generation.

Checkpoints (hub ids, read from local paths only): ``wusize/openuni`` ``openuni_*.pth`` hold
``meta_queries``, ``connector``, ``projector`` (and, fine-tuned, ``transformer``) on top of
``OpenGVLab/InternVL3-{1B,2B}``, ``Efficient-Large-Model/Sana_600M_512px_diffusers``,
``Sana_1600M_512px_diffusers`` or ``SANA1.5_1.6B_1024px_diffusers`` and
``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, SanaTransformer2DModel
from PIL import Image
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase, SiglipVisionConfig
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.siglip.modeling_siglip import SiglipEncoder

from pipeline.models.base import MLLMAdapter, MLLMOutput, ModelConfig, in_chunks
from pipeline.models.common.decoding import decode_texts, greedy_decode
from pipeline.models.common.device import filled
from pipeline.models.common.latents import cached_posterior, patchify
from pipeline.models.common.model_dir import write_config_json
from pipeline.models.common.processing import to_pil
from pipeline.models.common.text import answer_loss, answer_tokens, masked_mean, pad_rows
from pipeline.models.common.tokenizer import tokenizer_dir
from pipeline.models.common.weights import load_strict, read_state_dict
from pipeline.models.openuni.config import PRESETS, OpenUniConfig, openuni_config
from pipeline.models.openuni.files import (
    LAYOUT,
    internvl_config_json,
    load_vae,
    locate,
    read_diffusers_weights,
    read_openuni_checkpoint,
)
from pipeline.models.openuni.flow import (
    flow_matching_loss,
    sample_timesteps,
    sampling_scheduler,
    training_scheduler,
)
from pipeline.models.openuni.internvl import InternVLChat
from pipeline.models.openuni.processor import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAD_ID,
    OpenUniProcessor,
    load_tokenizer,
    vit_tensor,
)

TOKENIZER_HINT = "tokenizer_path (the InternVL3 directory holds it)"


class OpenUni(MLLMAdapter):
    """The OpenUni adapter. Top-level attribute names are the released checkpoints' key prefixes.

    ``V_enc`` (InternViT + ``mlp1``) always trains; the LLM, OpenUni's own modules and the DiT per
    ``config.trainable``; the DC-AE is the frozen ``vae``.
    """

    family = "openuni"
    ENCODER_PREFIXES = ("lmm.vision_model.", "lmm.mlp1.")
    TRAINABLE_GROUPS = {
        "llm": ("lmm.language_model.",),
        "connector": ("meta_queries", "connector.", "projector."),
        "transformer": ("transformer.",),
    }
    LATENT_TASKS = ("t2i",)
    config: OpenUniConfig
    vae: AutoencoderDC

    def __init__(
        self,
        config: OpenUniConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
        vae: AutoencoderDC | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = self._vocab_size(config.llm.vocab_size, tokenizer)
        width = config.llm.hidden_size
        self.lmm = InternVLChat(
            config.vision,
            config.llm,
            self.vocab_size,
            config.downsample_ratio,
            config.attn_implementation,
        )
        self.meta_queries = nn.Parameter(torch.zeros(config.num_queries, width))
        self.connector = SiglipEncoder(self._connector_config())
        self.projector = nn.Linear(config.connector.hidden_size, config.sana.caption_channels)
        self.transformer = SanaTransformer2DModel(**self._sana_kwargs())
        self.vae = vae if vae is not None else AutoencoderDC(**config.vae.diffusers_kwargs())
        self.vae.requires_grad_(False)
        self.train_scheduler = training_scheduler(config.num_train_timesteps, config.train_shift)
        self.processor = OpenUniProcessor(tokenizer, config) if tokenizer is not None else None
        self._init_openuni_weights()
        self._set_trainable()
        if config.gradient_checkpointing:
            self.lmm.language_model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            self.lmm.vision_model.gradient_checkpointing = True
            self.transformer.enable_gradient_checkpointing()

    # ----------------------------------------------------------------- construction

    def _connector_config(self) -> SiglipVisionConfig:
        c = self.config.connector
        return SiglipVisionConfig(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            layer_norm_eps=c.layer_norm_eps,
            hidden_act="gelu_pytorch_tanh",
            attn_implementation=self.config.attn_implementation,
        )

    def _sana_kwargs(self) -> dict[str, Any]:
        s, channels = self.config.sana, self.config.vae.latent_channels
        return {
            "in_channels": channels,
            "out_channels": channels,
            "num_attention_heads": s.num_attention_heads,
            "attention_head_dim": s.attention_head_dim,
            "num_layers": s.num_layers,
            "num_cross_attention_heads": s.num_cross_attention_heads,
            "cross_attention_head_dim": s.cross_attention_head_dim,
            "cross_attention_dim": s.inner_dim,
            "caption_channels": s.caption_channels,
            "mlp_ratio": s.mlp_ratio,
            "attention_bias": False,
            "sample_size": self.config.latent_size,
            "patch_size": 1,
            "norm_elementwise_affine": False,
            "norm_eps": s.norm_eps,
            "interpolation_scale": None,
            "qk_norm": s.qk_norm,
        }

    def _init_openuni_weights(self) -> None:
        """OpenUni's own modules: queries N(0, 1/width), connector as
        ``ConnectorEncoder.init_weights``."""
        with torch.no_grad():
            nn.init.normal_(self.meta_queries, std=1 / math.sqrt(self.config.llm.hidden_size))
            for layer in self.connector.layers:
                attn, mlp = layer.self_attn, layer.mlp
                for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.zeros_(linear.bias)
                for linear in (mlp.fc1, mlp.fc2):
                    nn.init.xavier_uniform_(linear.weight)
                    nn.init.normal_(linear.bias, std=1e-6)
                for norm in (layer.layer_norm1, layer.layer_norm2):
                    nn.init.ones_(norm.weight)
                    nn.init.zeros_(norm.bias)
            self.projector.reset_parameters()

    # ----------------------------------------------------------------- shared pieces

    @property
    def _dtype(self) -> torch.dtype:
        return self.meta_queries.dtype

    @property
    def _device(self) -> torch.device:
        return self.meta_queries.device

    @property
    def _llm(self) -> nn.Module:
        return self.lmm.language_model

    def encode_shared_tokens(self, vit_pixels: Tensor) -> Tensor:
        """``V_enc``: ViT-normalised pixels [B, 3, S, S] → shared visual tokens [B, N, D]."""
        return self.lmm.extract_feature(vit_pixels.to(self._dtype))

    def vit_input(self, pixels: Tensor) -> Tensor:
        """Generation pixels in [-1, 1] → ViT input (OpenUni ``get_semantic_features``: bilinear
        resize)."""
        mean = filled(IMAGENET_MEAN, pixels.device).view(1, 3, 1, 1)
        std = filled(IMAGENET_STD, pixels.device).view(1, 3, 1, 1)
        x = ((pixels.float() + 1) / 2 - mean) / std
        size = self.config.vision.image_size
        return F.interpolate(x, size=(size, size), mode="bilinear")

    @torch.no_grad()
    def vae_posterior(self, pixels: Tensor) -> dict[str, Tensor]:
        """Pixels in [-1, 1] → the DC-AE's ``latent`` (a deterministic autoencoder)."""
        return {"latent": self.vae.encode(pixels.to(self.vae.dtype)).latent}

    def scaled_latents(self, latent: Tensor) -> Tensor:
        """DC-AE latents × ``scaling_factor`` (``pixels_to_latents``)."""
        return (latent * self.vae.config.scaling_factor).to(self._dtype)

    def encode_latents(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] → DC-AE latents × ``scaling_factor``."""
        return self.scaled_latents(self.vae_posterior(pixels)["latent"])

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        return self.vae.decode(
            latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        ).sample.float()

    def autoencoder_pass(
        self, pixels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """DC-AE is deterministic: no posterior, no KL (``generator`` is not used)."""
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent
        return self.vae.decode(latents).sample.float(), latents.new_zeros(())

    def autoencoder_options(self, pixels: Tensor) -> dict[str, Any]:
        """``vae.scaling_factor`` as SANA's: one over the std of the latents."""
        latents = in_chunks(lambda x: self.vae.encode(x.to(self.vae.dtype)).latent.float(), pixels)
        return {"vae": {"scaling_factor": 1 / max(float(latents.std()), 1e-3)}}

    def _image_embeds(self, input_ids: Tensor, tokens: Tensor) -> Tensor:
        """Token embeddings with the ``<IMG_CONTEXT>`` slots replaced by ``tokens`` [B, N, D] in
        order."""
        embeds = self._llm.get_input_embeddings()(input_ids)
        slots = (input_ids == self._processor().ids.img_context)[..., None]
        return embeds.masked_scatter(slots, tokens.to(embeds.dtype))

    def _run_llm(
        self, embeds: Tensor, padding_mask: Tensor | None, position_ids: Tensor | None = None
    ) -> Tensor:
        """Last hidden states of the LLM over whole sequences (no cache), with no host sync.

        ``transformers`` reads a 2-D mask (or, without one, the positions) on the host to decide
        whether SDPA's ``is_causal`` can replace it, so the mask is prepared here: materialised
        from ``padding_mask``, or plain causal when the caller knows there is no padding (None).
        Positions are below the sequence length, so dynamic RoPE needs no host read either.
        """
        mask = create_causal_mask(
            config=self._llm.config,
            inputs_embeds=embeds,
            attention_mask=padding_mask,
            cache=None,
            allow_is_causal_skip=padding_mask is None,
        )
        with self.lmm.positions_below(embeds.shape[1]):
            return self._llm.model(
                inputs_embeds=embeds,
                attention_mask={"full_attention": mask},
                position_ids=position_ids,
                use_cache=False,
            ).last_hidden_state

    def condition(
        self, input_ids: Tensor, attention_mask: Tensor, *, padded: bool = True
    ) -> tuple[Tensor, Tensor]:
        """DiT conditions [B, Q, caption] from prompt + meta queries, and the prompt's hidden
        states.

        As ``prepare_forward_input``: queries follow the right-padded prompt, positions count
        only valid tokens, the LLM is causal. ``padded=False`` promises that no prompt is padded.
        """
        embeds = self._llm.get_input_embeddings()(input_ids)
        b, q = len(input_ids), self.config.num_queries
        queries = self.meta_queries[None].expand(b, -1, -1).to(embeds.dtype)
        mask = torch.cat(
            [attention_mask.bool(), attention_mask.new_ones(b, q, dtype=torch.bool)], dim=1
        )
        positions = (mask.long().cumsum(1) - 1).clamp_min(0)
        hidden = self._run_llm(
            torch.cat([embeds, queries], dim=1), mask if padded else None, positions
        )
        conditions = self.projector(self.connector(inputs_embeds=hidden[:, -q:]).last_hidden_state)
        return conditions, hidden[:, :-q]

    # ----------------------------------------------------------------- training step

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        *,
        infotok_inputs: bool = True,
    ) -> MLLMOutput:
        """Both task losses and the InfoTok inputs.

        Random draws, in order, from ``generator`` (T2I only): the flow noise ε of the target
        latents, then the uniform variables of their timesteps.
        """
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
        if "i2t_input_ids" in batch:
            self._understanding(batch, out)
        if "t2i_input_ids" in batch:
            self._generation(batch, out, generator, infotok_inputs)
        return out

    def _understanding(self, batch: Mapping[str, Any], out: MLLMOutput) -> None:
        ids, labels, mask = batch["i2t_input_ids"], batch["i2t_labels"], batch["i2t_attention_mask"]
        z_u = self.encode_shared_tokens(batch["i2t_pixel_values"])
        embeds = self._image_embeds(ids, z_u)
        # Host-side facts from collate; a batch made otherwise gets the safe defaults.
        hidden = self._run_llm(embeds, mask if batch.get("i2t_padded", True) else None)
        max_answer = batch.get("i2t_max_answer", labels.shape[1])
        out.loss_i2t = answer_loss(self._llm.lm_head, hidden, labels, max_answer)
        out.z_u = z_u
        out.text_u = masked_mean(hidden, batch["i2t_text_mask"])
        out.answer_ids, out.answer_mask = answer_tokens(labels, max_answer)
        out.num_text_tokens += mask.sum() - z_u.shape[0] * z_u.shape[1]
        out.num_image_tokens += z_u.shape[0] * z_u.shape[1]

    def _generation(
        self,
        batch: Mapping[str, Any],
        out: MLLMOutput,
        generator: torch.Generator | None,
        infotok_inputs: bool,
    ) -> None:
        ids, mask, pixels = (
            batch["t2i_input_ids"],
            batch["t2i_attention_mask"],
            batch["t2i_pixel_values"],
        )
        posterior = cached_posterior(batch, "t2i_") or self.vae_posterior(pixels)
        x = self.scaled_latents(posterior["latent"])
        noise = torch.randn(x.shape, generator=generator, device=x.device).to(x.dtype)
        timesteps, sigmas = sample_timesteps(self.train_scheduler, len(x), generator, x.device)
        sigmas = sigmas.view(-1, 1, 1, 1).to(x.dtype)
        noisy = (1.0 - sigmas) * x + sigmas * noise
        conditions, prompt_hidden = self.condition(ids, mask)
        prediction = self.transformer(
            noisy, encoder_hidden_states=conditions, timestep=timesteps, return_dict=False
        )[0]
        out.loss_t2i = flow_matching_loss(prediction, noise - x)
        if infotok_inputs:
            out.z_g = self.encode_shared_tokens(self.vit_input(pixels))
        out.text_g = masked_mean(prompt_hidden, mask)
        # Token n of V_enc covers the same region as latent block n: the ViT sees the target resized
        # to its input, and a token after the 2×2 pixel shuffle spans one cell of the token grid.
        out.target_patches = patchify(x, self.config.latent_patch, "pqc")
        out.target_mask = torch.ones(
            out.target_patches.shape[:2], dtype=torch.bool, device=x.device
        )
        out.num_text_tokens += mask.sum()
        out.num_image_tokens += len(ids) * self.config.num_queries

    # ----------------------------------------------------------------- inference

    def _processor(self) -> OpenUniProcessor:
        if self.processor is None:
            raise RuntimeError(
                "this OpenUni model was built without a tokenizer; pass tokenizer_path"
            )
        return self.processor

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        guidance_scale: float | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Image.Image]:
        """SANA's flow DPM-Solver with classifier-free guidance (OpenUni ``generate`` /
        ``SanaPipeline``).

        The unconditional input is the CFG prompt; guidance applies when the scale exceeds 1, as in
        ``SanaPipeline``: ``v = v_uncond + s·(v_cond − v_uncond)``. ``generator`` draws the start
        noise.
        """
        processor = self._processor()
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        use_cfg = scale > 1.0
        rows = [processor.t2i_sequence(p)["input_ids"] for p in prompts]
        if use_cfg:
            rows += [processor.t2i_sequence("", message=self.config.cfg_prompt)["input_ids"]] * len(
                prompts
            )
        ids = pad_rows(rows, PAD_ID).to(self._device)
        mask = pad_rows([torch.ones(len(r), dtype=torch.bool) for r in rows], False).to(
            self._device
        )
        conditions, _ = self.condition(ids, mask, padded=len({len(r) for r in rows}) > 1)
        if use_cfg:
            cond, uncond = conditions.chunk(2)
            conditions = torch.cat([uncond, cond])
        size, channels = self.config.latent_size, self.config.vae.latent_channels
        latents = torch.randn(
            len(prompts), channels, size, size, generator=generator, device=self._device
        )
        scheduler = sampling_scheduler(self.config.num_train_timesteps, self.config.flow_shift)
        scheduler.set_timesteps(num_steps or self.config.num_inference_steps, device=self._device)
        for t in scheduler.timesteps:
            inputs = torch.cat([latents, latents]) if use_cfg else latents
            velocity = self.transformer(
                inputs.to(self._dtype),
                encoder_hidden_states=conditions,
                timestep=t.expand(len(inputs)),
                return_dict=False,
            )[0].float()
            if use_cfg:
                v_uncond, v_cond = velocity.chunk(2)
                velocity = v_uncond + scale * (v_cond - v_uncond)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return to_pil(self.decode_latents(latents))

    @torch.no_grad()
    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str], *, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy decoding with a KV cache over left-padded InternVL3 chat prompts."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions")
        processor = self._processor()
        rows = [
            processor.i2t_sequence([{"role": "user", "content": q}])["input_ids"] for q in questions
        ]
        ids = pad_rows(rows, PAD_ID, left=True).to(self._device)
        mask = pad_rows([torch.ones(len(r), dtype=torch.long) for r in rows], 0, left=True).to(
            self._device
        )
        pixels = torch.stack([vit_tensor(im, self.config.vision.image_size) for im in images]).to(
            self._device
        )
        embeds = self._image_embeds(ids, self.encode_shared_tokens(pixels))
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache(config=self._llm.config)
        hidden = self._llm.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state

        def step(next_ids: Tensor) -> Tensor:
            nonlocal mask, positions
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            return self._llm.model(
                input_ids=next_ids[:, None],
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            ).last_hidden_state

        rows = greedy_decode(hidden, step, self._llm.lm_head, processor.ids.im_end, max_new_tokens)
        return [text.strip() for text in decode_texts(processor.tokenizer, rows)]

    # ----------------------------------------------------------------- checkpoints

    def save_pretrained(self, path: str | Path) -> None:
        """The released layout, one directory per component, plus this adapter's config.

        ``internvl3/`` (InternVL3 ``config.json``, weights keyed ``vision_model.*``, ``mlp1.*``,
        ``language_model.*``, tokenizer), ``sana/transformer/`` and ``vae/`` (diffusers
        directories), ``openuni.pth`` (``meta_queries``, ``connector.*``, ``projector.*``) and a
        ``config.json`` naming them.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = self.saved_config()
        cfg["internvl_path"] = cfg["sana_path"] = None
        write_config_json(
            path, {"_class_name": "OpenUniInternVL3SANAHF", **LAYOUT}, self.family, cfg
        )
        internvl = path / LAYOUT["internvl"]
        self._save_weights(internvl, tied_lm_head="language_model.lm_head.weight", prefix="lmm.")
        (internvl / "config.json").write_text(
            json.dumps(internvl_config_json(self.config, self.vocab_size), indent=2) + "\n"
        )
        state = self.checkpoint_state_dict()
        self.transformer.save_pretrained(str(path / LAYOUT["sana"] / "transformer"))
        self.vae.save_pretrained(str(path / LAYOUT["vae"]))
        own = self.TRAINABLE_GROUPS["connector"]
        torch.save(
            {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(own)},
            path / LAYOUT["checkpoint"],
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None,
        *,
        internvl_path: str | Path | None = None,
        sana_path: str | Path | None = None,
        vae_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        options: dict[str, Any] | None = None,
        preset: str | None = None,
    ) -> OpenUni:
        """Assemble OpenUni from local files.

        ``path`` is a directory written by :meth:`save_pretrained`, or a released ``openuni_*.pth``
        (a file, or a directory holding one) whose base models come from ``internvl_path``
        (InternVL3), ``sana_path`` (SANA diffusers directory or its ``transformer/``) and
        ``vae_path`` (DC-AE diffusers directory); the first two may also be
        ``options.internvl_path`` / ``options.sana_path``. ``path=None`` starts from the base
        models alone (OpenUni's pre-training start: fresh queries, connector and projector).
        ``preset`` names the size when the base models are not a released pair; ``options``
        override settings on top. Every part is checked key by key against the model.
        """
        parts = locate(
            path,
            internvl_path=internvl_path,
            sana_path=sana_path,
            vae_path=vae_path,
            preset=preset,
            options=dict(options or {}),
        )
        config = parts.config
        tokenizer = load_tokenizer(tokenizer_dir([tokenizer_path, parts.internvl], TOKENIZER_HINT))
        model = cls._allocated(config, tokenizer, load_vae(parts.vae, config))
        tied = {"language_model.lm_head.weight"} if config.llm.tie_word_embeddings else set()
        load_strict(
            model.lmm, read_state_dict(parts.internvl), source=str(parts.internvl), optional=tied
        )
        load_strict(model.transformer, read_diffusers_weights(parts.sana), source=str(parts.sana))
        if parts.checkpoint is None:
            model._init_openuni_weights()
        else:
            # The .pth holds OpenUni's modules and, from fine-tuning, the DiT: its tensors win.
            base = tuple(
                k for k in model.checkpoint_state_dict() if k.startswith(("lmm.", "transformer."))
            )
            load_strict(
                model,
                read_openuni_checkpoint(parts.checkpoint),
                source=str(parts.checkpoint),
                optional=base,
                ignore_prefixes=("vae.",),
            )
        return model

    @classmethod
    def _allocated(
        cls, config: OpenUniConfig, tokenizer: PreTrainedTokenizerBase, vae: AutoencoderDC
    ) -> OpenUni:
        """The model with uninitialised storage (weights are loaded next) and the given VAE."""
        with torch.device("meta"):
            model = cls(config, tokenizer, vae=AutoencoderDC(**config.vae.diffusers_kwargs()))
        model.to_empty(device="cpu")
        llm = model.lmm.language_model
        if config.llm.tie_word_embeddings:
            llm.tie_weights()  # to_empty re-creates parameters, untying lm_head from embed_tokens
        model.lmm.reset_rotary_embedding()
        model.vae = vae.requires_grad_(False).eval()
        return model

    @classmethod
    def build(cls, config: ModelConfig) -> OpenUni:
        """Random init from ``preset``; or the saved / released checkpoint at ``path``; or, with
        ``options.internvl_path`` / ``sana_path`` and no ``path``, the base models alone."""
        preset = config.preset if config.preset in PRESETS else None
        if config.path:
            return cls.from_pretrained(
                config.path,
                vae_path=config.vae_path,
                tokenizer_path=config.tokenizer_path,
                options=config.options,
                preset=preset,
            )
        cfg = openuni_config(config.preset, config.options)
        if cfg.internvl_path or cfg.sana_path:
            return cls.from_pretrained(
                None,
                vae_path=config.vae_path,
                tokenizer_path=config.tokenizer_path,
                options=config.options,
                preset=preset,
            )
        tokenizer = load_tokenizer(config.tokenizer_path) if config.tokenizer_path else None
        vae = load_vae(config.vae_path, cfg) if config.vae_path else None
        return cls(cfg, tokenizer, vae)
