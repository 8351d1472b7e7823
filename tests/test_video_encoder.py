"""The BEiT video encoder against timm and Hugging Face BEiT, node pruning, and bad input."""

import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from transformers import BeitConfig, BeitModel

from svitt.models import VideoEncoder
from svitt.models.relative_position import relative_bias

SMALL = dict(image_size=32, patch_size=8, depth=2, width=32, heads=2, mlp_ratio=2.0)


def _perturbed(model, seed=0):
    """Random non-trivial weights (timm zero-inits biases and the relative tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def timm_beit_base():
    return _perturbed(timm.create_model("beit_base_patch16_224", pretrained=False))


def test_single_frame_dense_encoder_reproduces_timm_beit_base(timm_beit_base, tmp_path):
    path = tmp_path / "beit.pth"
    torch.save(timm_beit_base.state_dict(), path)
    from svitt.models.weights import load_state_dict_file

    encoder = VideoEncoder.from_config({"frames": 1}).eval()
    encoder.load_image_weights(load_state_dict_file(path))
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = timm_beit_base.forward_features(image)
        tokens = encoder(image[:, None])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)
    # the final norm is timm's fc_norm
    torch.testing.assert_close(encoder.norm.weight, timm_beit_base.fc_norm.weight)


def _timm_small():
    return _perturbed(
        timm.models.beit.Beit(
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            use_abs_pos_emb=False,
            use_rel_pos_bias=True,
            init_values=0.1,
            num_classes=0,
        )
    )


def test_static_clip_with_two_frame_tubelets_embeds_as_the_image():
    """Tubelet inflation splits the 2D kernel evenly over the frames: a static clip is the image."""
    ref = _timm_small()
    encoder = VideoEncoder.from_config(dict(SMALL, frames=2, tubelet_frames=2)).eval()
    encoder.load_image_weights(ref.state_dict())
    assert encoder.grid == (1, 4, 4)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.forward_features(image)
        tokens = encoder(image[:, None].expand(-1, 2, -1, -1, -1))
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


def test_tubelets_see_the_order_of_their_frames():
    encoder = VideoEncoder.from_config(dict(SMALL, frames=4, tubelet_frames=2)).eval()
    clip = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        forward, backward = encoder(clip), encoder(clip.flip(1))
    assert (forward[:, 0] - backward[:, 0]).abs().max() > 1e-5


def test_without_position_embedding_a_fresh_encoder_cannot_order_its_tubelets():
    """Zero relative tables make a fresh encoder a function of the set of tubelets (swapping the
    two halves of a clip changes nothing); the absolute position embedding tells them apart."""
    clip = torch.randn(1, 4, 3, 32, 32)
    swapped = torch.cat([clip[:, 2:], clip[:, :2]], dim=1)  # the tubelets' order, each kept intact
    for abs_pos, differs in ((False, False), (True, True)):
        torch.manual_seed(0)
        encoder = VideoEncoder.from_config(
            dict(SMALL, frames=4, tubelet_frames=2, abs_pos_embed=abs_pos, init_std=0.1, layer_scale_init=None)
        ).eval()
        with torch.no_grad():
            gap = (encoder(clip)[:, 0] - encoder(swapped)[:, 0]).abs().max()
        assert (gap > 1e-4) == differs, (abs_pos, gap)
    assert encoder.pos_embed.shape == (1, 1 + 2 * 4 * 4, SMALL["width"])


def test_position_embedding_inflation_and_temporal_resize_by_hand():
    from svitt.models.weights import resize_pos_embed

    spatial = torch.arange(1 + 4, dtype=torch.float32).view(1, 5, 1)  # CLS 0, a 2x2 grid 1..4
    inflated = resize_pos_embed(spatial, (1, 2, 2), (3, 2, 2))  # eq. 22: the grid in every slot
    assert inflated.flatten().tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4]
    two = torch.tensor([0.0, 10, 11, 20, 21]).view(1, 5, 1)  # CLS, slot 0 (1x2), slot 1 (1x2)
    # eq. 23, slots aligned by their centres: 4 slots take source slots 0, 0, 1, 1
    assert resize_pos_embed(two, (2, 1, 2), (4, 1, 2)).flatten().tolist() == [0, 10, 11, 10, 11, 20, 21, 20, 21]
    assert resize_pos_embed(two, (2, 1, 2), (1, 1, 2)).flatten().tolist() == [0, 20, 21]  # the centre slot
    with pytest.raises(ValueError, match="does not fit the grid"):
        resize_pos_embed(two, (2, 2, 2), (4, 2, 2))


def test_stage_expansion_and_image_weights_carry_the_position_embedding():
    from svitt.models.weights import resize_pos_embed

    short = VideoEncoder.from_config(dict(SMALL, frames=4, tubelet_frames=2, abs_pos_embed=True))
    long = VideoEncoder.from_config(dict(SMALL, frames=8, tubelet_frames=2, abs_pos_embed=True))
    long.load_image_weights(short.state_dict())  # a video checkpoint of another clip length
    torch.testing.assert_close(long.pos_embed, resize_pos_embed(short.pos_embed, short.grid, long.grid))
    before = long.pos_embed.detach().clone()
    long.load_image_weights(_timm_small().state_dict())  # BEiT has no position embedding: kept
    torch.testing.assert_close(long.pos_embed, before)


def _hf_small():
    cfg = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-6,
    )
    return _perturbed(BeitModel(cfg, add_pooling_layer=True))


# transformers 5 names -> the names of the checkpoints on the Hugging Face hub (transformers 4)
HUB_NAMES = [
    (r"^embeddings\.", "beit.embeddings."),
    (
        r"^layers\.(\d+)\.attention\.([qkv])_proj\.",
        lambda m: (
            f"beit.encoder.layer.{m.group(1)}.attention.attention."
            + {"q": "query", "k": "key", "v": "value"}[m.group(2)]
            + "."
        ),
    ),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"beit.encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.relative_position_bias\.", r"beit.encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"beit.encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"beit.encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"beit.encoder.layer.\1."),
    (r"^pooler\.", "beit.pooler."),
]


@pytest.mark.parametrize("hub_names", [False, True])
def test_single_frame_encoder_reproduces_hugging_face_beit(hub_names):
    ref = _hf_small()
    state = ref.state_dict()
    if hub_names:
        renamed = {}
        for key, value in state.items():
            for pattern, repl in HUB_NAMES:
                key, n = re.subn(pattern, repl, key)
                if n:
                    break
            renamed[key] = value
        state = renamed
        assert "beit.encoder.layer.0.attention.attention.query.weight" in state
    encoder = VideoEncoder.from_config(dict(SMALL, frames=1, mlp_ratio=2.0)).eval()
    encoder.load_image_weights(state)
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref(pixel_values=image).last_hidden_state
        tokens = encoder(image[:, None])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-5)


def test_mean_pooling_with_the_released_epsilon_reproduces_hugging_face_beits_pooler():
    """video.pooling mean, layer_norm_eps 1e-12 (the released code's BEiT): the clip summary is HF
    BeitPooler's output (LayerNorm of the mean patch token), `norm` holds pooler.layernorm."""
    cfg = BeitConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        use_relative_position_bias=True,
        use_mean_pooling=True,
        layer_scale_init_value=0.1,
        layer_norm_eps=1e-12,
    )
    ref = _perturbed(BeitModel(cfg, add_pooling_layer=True))
    with torch.no_grad():  # a large mean component makes the epsilon's share visible
        ref.pooler.layernorm.weight.mul_(3.0)
    encoder = VideoEncoder.from_config(dict(SMALL, frames=1, pooling="mean", layer_norm_eps=1e-12)).eval()
    encoder.load_image_weights(ref.state_dict())
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=image)
        hidden = encoder(image[:, None])
        tokens, summary = encoder.outputs(hidden)
    torch.testing.assert_close(hidden, out.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(summary, out.pooler_output, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoder.pool(hidden), summary, rtol=0, atol=0)
    assert encoder.norm.eps == 1e-12 and all(b.norm1.eps == 1e-12 for b in encoder.blocks)
    cls = VideoEncoder.from_config(dict(SMALL, frames=1)).eval()
    cls.load_image_weights(ref.state_dict())
    with torch.no_grad():  # the default summary is the normed CLS: another vector
        assert (cls.outputs(cls(image[:, None]))[1] - out.pooler_output).abs().max() > 0.1


def test_a_separate_fusion_norm_starts_fresh_and_the_summary_norm_from_fc_norm():
    ref = _timm_small()
    ref.fc_norm = torch.nn.LayerNorm(32, eps=1e-6)  # an fc_norm as in BEiT-B in22k-ft22k
    with torch.no_grad():
        ref.fc_norm.weight.normal_()
        ref.fc_norm.bias.normal_()
    encoder = VideoEncoder.from_config(dict(SMALL, frames=2, pooling="mean", fusion_norm="separate")).eval()
    encoder.load_image_weights(ref.state_dict())
    torch.testing.assert_close(encoder.norm.weight, ref.fc_norm.weight, rtol=0, atol=0)
    assert torch.equal(encoder.fusion_norm.weight, torch.ones(32)) and torch.equal(
        encoder.fusion_norm.bias, torch.zeros(32)
    )
    with torch.no_grad():
        encoder.fusion_norm.weight.normal_()
        hidden = encoder(torch.randn(2, 2, 3, 32, 32))
        tokens, summary = encoder.outputs(hidden)
    by_hand = F.layer_norm(hidden, (32,), encoder.fusion_norm.weight, encoder.fusion_norm.bias, 1e-6)
    torch.testing.assert_close(tokens, by_hand, rtol=0, atol=1e-6)
    mean = F.layer_norm(hidden[:, 1:].mean(1), (32,), ref.fc_norm.weight, ref.fc_norm.bias, 1e-6)
    torch.testing.assert_close(summary, mean, rtol=0, atol=1e-6)
    shared = VideoEncoder.from_config(dict(SMALL, frames=2))
    assert not hasattr(shared, "fusion_norm") and "fusion_norm.weight" not in shared.state_dict()


def _cls_scores_by_hand(encoder, video):
    """Block 1's CLS attention over [CLS, regional tokens] per head, [B, heads, N]."""
    block = encoder.blocks[0]
    b, n = video.shape[0], 1 + encoder.grid[0] * encoder.grid[1] * encoder.grid[2]
    x = torch.cat([encoder.cls_token.expand(b, -1, -1), encoder.patch_embed(video)], 1)
    attn = block.attn
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, _ = F.linear(block.norm1(x), attn.qkv.weight, bias).view(b, n, 3, 2, 16).permute(2, 0, 3, 1, 4)
    pos = torch.cat([torch.tensor([-1]), torch.arange(n - 1)])[None]
    logits = q @ k.transpose(-1, -2) / math.sqrt(16) + relative_bias(
        attn.relative_position_bias_table, pos, pos, encoder.grid
    )
    return logits.softmax(-1)[:, :, 0]


def test_the_raw_pruning_score_is_the_head_mean_of_cls_attention_as_released():
    """prune_score raw: topk of attn.mean(1)[:, 0, 1:] (heads averaged before any renormalisation);
    renormalised: each head renormalised over the regional tokens first. Heads that give CLS
    different shares make the two keep different tokens."""
    cfg = dict(SMALL, frames=2, depth=2, visual_keep=0.3, prune_layers=[1])
    video = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    kept = {}
    for rule in ("raw", "renormalised"):
        encoder = _perturbed(VideoEncoder.from_config(dict(cfg, prune_score=rule)), seed=1)
        with torch.no_grad():  # head 0 attends to CLS much more than head 1
            encoder.blocks[0].attn.relative_position_bias_table[-1, 0] = 4.0
            _, positions = encoder(video, return_positions=True)
            probs = _cls_scores_by_hand(encoder, video)
        regional = probs[:, :, 1:]
        score = regional.mean(1) if rule == "raw" else (regional / regional.sum(-1, keepdim=True)).mean(1)
        expected = score.topk(math.ceil(0.3 * 32), dim=1).indices.sort(dim=1).values
        assert torch.equal(positions, expected), rule
        kept[rule] = positions
    assert not torch.equal(kept["raw"], kept["renormalised"])


def test_visual_pruning_keeps_the_top_tokens_by_cls_attention():
    cfg = dict(SMALL, frames=2, depth=2, visual_keep=0.3, prune_layers=[1])
    encoder = _perturbed(VideoEncoder.from_config(cfg), seed=1)
    video = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        tokens, positions = encoder(video, return_positions=True)
        # By hand: block 1's attention of CLS over the 32 regional tokens, mean over heads.
        block = encoder.blocks[0]
        x = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(video)], 1)
        h = block.norm1(x)
        attn = block.attn
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, _ = F.linear(h, attn.qkv.weight, bias).view(2, 33, 3, 2, 16).permute(2, 0, 3, 1, 4)
        pos = torch.cat([torch.tensor([-1]), torch.arange(32)])[None]
        logits = q @ k.transpose(-1, -2) / math.sqrt(16) + relative_bias(
            attn.relative_position_bias_table, pos, pos, encoder.grid
        )
        cls_to_regional = logits.softmax(-1)[:, :, 0, 1:].mean(1)
    keep = math.ceil(0.3 * 32)
    expected = cls_to_regional.topk(keep, dim=1).indices.sort(dim=1).values
    assert tokens.shape == (2, 1 + keep, 32)
    assert torch.equal(positions, expected)


def test_pruning_schedule_gives_ceil_qn_tokens_after_each_prune_layer():
    cfg = dict(
        SMALL,
        frames=4,
        depth=4,
        visual_keep=[0.7, 0.5],
        prune_layers=[2, 3],
        local_blocks=1,
        random_blocks=1,
        block_size=8,
    )
    encoder = VideoEncoder.from_config(cfg)
    tokens = encoder(torch.randn(1, 4, 3, 32, 32))
    n = 64
    for q in (0.7, 0.5):
        n = math.ceil(q * n)
    assert tokens.shape == (1, 1 + n, 32)
    tokens.sum().backward()
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = dict(
        SMALL, frames=2, visual_keep=0.5, prune_layers=[1], local_blocks=1, random_blocks=1, block_size=4, seed=3
    )
    plain = VideoEncoder.from_config(cfg)
    ckpt = VideoEncoder.from_config(dict(cfg, grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    video = torch.randn(2, 2, 3, 32, 32)
    plain(video).pow(2).sum().backward()
    ckpt(video).pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_edge_sparse_encoder_with_full_coverage_equals_dense():
    dense = VideoEncoder.from_config(dict(SMALL, frames=2)).eval()
    sparse = VideoEncoder.from_config(dict(SMALL, frames=2, local_blocks=1, random_blocks=0, block_size=32)).eval()
    sparse.load_state_dict(dense.state_dict())
    video = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sparse(video), dense(video), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(image_size=30), "image_size 30 is not divisible by patch_size 8"),
        (dict(local_blocks=2, random_blocks=1, block_size=4), "local_blocks .* odd"),
        (dict(local_blocks=1, random_blocks=None, block_size=4), "all set"),
        (dict(visual_keep=0.0, prune_layers=[1]), "visual_keep 0.0"),
        (dict(visual_keep=1.5, prune_layers=[1]), "visual_keep 1.5"),
        (dict(visual_keep=[0.5, 0.5], prune_layers=[1]), "2 entries"),
        (dict(frames=3, tubelet_frames=2), "frames 3 is not divisible by tubelet_frames 2"),
        (dict(depth_typo=3), "unknown video config key"),
        (dict(pooling="avg"), r"video.pooling must be one of \('cls', 'mean'\), got 'avg'"),
        (dict(fusion_norm="new"), "video.fusion_norm must be one of"),
        (dict(prune_score="mean"), "video.prune_score must be one of .*'mean'"),
        (dict(temporal_resize="linear"), "video.temporal_resize must be one of .*'linear'"),
        (dict(layer_norm_eps=0), "video.layer_norm_eps must be a number in \\(0, 1\\), got 0"),
    ],
)
def test_bad_config_is_rejected_with_the_value(cfg, match):
    with pytest.raises(ValueError, match=match):
        VideoEncoder.from_config(dict(SMALL, **cfg))


def test_wrong_frame_count_or_resolution_is_rejected():
    encoder = VideoEncoder.from_config(dict(SMALL, frames=4))
    with pytest.raises(ValueError, match=r"\[B, 4, 3, 32, 32\].*got \[1, 8, 3, 32, 32\]"):
        encoder(torch.randn(1, 8, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \[1, 4, 3, 64, 64\]"):
        encoder(torch.randn(1, 4, 3, 64, 64))


def test_checkpoint_of_another_architecture_is_rejected():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    encoder = VideoEncoder.from_config({"frames": 1, "width": 192, "heads": 3, "depth": 12})
    with pytest.raises(ValueError, match="missing .*relative_position_bias_table|q_bias"):
        encoder.load_image_weights(vit.state_dict())
    wider = VideoEncoder.from_config(dict(SMALL, frames=1, width=64))
    with pytest.raises(ValueError, match=r"\(32, 3, 8, 8\).*\(64, 3, 8, 8\)"):
        wider.load_image_weights(_timm_small().state_dict())


def _sparse_pair(kernel, **overrides):
    """Two float64 encoders with the same weights and layout seed: `kernel` and the reference."""
    cfg = dict(
        SMALL,
        frames=2,
        visual_keep=0.5,
        prune_layers=[1],
        local_blocks=1,
        random_blocks=2,
        block_size=5,
        seed=7,
        **overrides,
    )  # 32 tokens: blocks of 5 with padding
    fast = _perturbed(VideoEncoder.from_config(dict(cfg, attention_kernel=kernel)), seed=2).double()
    ref = VideoEncoder.from_config(dict(cfg, attention_kernel="reference")).double()
    ref.load_state_dict(fast.state_dict())
    return fast.train(), ref.train()


def test_gather_kernel_trains_the_encoder_like_the_reference_including_the_bias_tables():
    """Values, kept tokens and every parameter's gradient (the learned relative position tables
    included) through edge sparsity with padding and through node pruning."""
    fast, ref = _sparse_pair("gather")
    video = torch.randn(2, 2, 3, 32, 32, dtype=torch.float64)
    out_fast, pos_fast = fast(video, return_positions=True)
    out_ref, pos_ref = ref(video, return_positions=True)
    assert torch.equal(pos_fast, pos_ref) and pos_fast.shape == (2, 16)
    torch.testing.assert_close(out_fast, out_ref, rtol=0, atol=1e-10)
    weights = torch.randn_like(out_ref)
    (out_fast * weights).sum().backward()
    (out_ref * weights).sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=name)
    assert fast.blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def test_gather_kernel_under_gradient_checkpointing_gives_the_same_gradients():
    plain, _ = _sparse_pair("gather")
    ckpt, _ = _sparse_pair("gather", grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    video = torch.randn(2, 2, 3, 32, 32, dtype=torch.float64)
    plain(video).pow(2).sum().backward()
    ckpt(video).pow(2).sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12, msg=name)
