"""The localized vision backbone: one SigLIP tower run twice, joined by gated cross-attention.

Built on transformers' SiglipVisionModel (not a fork): its embeddings and encoder layers are
called as they are. DAM adds three things around them:
- a mask patch embedding E_M (same kernel and stride as the image's, zero-initialised) whose
  output is added to the image embeddings; addition commutes, so adding it after SigLIP's own
  embeddings (patch + position) equals adding it before the position embedding;
- the global pass z = f_G(full image, full mask), taken at `vision_feature_layer`;
- the regional pass over the focal crop through the *same* layers, with a gated adapter after
  each: h += g_a * CrossAttn(LN(h), z); h += g_m * MLP(LN(h)), gates zero-initialised.
With E_M and every gate at zero the regional features are exactly SigLIP's features of the
crop (tested), so training starts from the pretrained tower's behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipMLP

from dam.modeling.configuration_dam import DamConfig


class MaskPatchEmbedding(nn.Conv2d):
    """E_M: the mask's patch embedding (1 channel in), zero-initialised so DAM starts as SigLIP."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__(1, config.hidden_size, config.patch_size, stride=config.patch_size)


class CrossAttention(nn.Module):
    """Multi-head attention from the regional tokens (queries) to the global context (keys/values)."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, queries, width = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.q_proj(hidden_states)), heads(self.k_proj(context)), heads(self.v_proj(context))
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, queries, width))


class GatedCrossAttentionAdapter(nn.Module):
    """h + g_a·CrossAttn(LN1(h), z), then + g_m·MLP(LN2(h)); gates start at zero."""

    def __init__(self, config: SiglipVisionConfig, gate_type: str, context_layer_norm: bool = False) -> None:
        super().__init__()
        self.gate_type = gate_type
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.context_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if context_layer_norm else None
        self.cross_attn = CrossAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def _gate(self, gate: torch.Tensor) -> torch.Tensor:
        return torch.tanh(gate) if self.gate_type == "tanh" else gate

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`active` (B,) selects the samples the adapter applies to (None: all)."""
        attn_gate, mlp_gate = self._gate(self.attn_gate), self._gate(self.mlp_gate)
        if active is not None:  # (B,) -> (B, 1, 1): zero gate for skipped samples
            active = active.to(hidden_states.dtype).view(-1, 1, 1)
            attn_gate, mlp_gate = attn_gate * active, mlp_gate * active
        if self.context_norm is not None:
            context = self.context_norm(context)
        hidden_states = hidden_states + attn_gate * self.cross_attn(self.layer_norm1(hidden_states), context)
        return hidden_states + mlp_gate * self.mlp(self.layer_norm2(hidden_states))


def siglip_core(tower: SiglipVisionModel) -> nn.Module:
    """The module holding a SigLIP tower's embeddings and encoder: transformers 4.x nests them
    under `.vision_model`, 5.x has them on the model."""
    return getattr(tower, "vision_model", tower)


def _run_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    output = layer(hidden_states, None)
    # transformers 4.x encoder layers return a tuple, 5.x a tensor.
    return output[0] if isinstance(output, tuple) else output


class LocalizedVisionBackbone(nn.Module):
    """SigLIP tower + mask embedding + gated adapters: (N, 8, S, S) focal prompts -> (N, T, C)."""

    def __init__(self, config: DamConfig, tower: SiglipVisionModel | None = None) -> None:
        super().__init__()
        vision_config = config.vision_config
        self.tower = tower if tower is not None else SiglipVisionModel(vision_config)
        self.mask_patch_embedding = MaskPatchEmbedding(vision_config)
        self.adapters = nn.ModuleList(
            GatedCrossAttentionAdapter(vision_config, config.gate_type, config.context_layer_norm)
            for _ in range(vision_config.num_hidden_layers)
        )
        self.num_layers_run = config.num_vision_layers_run
        self.mode = config.vision_mode
        self.gate_init = config.gate_init
        self.mask_embedding_init = config.mask_embedding_init
        self.zero_init_new_modules()

    @torch.no_grad()
    def zero_init_new_modules(self) -> None:
        """E_M to zero (unless config.mask_embedding_init is "random", which keeps the Conv2d's
        own initialisation) and the gates to config.gate_init: by default the identity state."""
        if self.mask_embedding_init == "zeros":
            nn.init.zeros_(self.mask_patch_embedding.weight)
            nn.init.zeros_(self.mask_patch_embedding.bias)
        for adapter in self.adapters:
            nn.init.constant_(adapter.attn_gate, self.gate_init)
            nn.init.constant_(adapter.mlp_gate, self.gate_init)

    def unused_modules(self) -> list[nn.Module]:
        """Modules the forward never runs: features come from `vision_feature_layer` (-2), so the
        tower layers after it, their adapters, SigLIP's post-layernorm and pooling head."""
        siglip = self._siglip
        first_unused_adapter = self.num_layers_run if self.mode == "focal" else 0  # ablations skip them
        unused: list[nn.Module] = [*siglip.encoder.layers[self.num_layers_run :], *self.adapters[first_unused_adapter:]]
        return unused + [module for name in ("post_layernorm", "head") if (module := getattr(siglip, name, None)) is not None]

    @property
    def _siglip(self) -> nn.Module:
        return siglip_core(self.tower)

    def embed(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) image and (N, 1, S, S) mask in [-1, 1] -> (N, T, C) token embeddings."""
        dtype = self.mask_patch_embedding.weight.dtype
        image_tokens = self._siglip.embeddings(rgb.to(dtype))
        mask_tokens = self.mask_patch_embedding(mask.to(dtype)).flatten(2).transpose(1, 2)
        return image_tokens + mask_tokens

    def _layer(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        # SigLIP's layers checkpoint themselves when gradient checkpointing is enabled.
        return _run_layer(self._siglip.encoder.layers[index], hidden_states)

    def encode_global(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: the plain (mask-embedded) tower's selected hidden state of the full image."""
        hidden_states = self.embed(rgb, mask)
        for index in range(self.num_layers_run):
            hidden_states = self._layer(index, hidden_states)
        return hidden_states

    def encode_regional(
        self,
        rgb: torch.Tensor,
        mask: torch.Tensor,
        context: torch.Tensor,
        adapters_active: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The crop through the same layers, each followed by its adapter attending to `context`."""
        hidden_states = self.embed(rgb, mask)
        for index in range(self.num_layers_run):
            hidden_states = self._layer(index, hidden_states)
            hidden_states = self.adapters[index](hidden_states, context, adapters_active)
        return hidden_states

    def forward(
        self, pixel_values: torch.Tensor, crop_is_full_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, 8, S, S) focal prompts [full RGB, full mask, crop RGB, crop mask] -> (N, V, T, C).

        V = config.num_views: 1, or 2 for the "full_and_crop" ablation (full view first).
        `crop_is_full_image` (N,) bool: where set, the adapters are skipped for that region
        (the released checkpoints' behaviour); pass None to always apply them.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 8:
            raise ValueError(
                f"pixel_values must be (N, 8, S, S) focal prompts, got shape {tuple(pixel_values.shape)}"
            )
        if self.mode == "full_only":
            return self.encode_global(pixel_values[:, 0:3], pixel_values[:, 3:4])[:, None]
        if self.mode == "crop_only":
            return self.encode_global(pixel_values[:, 4:7], pixel_values[:, 7:8])[:, None]
        if self.mode == "full_and_crop":
            views = pixel_values.view(-1, 4, *pixel_values.shape[2:])  # (2N, 4, S, S): full, crop, ...
            encoded = self.encode_global(views[:, 0:3], views[:, 3:4])  # one batched pass for both views
            return encoded.view(pixel_values.shape[0], 2, *encoded.shape[1:])
        context = self.encode_global(pixel_values[:, 0:3], pixel_values[:, 3:4])
        active = None if crop_is_full_image is None else ~crop_is_full_image.bool()
        return self.encode_regional(pixel_values[:, 4:7], pixel_values[:, 7:8], context, active)[:, None]
