import pytest
import torch

from emcaps.capsules import Capsules, child_index, conv_output_size, extract_patches, gather_windows


def test_capsules_validates_shapes():
    caps = Capsules(torch.zeros(2, 3, 3, 5, 4, 4), torch.zeros(2, 3, 3, 5))
    assert caps.grid == (3, 3) and caps.types == 5
    pose, act = caps
    assert pose.shape == (2, 3, 3, 5, 4, 4) and act.shape == (2, 3, 3, 5)
    with pytest.raises(ValueError, match="pose must have shape"):
        Capsules(torch.zeros(2, 5, 4, 3), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="activation must have shape"):
        Capsules(torch.zeros(2, 5, 4, 4), torch.zeros(2, 6))


def test_extract_patches_is_a_view_with_the_right_windows():
    x = torch.arange(2 * 7 * 7 * 3, dtype=torch.float32).view(2, 7, 7, 3)
    p = extract_patches(x, kernel=3, stride=2)                      # (N, H', W', K, K, C)
    assert p.shape == (2, 3, 3, 3, 3, 3)
    assert p.data_ptr() == x.data_ptr()
    for y in range(3):
        for xx in range(3):
            torch.testing.assert_close(p[:, y, xx], x[:, 2 * y:2 * y + 3, 2 * xx:2 * xx + 3])


@pytest.mark.parametrize("shape,kernel,stride", [((2, 7, 7, 3, 4, 4), 3, 2), ((2, 6, 5, 2), 3, 1),
                                                 ((1, 4, 4, 2, 4, 4), 4, 1)])
def test_gather_windows_copies_the_same_windows_and_gradients(shape, kernel, stride):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    viewed, gathered = extract_patches(x, kernel, stride), gather_windows(x, kernel, stride)
    assert gathered.is_contiguous() and gathered.shape == viewed.shape
    torch.testing.assert_close(gathered, viewed, rtol=0, atol=0)
    g = torch.randn(viewed.shape, dtype=torch.float64)
    (want,), (got,) = torch.autograd.grad(viewed, x, g), torch.autograd.grad(gathered, x, g)
    torch.testing.assert_close(got, want)          # every input position sums the windows it appears in
    with pytest.raises(ValueError, match="larger than the input grid"):
        gather_windows(x, 8, 1)


def test_child_index_maps_edges_to_input_positions():
    idx = child_index(5, 4, kernel=2, stride=1).view(4, 3, 2, 2)
    assert idx[0, 0].tolist() == [[0, 1], [4, 5]]
    assert idx[3, 2].tolist() == [[14, 15], [18, 19]]


def test_kernel_larger_than_input_is_an_error():
    with pytest.raises(ValueError, match="kernel 5 is larger than the input grid 4"):
        conv_output_size(4, 5, 1)
    with pytest.raises(ValueError, match="stride"):
        conv_output_size(4, 3, 0)
