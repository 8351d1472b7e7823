"""3D relative position bias: indices against timm, inflation and temporal resize by hand."""

import torch
import torch.nn.functional as F
from timm.models.beit import gen_relative_position_index

from svitt.models.relative_position import relative_bias, relative_index, resize_table, table_size, token_positions


def _full_index(grid):
    pos = torch.cat([torch.tensor([-1]), token_positions(grid)])
    return relative_index(pos[:, None], pos[None, :], grid)


def test_single_frame_index_equals_timm_beit_index():
    for hw in [(2, 3), (4, 4), (14, 14)]:
        assert torch.equal(_full_index((1,) + hw), gen_relative_position_index(hw))


def test_index_of_a_pair_is_its_offset_in_the_table():
    grid = (4, 3, 5)
    t, h, w = grid
    index = relative_index(torch.tensor(2 * 15 + 1 * 5 + 4), torch.tensor(0 * 15 + 2 * 5 + 1), grid)
    # query (t2, h1, w4) - key (t0, h2, w1) = (2, -1, 3)
    expected = ((2 + t - 1) * (2 * h - 1) + (-1 + h - 1)) * (2 * w - 1) + (3 + w - 1)
    assert index.item() == expected
    assert _full_index(grid).max().item() == table_size(grid) - 1


def test_inflating_a_2d_table_repeats_it_for_every_frame_offset():
    heads, hw = 2, (3, 4)
    table_2d = torch.randn(table_size((1,) + hw), heads)
    grid = (5,) + hw
    table_3d = resize_table(table_2d, (1,) + hw, grid)
    assert table_3d.shape == (table_size(grid), heads)
    pos = torch.cat([torch.tensor([-1]), token_positions(grid)])
    bias_3d = relative_bias(table_3d, pos[None], pos[None], grid)[0]
    spatial = torch.cat([torch.tensor([-1]), token_positions(grid) % 12])  # same (h, w), frame 0
    bias_2d = relative_bias(table_2d, spatial[None], spatial[None], (1,) + hw)[0]
    torch.testing.assert_close(bias_3d, bias_2d, rtol=0, atol=0)


def test_temporal_resize_4_to_8_frames_takes_the_nearest_offset_in_time():
    hw = (1, 1)  # one spatial offset: rows are temporal offsets, then the 3 specials
    src = torch.arange(7 + 3, dtype=torch.float32)[:, None]  # offsets -3..3 -> values 0..6
    out = resize_table(src, (4,) + hw, (8,) + hw)
    # offset d' at 8 frames spans d' / 2 frames at 4: sign(d') * floor(|d'| / 2 + 1/2), clamped to 3
    by_hand = {0: 0, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3}
    expected = [by_hand[abs(d)] * (1 if d >= 0 else -1) + 3 for d in range(-7, 8)]
    assert out[:15, 0].tolist() == expected
    assert out[15:, 0].tolist() == [7, 8, 9]  # CLS entries carried over


def test_temporal_resize_to_the_same_length_is_the_identity_and_8_to_4_subsamples():
    table = torch.randn(table_size((4, 2, 2)), 3)
    torch.testing.assert_close(resize_table(table, (4, 2, 2), (4, 2, 2)), table, rtol=0, atol=0)
    src = torch.arange(15 + 3, dtype=torch.float32)[:, None]
    out = resize_table(src, (8, 1, 1), (4, 1, 1))
    # offset d at 4 frames spans 2d at 8 frames
    assert out[:7, 0].tolist() == [2 * d + 7 for d in range(-3, 4)]


def test_interpolate_nearest_is_torch_nearest_over_the_offset_rows():
    """The released code's rule: F.interpolate(mode="nearest") over the 2T-1 temporal offsets."""
    for t_src, t_dst in [(1, 4), (4, 8), (8, 16), (4, 16), (16, 4), (8, 4), (2, 5), (3, 3)]:
        hw = (2, 3)
        table = torch.randn(table_size((t_src,) + hw), 2, dtype=torch.float64)
        per_offset = (2 * hw[0] - 1) * (2 * hw[1] - 1)
        rows = table[:-3].reshape(2 * t_src - 1, per_offset * 2)  # [offsets, everything else]
        torch_nearest = F.interpolate(rows.T[None], size=2 * t_dst - 1, mode="nearest")[0].T
        expected = torch.cat([torch_nearest.reshape(-1, 2), table[-3:]])
        out = resize_table(table, (t_src,) + hw, (t_dst,) + hw, rule="interpolate_nearest")
        torch.testing.assert_close(out, expected, rtol=0, atol=0, msg=f"{t_src} -> {t_dst}")


def test_interpolate_nearest_at_4_to_8_frames_is_asymmetric():
    src = torch.arange(7 + 3, dtype=torch.float32)[:, None]  # offsets -3..3 -> values 0..6
    out = resize_table(src, (4, 1, 1), (8, 1, 1), rule="interpolate_nearest")[:15, 0] - 3
    # row i of 15 takes row floor(7 i / 15) of 7: offset +1 takes 0, offset -1 takes -1
    assert out.tolist() == [-3, -3, -3, -2, -2, -1, -1, 0, 0, 1, 1, 2, 2, 3, 3]
    symmetric = resize_table(src, (4, 1, 1), (8, 1, 1))[:15, 0] - 3
    assert symmetric.tolist() == (-symmetric.flip(0)).tolist()  # the default keeps the table symmetric
    assert out.tolist() != (-out.flip(0)).tolist()


def test_an_unknown_resize_rule_is_named():
    import pytest

    with pytest.raises(ValueError, match="'bilinear'"):
        resize_table(torch.zeros(table_size((4, 1, 1)), 1), (4, 1, 1), (8, 1, 1), rule="bilinear")
