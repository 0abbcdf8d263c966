import torch

from irc.nn.tokens import gather_rows, restrict_keys, row_layout, sink_mask


def test_row_layout_orders_and_pads():
    execute = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    pos, valid = row_layout(execute)
    assert pos[0].tolist() == [0, 2, 3]
    assert pos[1, 0].item() == 1 and valid.tolist() == [[True] * 3, [True, False, False]]
    pos, valid = row_layout(torch.zeros(2, 4, dtype=torch.bool))
    assert pos.shape == (2, 0) and valid.shape == (2, 0)


def test_sink_mask_follows_padding():
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert sink_mask(pad, 2).int().tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert not sink_mask(pad, 0).any()


def test_gather_rows_broadcasts_batch_and_restrict_keys():
    t = torch.arange(12.0).view(1, 6, 2)  # [1, T, 2], shared by the batch
    pos = torch.tensor([[0, 5], [2, 3]])
    out = gather_rows(t, 1, pos)
    assert out.tolist() == [[[0, 1], [10, 11]], [[4, 5], [6, 7]]]
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    keep = torch.tensor([[True, False, True], [True, True, False]])
    assert restrict_keys(mask, keep)[:, 0, 0].tolist() == keep.tolist()
    additive = torch.zeros(2, 1, 3, 3)
    assert (restrict_keys(additive, keep)[1, 0, :, 2] < -1e30).all()
