"""DSTCarbonFormer: dual-stream U-Net over ``[B, C, T, H, W]`` with SFT, MoE, attention and a
temporal state-space scan, plus the optional water-filling physics projection.

Data flow (``L = len(config.widths)`` levels, level ``l`` at ``1 / 2**l`` resolution)::

    aux  -> aux stem  -> [MS conv -> (SFT cond) -> down] x L  (aux stream, only with use_sft)
    main -> main stem -> [SFT(aux) -> MS conv x depth -> skip -> down] x L
    bottleneck: SpatialMoE -> GlobalContextAttention -> TemporalSSM   (each switchable)
    decoder: [upsample + skip -> MS conv] x (L - 1) -> OutputHead
    raw = main + head(features)                       (log domain, residual uniform prior)
    constrained = log1p(water_fill(expm1(raw), block_totals, block))   (float64)

With ``config.allocation == "dasymetric"`` the output is a per-pixel log-weight instead::

    context = block_mean(proj(features), context_pool)          (constant over each parent cell)
    raw = prior(aux) + local_head(aux 3x3, context)              (the head starts at 0)
    raw = sites(raw, aux, main)        (point_sites: surplus over the fitted surface on the sites)
    constrained = log1p(S * softmax_block(raw))                  (float64, exact)

so that placement inside a parent cell follows the aux at (and next to) each pixel (the prior is
the fitted additive layer mix of :mod:`models.dasymetric`); the U-Net only changes that rule from
place to place, it cannot draw patterns inside a cell that the aux layers do not show.

With ``use_sft=False`` there is one stream whose stem sees ``concat([aux, main])``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import (
    Pointwise,
    group_norm,
    Downsample,
    GlobalContextAttention,
    MultiScaleDSConv3d,
    OutputHead,
    SFTLayer,
    SpatialMoE,
    TemporalSSM,
    UpFuse,
)
from models.config import ModelConfig
from models.dasymetric import DasymetricPrior, softmax_children
from models.mass_prior import MassPrior
from models.point_sites import PointSites
from models.physics import water_fill

__all__ = ["DSTCarbonFormer", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class LocalHead(nn.Module):
    """Log-weight correction from the aux values around each pixel (3x3) and parent-level context.

    Within a parent cell the output varies only with the local aux values (the context input is
    constant over each ``pool x pool`` block), so placement inside a cell follows the aux at that
    pixel, as in POMELO's occupancy model; the context lets that rule change from place to
    place. The last layer starts at 0 (the network starts at its prior).

    Shapes:
        ``aux [B, C, T, H, W], context [B, K, T, H, W] or None -> [B, 1, T, H, W]`` (float32),
        bounded to +-12 by ``12 tanh(y / 12)``.
    """

    def __init__(self, channels: int, context_channels: int = 0, hidden: int = 32, bound: float = 12.0) -> None:
        super().__init__()
        self.bound = bound
        self.spatial = nn.Conv3d(channels, hidden, (1, 3, 3), padding=(0, 1, 1), padding_mode="replicate")
        self.mix = nn.Linear(hidden + context_channels, hidden)
        self.out = nn.Linear(hidden, 1)
        self.act = nn.GELU()
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, aux: Tensor, context: Tensor | None = None) -> Tensor:
        """Correction ``[B, 1, T, H, W]``."""
        h = self.act(self.spatial(aux.to(self.spatial.weight.dtype)))
        if context is not None:
            h = torch.cat([h, context.to(h.dtype)], dim=1)
        y = self.out(self.act(self.mix(h.movedim(1, -1)))).movedim(-1, 1).float()
        return self.bound * torch.tanh(y / self.bound)


def block_mean(x: Tensor, block: int) -> Tensor:
    """Replace every ``block x block`` block of ``[..., H, W]`` by its mean (H, W multiples of block;
    otherwise the edge blocks are partial)."""
    if block <= 1:
        return x
    h, w = x.shape[-2:]
    lead = x.shape[:-2]
    if x.is_cuda and h % block == 0 and w % block == 0:
        # CUDA, for speed: avg_pool2d runs one thread per output cell, which loops over the whole
        # block (4 ms for 120 x 120 blocks in a training step); the same means up to float rounding.
        y = x.reshape(*lead, h // block, block, w // block, block).mean(dim=(-3, -1), keepdim=True)
        return y.expand(*lead, h // block, block, w // block, block).reshape(*lead, h, w)
    y = F.avg_pool2d(x.reshape(-1, 1, h, w), block, ceil_mode=True)
    y = y.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :h, :w]
    return y.reshape(*lead, h, w)


class DSTCarbonFormer(nn.Module):
    """Weakly supervised downscaling network (see the module docstring for the data flow).

    Args:
        config: Architecture and ablation switches.

    Attributes:
        aux_loss: After each forward, the MoE load-balancing loss (scalar tensor; 0 without
            MoE). Add ``coef * model.aux_loss`` to the training loss.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.dasymetric = config.allocation == "dasymetric"
        self.prior: nn.Module | None = None
        if self.dasymetric and config.use_prior:
            self.prior = (MassPrior(config.aux_channels, config.mass_hidden, config.mass_smooth or config.prior_smooth, config.prior_exponents, config.prior_smooth, config.mass_members) if config.prior_kind == "mass"
                          else DasymetricPrior(config.aux_channels, config.prior_exponents, config.prior_smooth))
        self.sites: PointSites | None = None
        if self.prior is not None and config.point_sites:
            surface = DasymetricPrior(config.aux_channels, config.prior_exponents, config.prior_smooth)  # the log-loss surface mix
            self.sites = PointSites(config.aux_channels, surface, config.site_window, config.site_delta, config.site_point_weight)
        ctx_ch = config.context_channels if config.use_context else 0
        self.pointwise = LocalHead(config.aux_channels, ctx_ch, config.pointwise_hidden) if self.dasymetric and config.use_pointwise else None
        self.aux_loss: Tensor = torch.zeros(())
        #: Run convolutions in ``channels_last_3d`` memory format (depthwise 3D convs are up to
        #: 20x faster so on CPU with oneDNN). A runtime choice, not part of the config.
        self.channels_last = True
        if self.dasymetric and not config.use_context:
            return  # no U-Net
        w = config.widths
        n_levels = len(w)

        def ms_block(ch: int, dropout: float = 0.0) -> MultiScaleDSConv3d:
            return MultiScaleDSConv3d(ch, config.kernel_sizes, config.dilations, config.temporal_kernel, dropout)

        stem_kernel, stem_pad = (1, 3, 3), (0, 1, 1)
        if config.use_sft:
            self.aux_stem = nn.Conv3d(config.aux_channels, w[0], stem_kernel, padding=stem_pad)
            self.main_stem = nn.Conv3d(1, w[0], stem_kernel, padding=stem_pad)
            self.aux_blocks = nn.ModuleList(ms_block(ch) for ch in w)
            self.aux_downs = nn.ModuleList(Downsample(w[i], w[i + 1]) for i in range(n_levels - 1))
            self.sft = nn.ModuleList(SFTLayer(ch, ch) for ch in w)
        else:
            self.stem = nn.Conv3d(config.aux_channels + 1, w[0], stem_kernel, padding=stem_pad)
        self.enc_blocks = nn.ModuleList(
            nn.Sequential(*(ms_block(ch) for _ in range(depth))) for ch, depth in zip(w, config.depths)
        )
        self.downs = nn.ModuleList(Downsample(w[i], w[i + 1]) for i in range(n_levels - 1))

        bottleneck = w[-1]
        self.moe = (
            SpatialMoE(bottleneck, config.n_experts, config.top_k, config.expert_hidden_mult)
            if config.use_moe
            else None
        )
        self.attention = (
            GlobalContextAttention(bottleneck, config.attn_heads, config.attn_pool) if config.use_attention else None
        )
        self.temporal = TemporalSSM(bottleneck, config.state_size, config.ssm_expand) if config.use_temporal else None

        self.ups = nn.ModuleList(UpFuse(w[i + 1], w[i]) for i in reversed(range(n_levels - 1)))
        self.dec_blocks = nn.ModuleList(ms_block(w[i], config.dropout) for i in reversed(range(n_levels - 1)))
        if self.dasymetric:  # context features for the local head instead of a log-domain head
            self.head: nn.Module = nn.Sequential(group_norm(w[0]), Pointwise(w[0], config.context_channels), nn.GELU())
        else:
            self.head = OutputHead(w[0], config.dropout)

    def _check_inputs(self, aux: Tensor, main: Tensor) -> None:
        cfg = self.config
        if aux.ndim != 5 or aux.shape[1] != cfg.aux_channels:
            raise ValueError(f"aux must be [B, {cfg.aux_channels}, T, H, W], got {tuple(aux.shape)}")
        b, _, t, h, w = aux.shape
        if tuple(main.shape) != (b, 1, t, h, w):
            raise ValueError(f"main must be [B, 1, T, H, W] = {(b, 1, t, h, w)}, got {tuple(main.shape)}")
        if t > cfg.max_years:
            raise ValueError(f"T={t} years exceeds config.max_years={cfg.max_years}")

    def forward(
        self,
        aux: Tensor,
        main: Tensor,
        block_totals: Tensor | None = None,
        block: int | None = None,
        *,
        context_block: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Predict log-domain child values.

        Inputs must be finite: replace nodata before calling (one NaN pixel would spread to the
        whole patch through the per-sample GroupNorm statistics).

        Args:
            aux: Normalised auxiliary layers ``[B, C_aux, T, H, W]``.
            main: ``log1p(block_total / n_children)`` broadcast over each block's children
                ``[B, 1, T, H, W]``.
            block_totals: Block totals (linear domain, e.g. t CO2 / block / yr)
                ``[B, 1, T, H / block, W / block]``; with ``block``, enables ``constrained``.
            block: Block edge in child cells (factor at inference, s * factor in training).
            context_block: (dasymetric) the block the context features are averaged over: the
                block whose total is shared (``s * factor`` in training, the factor at
                inference; default ``config.context_pool``). Constant over a block, the context
                cannot move mass between the parts of that block by itself; it only changes the
                local rule, which is what places mass inside a parent cell at inference.

        Returns:
            ``(raw, constrained)``: ``raw [B, 1, T, H, W]`` = log1p of child totals before
            projection (float32, or the input dtype if wider); ``constrained`` = log1p of the
            water-filled children (float64, every block sums to its total) when
            ``block_totals`` and ``block`` are given and ``config.use_physics``, else None.
            Any H, W work (padded by replication to a multiple of
            ``config.downsample_factor`` and cropped back).
        """
        self._check_inputs(aux, main)
        if (block_totals is None) != (block is None):
            raise ValueError("give both block_totals and block, or neither")
        if self.dasymetric:
            return self._forward_dasymetric(aux, main, block_totals, block, context_block or block)
        h, w = aux.shape[-2:]
        feats = self._features(*self._padded(aux, main))
        delta = self.head(feats)[..., :h, :w].contiguous()
        raw = main + delta.to(torch.promote_types(delta.dtype, main.dtype))

        constrained = None
        if block_totals is not None and block is not None and self.config.use_physics:
            constrained = self.project(raw, block_totals, block)
        return raw, constrained

    def _padded(self, aux: Tensor, main: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs replicate-padded to a multiple of ``config.downsample_factor`` (and in
        ``channels_last_3d`` when :attr:`channels_last`); crop outputs back to the input size."""
        h, w = aux.shape[-2:]
        f = self.config.downsample_factor
        pad_h, pad_w = (-h) % f, (-w) % f
        if pad_h or pad_w:
            pad = (0, pad_w, 0, pad_h, 0, 0)
            aux, main = F.pad(aux, pad, mode="replicate"), F.pad(main, pad, mode="replicate")
        if self.channels_last:
            aux = aux.contiguous(memory_format=torch.channels_last_3d)
            main = main.contiguous(memory_format=torch.channels_last_3d)
        return aux, main

    def _context(self, aux: Tensor, main: Tensor, pool: int) -> Tensor:
        """Context features ``[B, K, T, H, W]`` (float32), constant over each parent block."""
        h, w = aux.shape[-2:]
        feats = self.head(self._features(*self._padded(aux, main)))[..., :h, :w].float()
        return block_mean(feats, pool)

    def _forward_dasymetric(self, aux: Tensor, main: Tensor, block_totals: Tensor | None,
                            block: int | None, context_block: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Log-weights ``prior + local_head(aux, context)`` (see the module docstring)."""
        log_w = self.prior(aux) if self.prior is not None else aux.new_zeros((aux.shape[0], 1, *aux.shape[2:]), dtype=torch.float32)
        context = None
        if self.config.use_context:
            context = self._context(aux, main, int(context_block or self.config.context_pool))
        else:
            self.aux_loss = aux.new_zeros((), dtype=torch.float32)
        if self.pointwise is not None:
            log_w = log_w + self.pointwise(aux, context)
        if self.sites is not None:
            log_w = self.sites(log_w, aux, main, int(context_block or self.config.context_pool))
        constrained = None
        if block_totals is not None and block is not None and self.config.use_physics:
            with torch.autocast(device_type=log_w.device.type, enabled=False):
                constrained = torch.log1p(softmax_children(log_w, block_totals, block))
        return log_w, constrained

    def _features(self, aux: Tensor, main: Tensor) -> Tensor:
        """Encoder, bottleneck and decoder: ``[B, C_aux, T, H, W]`` -> ``[B, w0, T, H, W]``."""
        cfg = self.config
        n_levels = len(cfg.widths)
        skips: list[Tensor] = []
        # Inputs follow the weights' dtype (a bf16 copy of the model for inference); the
        # residual ``main + delta`` in ``forward`` keeps the caller's (float32) ``main``.
        dtype = (self.aux_stem if cfg.use_sft else self.stem).weight.dtype
        aux, main = aux.to(dtype), main.to(dtype)
        if cfg.use_sft:
            a = self.aux_stem(aux)
            x = self.main_stem(main)
        else:
            a = None
            x = self.stem(torch.cat([aux, main.to(aux.dtype)], dim=1))
        for level in range(n_levels):
            if a is not None:
                a = self.aux_blocks[level](a)
                x = self.sft[level](x, a)
                if level < n_levels - 1:
                    a = self.aux_downs[level](a)
            x = self.enc_blocks[level](x)
            if level < n_levels - 1:
                skips.append(x)
                x = self.downs[level](x)

        if self.moe is not None:
            x = self.moe(x)
            self.aux_loss = self.moe.aux_loss
        else:
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
        if self.attention is not None:
            x = self.attention(x)
        if self.temporal is not None:
            x = self.temporal(x)

        for up, block in zip(self.ups, self.dec_blocks):
            x = block(up(x, skips.pop()))
        return x

    @staticmethod
    def project(raw: Tensor, block_totals: Tensor, block: int) -> Tensor:
        """Water-fill ``expm1(raw)`` onto the block totals in float64; returns log1p of it.

        Shapes:
            ``raw [B, 1, T, H, W], block_totals [B, 1, T, H / block, W / block] ->
            [B, 1, T, H, W]`` (float64).
        """
        with torch.autocast(device_type=raw.device.type, enabled=False):
            children = water_fill(torch.expm1(raw.double()), block_totals, block)
            return torch.log1p(children)
