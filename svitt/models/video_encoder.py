"""BEiT over whole clips: one token sequence of T' x H' x W' patches plus CLS.

A BEiT block (pre-norm ViT with layer scale and per-layer relative position bias, timm's layout and
parameter names) with the two SViTT sparsities: edge sparsity inside attention
(svitt.models.sparse_attention) and node sparsity after the layers listed in `prune_layers`
(svitt.models.token_pruning). Image weights load through `load_image_weights`, which inflates the
2D bias tables over time and the patch embedding over tubelets (svitt.models.weights).

`temporal: late` is the order-blind control (Singularity-style late fusion): the same image
encoder runs on each frame alone and the frames' CLS states are mean-pooled over time.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from svitt.config import merge_preset
from svitt.models.relative_position import TEMPORAL_RESIZES, table_size, token_positions
from svitt.models.sparse_attention import CLS_SCORES, KERNELS, attention, make_layout
from svitt.models.token_pruning import prune_tokens

VIDEO_PRESETS = {
    # BEiT-B/16 as in the paper (timm beit_base_patch16_224).
    "beit_base": dict(image_size=224, patch_size=16, depth=12, width=768, heads=12, mlp_ratio=4.0),
    # A few-minute-on-2-CPU-cores model for the demo corpus.
    "tiny": dict(
        image_size=32,
        patch_size=8,
        depth=4,
        width=64,
        heads=2,
        mlp_ratio=2.0,
        tubelet_frames=2,
        prune_layers=[2, 3],
        layer_scale_init=None,
        init_std=0.1,
    ),
}

TEMPORAL = ("joint", "late")
# Where this project's model and the released SViTT code differ (docs/fidelity.md): each way is a setting.
POOLINGS = ("cls", "mean")
FUSION_NORMS = ("shared", "separate")
PRUNE_SCORES = CLS_SCORES  # ("renormalised", "raw")

VIDEO_DEFAULTS = dict(  # every key of model.video, documented here once
    preset=None,  # "beit_base" or "tiny": a set of the keys below; explicit keys override it
    frames=4,  # clip length T; video inputs are [B, T, 3, H, W]
    image_size=224,  # H = W of the input frames
    patch_size=16,  # square patches; image_size must be a multiple
    tubelet_frames=1,  # frames per token (1 = per-frame 2D patches, the paper); T must be a multiple
    in_chans=3,
    abs_pos_embed=False,  # a learned position embedding [1 + T' H' W', D] added to the tokens (eq. 20-23); BEiT has none
    depth=12,  # transformer blocks
    width=768,  # token dimension D
    heads=12,
    mlp_ratio=4.0,
    qkv_bias=True,  # BEiT's q and v biases (no k bias)
    layer_scale_init=0.1,  # BEiT's layer scale gamma init; null disables layer scale
    drop_path=0.0,  # stochastic depth rate of the last block (linear from 0)
    local_blocks=None,  # K_l (odd): local key blocks per query block; all three null = dense
    random_blocks=None,  # K_r: random non-local key blocks per query block, redrawn every step
    block_size=None,  # G: tokens per block
    visual_keep=1.0,  # q_v: keep rate after each prune layer (a number, or one per prune layer)
    prune_layers=[4, 7, 10],  # blocks (1-indexed) after which tokens are pruned by CLS attention
    attention_kernel="auto",  # auto (flex on CUDA, else gather) | gather | flex | dense | reference
    grad_checkpointing=False,  # recompute block activations in backward (less memory)
    seed=0,  # of the random-block generator (edge sparsity)
    temporal="joint",  # joint: one sequence over the clip | late: each frame alone, CLS mean-pooled (order-blind control)
    init_std=0.02,  # BEiT's; from-scratch tiny models train faster with more
    # How the model reads BEiT, where the paper's text and the released code differ (docs/fidelity.md):
    layer_norm_eps=1e-6,  # every LayerNorm here: timm's BEiT 1e-6; the released code (HF BEiT config) 1e-12
    pooling="cls",  # the clip summary VTC projects: cls (the normed [CLS], the paper's text) | mean (the
    # norm of the mean regional token: BEiT-ft22k's fc_norm pooling, the released code)
    fusion_norm="shared",  # the norm of the tokens the fusion layers see: shared (`norm`, the summary's) |
    # separate (`fusion_norm`, a LayerNorm of its own, newly initialised: the released vision_layernorm)
    prune_score="renormalised",  # visual pruning rank: renormalised (each head's CLS attention over the
    # regional tokens, eq. 10, then the mean over heads) | raw (the mean over heads of CLS's softmax over
    # [CLS, tokens]: the released code)
    temporal_resize="symmetric",  # relative tables at a new clip length: symmetric (offset d' takes
    # round-half-away(d' T_src / T_dst)) | interpolate_nearest (torch's nearest over the 2T-1 offsets:
    # the released code, asymmetric)
)


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"video.{key} must be a positive integer, got {value!r}")
    return value


def _keep_rates(cfg: dict) -> dict[int, float]:
    """{layer (1-indexed): keep rate} from visual_keep (scalar or one per prune layer)."""
    layers = list(cfg["prune_layers"] or [])
    rates = cfg["visual_keep"]
    if not isinstance(rates, (list, tuple)):
        rates = [rates] * len(layers)
    if len(rates) != len(layers):
        raise ValueError(
            f"video.visual_keep has {len(rates)} entries but prune_layers has "
            f"{len(layers)} ({layers}); give one keep rate per prune layer or a scalar"
        )
    for layer, rate in zip(layers, rates):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
            raise ValueError(f"video.visual_keep {rate!r} must be a keep rate in (0, 1]")
        if rate < 1 and not (isinstance(layer, int) and 1 <= layer <= cfg["depth"]):
            raise ValueError(f"video.prune_layers entry {layer!r} must be a layer in 1..{cfg['depth']}")
    return {layer: float(rate) for layer, rate in zip(layers, rates) if rate < 1}


def resolve_video_config(cfg: dict) -> dict:
    """Defaults, preset and validation of the video encoder config; returns a complete dict."""
    cfg = merge_preset(cfg, VIDEO_DEFAULTS, VIDEO_PRESETS, "video")
    for key in ("frames", "image_size", "patch_size", "tubelet_frames", "in_chans", "depth", "width", "heads"):
        _positive_int(cfg, key)
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"video.image_size {cfg['image_size']} is not divisible by patch_size {cfg['patch_size']}")
    if cfg["frames"] % cfg["tubelet_frames"]:
        raise ValueError(f"video.frames {cfg['frames']} is not divisible by tubelet_frames {cfg['tubelet_frames']}")
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"video.width {cfg['width']} is not divisible by heads {cfg['heads']}")
    blocks = [cfg["local_blocks"], cfg["random_blocks"], cfg["block_size"]]
    if any(b is not None for b in blocks):
        if any(b is None for b in blocks):
            raise ValueError(
                "video.local_blocks, random_blocks and block_size must be all set "
                f"(edge sparsity) or all null (dense), got {blocks}"
            )
        if cfg["local_blocks"] < 1 or cfg["local_blocks"] % 2 == 0:
            raise ValueError(f"video.local_blocks (K_l) must be a positive odd number, got {cfg['local_blocks']}")
        if cfg["random_blocks"] < 0 or cfg["block_size"] < 1:
            raise ValueError(
                f"video.random_blocks must be >= 0 and block_size >= 1, got "
                f"{cfg['random_blocks']} and {cfg['block_size']}"
            )
    if cfg["attention_kernel"] not in KERNELS:
        raise ValueError(f"video.attention_kernel must be one of {KERNELS}, got {cfg['attention_kernel']!r}")
    for key, allowed in (
        ("temporal", TEMPORAL),
        ("pooling", POOLINGS),
        ("fusion_norm", FUSION_NORMS),
        ("prune_score", PRUNE_SCORES),
        ("temporal_resize", TEMPORAL_RESIZES),
    ):
        if cfg[key] not in allowed:
            raise ValueError(f"video.{key} must be one of {allowed}, got {cfg[key]!r}")
    eps = cfg["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise ValueError(f"video.layer_norm_eps must be a number in (0, 1), got {eps!r}")
    _keep_rates(cfg)
    return cfg


def canonical_frame_order(video: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T] frame indices sorted by a content key (a position-weighted pixel
    sum accumulated in float64, so translated copies differ), identical for any reordering of
    the frames."""
    flat = video.detach().flatten(2)
    weight = torch.arange(1, flat.shape[2] + 1, dtype=flat.dtype, device=flat.device) / flat.shape[2]
    return (flat * weight).sum(-1, dtype=torch.float64).argsort(dim=1, stable=True)


class PatchEmbed(nn.Module):
    """Tubelets of `tubelet` frames x patch x patch pixels -> tokens.

    A Conv2d over the tubelet's frames stacked on channels (frame-major), which equals a Conv3d
    with kernel (tubelet, p, p); tubelet = 1 is the paper's per-frame 2D patch embedding.
    """

    def __init__(self, patch_size: int, tubelet: int, in_chans: int, width: int):
        super().__init__()
        self.tubelet = tubelet
        self.proj = nn.Conv2d(in_chans * tubelet, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, T, C, H, W] -> tokens [B, T' H' W', D] in (t, h, w) order."""
        b, t, c, h, w = video.shape
        x = video.reshape(b * t // self.tubelet, self.tubelet * c, h, w)
        x = self.proj(x)  # [B T', D, H', W']
        return x.flatten(2).transpose(1, 2).reshape(b, -1, x.shape[1])


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, prob: float):
        super().__init__()
        self.prob = prob

    def forward(self, x):
        if not self.training or self.prob == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.prob)
        return x * keep / (1 - self.prob)


class Attention(nn.Module):
    """BEiT attention (q and v biases, no k bias) with a per-layer 3D relative position table."""

    def __init__(
        self, width: int, heads: int, grid: tuple[int, int, int], qkv_bias: bool, prune_score: str = "renormalised"
    ):
        super().__init__()
        self.heads = heads
        self.prune_score = prune_score
        self.grid = grid
        self.qkv = nn.Linear(width, width * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(width)) if qkv_bias else None
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size(grid), heads))
        self.proj = nn.Linear(width, width)

    def forward(self, x, pos, layout, kernel, need_cls_attn):
        """x [B, N, D], pos [B or 1, N-1] -> (out [B, N, D], cls_attn [B, N-1] or None)."""
        b, n, d = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out, cls_attn = attention(
            q,
            k,
            v,
            self.relative_position_bias_table,
            pos,
            self.grid,
            layout,
            kernel,
            need_cls_attn,
            cls_score=self.prune_score,
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, d)), cls_attn


class Block(nn.Module):
    def __init__(self, cfg: dict, grid, drop_path: float, keep_rate: float):
        super().__init__()
        width = cfg["width"]
        self.keep_rate = keep_rate
        self.norm1 = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])
        self.attn = Attention(width, cfg["heads"], grid, cfg["qkv_bias"], cfg["prune_score"])
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(width, eps=cfg["layer_norm_eps"])
        self.mlp = Mlp(width, int(width * cfg["mlp_ratio"]))
        init = cfg["layer_scale_init"]
        self.gamma_1 = nn.Parameter(torch.full((width,), float(init))) if init else None
        self.gamma_2 = nn.Parameter(torch.full((width,), float(init))) if init else None

    def _scale(self, gamma, x):
        return x if gamma is None else gamma * x

    def forward(self, x, pos, layout, kernel):
        """x [B, 1+N, D], pos [B or 1, N] -> pruned (x [B, 1+N', D], pos [B or 1, N'])."""
        prune = self.keep_rate < 1.0
        out, cls_attn = self.attn(self.norm1(x), pos, layout, kernel, need_cls_attn=prune)
        x = x + self.drop_path(self._scale(self.gamma_1, out))
        if prune:  # EViT-style: rank by this layer's CLS attention, prune before the MLP.
            x, pos = prune_tokens(x, pos, cls_attn.detach(), self.keep_rate)
        x = x + self.drop_path(self._scale(self.gamma_2, self.mlp(self.norm2(x))))
        return x, pos


class VideoEncoder(nn.Module):
    """SViTT video encoder f_v.

    forward(video [B, T, 3, H, W]) -> hidden states [B, 1 + N', D], CLS first, after the last
    block and before any norm; the caller takes `pool(hidden)` (the clip summary VTC projects) and
    `fusion_tokens(hidden)` (what the fusion layers attend to), as video.pooling and
    video.fusion_norm say.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        cfg = resolve_video_config(cfg)
        self.cfg = cfg
        p = cfg["patch_size"]
        # late fusion: every sequence is one frame (a static tubelet), so the grid has one time step
        slots = 1 if cfg["temporal"] == "late" else cfg["frames"] // cfg["tubelet_frames"]
        self.grid = (slots, cfg["image_size"] // p, cfg["image_size"] // p)
        self.width = cfg["width"]
        self.patch_embed = PatchEmbed(p, cfg["tubelet_frames"], cfg["in_chans"], cfg["width"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg["width"]))
        if cfg["abs_pos_embed"]:
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.grid), cfg["width"]))
        keep = _keep_rates(cfg)
        rates = torch.linspace(
            0, cfg["drop_path"], cfg["depth"], device="cpu"
        ).tolist()  # CPU: also under a meta default device
        self.blocks = nn.ModuleList(Block(cfg, self.grid, rates[i], keep.get(i + 1, 1.0)) for i in range(cfg["depth"]))
        self.norm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])  # BEiT's fc_norm when loaded
        if cfg["fusion_norm"] == "separate":
            self.fusion_norm = nn.LayerNorm(cfg["width"], eps=cfg["layer_norm_eps"])
        self.layout_generator = torch.Generator().manual_seed(int(cfg["seed"]))
        self._init_weights()

    @classmethod
    def from_config(cls, cfg: dict) -> "VideoEncoder":
        """Build from the video config (also accepts a model config with a `video` section)."""
        if isinstance(cfg.get("video"), dict):
            cfg = cfg["video"]
        return cls(copy.deepcopy(cfg))

    def _init_weights(self):
        std = self.cfg["init_std"]
        nn.init.trunc_normal_(self.cls_token, std=std)
        if self.cfg["abs_pos_embed"]:
            nn.init.trunc_normal_(self.pos_embed, std=std)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, block in enumerate(self.blocks):  # BEiT's depth-scaled output init
            block.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def no_weight_decay(self) -> set[str]:
        """Parameters AdamW leaves undecayed beyond those of under 2 dimensions (timm's
        convention): the CLS token and every block's relative position bias table."""
        return {
            name for name, _ in self.named_parameters() if name.endswith(("cls_token", "relative_position_bias_table"))
        }

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, 1 + N, D] -> the clip summary [B, D] (video.pooling): the normed CLS, or the
        norm of the mean regional token (BEiT's fc_norm pooling)."""
        if self.cfg["pooling"] == "mean":
            return self.norm(hidden[:, 1:].mean(1))
        return self.norm(hidden[:, 0])

    def fusion_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, 1 + N, D] -> the tokens the fusion layers attend to, normed by video.fusion_norm."""
        return (self.fusion_norm if self.cfg["fusion_norm"] == "separate" else self.norm)(hidden)

    def outputs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, 1 + N, D] -> (fusion tokens [B, 1 + N, D], clip summary [B, D]); with the CLS
        summary and a shared norm the summary is the fusion tokens' CLS (one norm computed)."""
        tokens = self.fusion_tokens(hidden)
        if self.cfg["pooling"] == "cls" and self.cfg["fusion_norm"] == "shared":
            return tokens, tokens[:, 0]
        return tokens, self.pool(hidden)

    @property
    def edge_sparse(self) -> bool:
        return self.cfg["block_size"] is not None

    def _layout(self, num_regional: int, device):
        if not self.edge_sparse:
            return None
        cfg = self.cfg
        return make_layout(
            num_regional, cfg["block_size"], cfg["local_blocks"], cfg["random_blocks"], self.layout_generator, device
        )

    def check_input(self, video: torch.Tensor):
        cfg = self.cfg
        expected = (cfg["frames"], cfg["in_chans"], cfg["image_size"], cfg["image_size"])
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"video must have shape [B, T, C, H, W] = [B, {', '.join(map(str, expected))}]"
                f" (frames={cfg['frames']}, image_size={cfg['image_size']}), "
                f"got {list(video.shape)}"
            )

    def forward(self, video: torch.Tensor, return_positions: bool = False):
        """video [B, T, C, H, W] -> hidden [B, 1 + N', D]; with return_positions also the kept
        tokens' positions [B or 1, N'] (p = t H' W' + h W' + w on the tubelet grid; late fusion:
        on the (T, H', W') frame grid)."""
        self.check_input(video)
        if self.cfg["temporal"] == "late":
            x, pos = self._forward_late(video)
        else:
            x, pos = self._encode(video)
        return (x, pos) if return_positions else x

    def _encode(self, video: torch.Tensor):
        """[B, T, C, H, W] sequences on self.grid -> (hidden [B, 1 + N', D], positions [B or 1, N'])."""
        x = self.patch_embed(video)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.cfg["abs_pos_embed"]:
            x = x + self.pos_embed
        pos = token_positions(self.grid, x.device)[None]  # shared until the first pruning
        kernel = self.cfg["attention_kernel"]
        for block in self.blocks:
            layout = self._layout(x.shape[1] - 1, x.device)
            if self.cfg["grad_checkpointing"] and self.training:
                x, pos = checkpoint(block, x, pos, layout, kernel, use_reentrant=False)
            else:
                x, pos = block(x, pos, layout, kernel)
        return x, pos

    def _forward_late(self, video: torch.Tensor):
        """Late fusion: each frame alone (repeated over a tubelet, a static clip), CLS states
        mean-pooled over time, the frames' tokens concatenated for the fusion layers.

        Frames are encoded in a canonical order (sorted by content), so the output is a function
        of the set of frames bit for bit: reversing or shuffling a clip changes nothing, not even
        the float rounding of the mean (whose sum depends on the order of its terms)."""
        b, t = video.shape[:2]
        order = canonical_frame_order(video)  # [B, T]
        frames = torch.gather(video, 1, order.view(b, t, 1, 1, 1).expand_as(video))
        tubelet = self.cfg["tubelet_frames"]
        x, pos = self._encode(frames.reshape(b * t, 1, *video.shape[2:]).expand(-1, tubelet, -1, -1, -1))
        x = x.view(b, t, x.shape[1], x.shape[2])
        hidden = torch.cat([x[:, :, 0].mean(1, keepdim=True), x[:, :, 1:].flatten(1, 2)], dim=1)
        per_frame = self.grid[1] * self.grid[2]
        pos = pos.expand(b * t, -1).view(b, t, -1) + order[:, :, None] * per_frame  # original frame index
        return hidden, pos.flatten(1)

    def load_image_weights(self, state_dict: dict, strict: bool = True):
        """Load 2D BEiT weights (timm or HF layout), inflated to this clip geometry."""
        from svitt.models.weights import video_checkpoint_filter_fn

        return self.load_state_dict(video_checkpoint_filter_fn(state_dict, self), strict=strict)
