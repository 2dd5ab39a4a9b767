import pytest
import torch

from emcaps.models import BaselineCNN, MatrixCapsNet, count_parameters, create_model
from emcaps.routing import RoutingConfig


def test_paper_preset_layer_shapes_match_the_paper():
    model = create_model("paper")
    x = torch.randn(2, 1, 32, 32)
    feat = torch.relu(model.conv1(x))
    assert feat.shape == (2, 32, 14, 14)
    caps = model.primary(feat)
    assert caps.pose.shape == (2, 14, 14, 32, 4, 4)
    caps = model.conv_caps1(caps)
    assert caps.pose.shape == (2, 6, 6, 32, 4, 4) and caps.activation.shape == (2, 6, 6, 32)
    caps = model.conv_caps2(caps)
    assert caps.pose.shape == (2, 4, 4, 32, 4, 4)
    caps = model.class_caps(caps)
    assert caps.pose.shape == (2, 5, 4, 4) and caps.activation.shape == (2, 5)


@pytest.mark.parametrize("name,target", [("paper", 310_000), ("small", 68_000)])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_preset_parameter_counts(name, target, in_channels):
    n = count_parameters(create_model(name, in_channels=in_channels))
    assert abs(n - target) / target < 0.03, n


def test_baseline_cnn_size_and_output():
    cnn = create_model("cnn")
    assert isinstance(cnn, BaselineCNN) and cnn.score_kind == "logit"
    assert abs(count_parameters(cnn) - 4.2e6) / 4.2e6 < 0.03
    assert cnn(torch.randn(3, 1, 32, 32)).shape == (3, 5)


def test_any_number_of_classes_and_stereo_input():
    model = create_model("tiny", classes=10, in_channels=2)
    assert isinstance(model, MatrixCapsNet) and model.score_kind == "activation"
    out = model(torch.randn(2, 2, 32, 32))
    assert out.shape == (2, 10) and ((out >= 0) & (out <= 1)).all()
    caps = model.capsules(torch.randn(2, 2, 28, 28))
    assert caps.pose.shape == (2, 10, 4, 4)


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        create_model("huge")
    with pytest.raises(ValueError, match=r"expects images \(N, 1, H, W\)"):
        create_model("tiny")(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="larger than the input grid"):
        create_model("tiny")(torch.randn(2, 1, 16, 16))


def test_routing_config_reaches_every_layer():
    model = create_model("tiny", routing=RoutingConfig(iterations=2), coord_add=False)
    assert model.conv_caps1.routing.iterations == 2 and model.class_caps.routing.iterations == 2
    assert model.class_caps.coord_add is False


def test_gradients_flow_to_every_parameter():
    model = create_model("tiny")
    model(torch.randn(4, 1, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_initialisation_follows_the_parameterisation():
    """The authors' biases (0.5 / 0.5 in capsule convolutions, 2.0 / 1.0 in the class layer), IBM's far-negative
    beta_a, the transform stds, conv1 bias and the primary activations' offset reach the layers."""
    torch.manual_seed(0)
    authors = create_model("tiny", routing=RoutingConfig.named("authors"))
    assert authors.conv_caps1.beta_u[0].item() == 0.5 and authors.conv_caps2.beta_a[0].item() == 0.5
    assert authors.class_caps.beta_u[0].item() == 2.0 and authors.class_caps.beta_a[0].item() == 1.0
    assert authors.conv1.bias[0].item() == pytest.approx(0.1) and authors.primary.activation_offset == 1.0
    assert float(authors.class_caps.weight.detach().std()) < 0.02
    ibm = create_model("small", routing=RoutingConfig.named("ibm"))
    beta_a = torch.cat([ibm.conv_caps1.beta_a, ibm.conv_caps2.beta_a, ibm.class_caps.beta_a]).detach()
    assert float(beta_a.max()) <= 0 and float(beta_a.min()) >= -2000 and float(beta_a.mean()) < -500
    assert 0.8 < float(ibm.conv_caps1.weight.detach().std()) < 1.0           # std 1.0 truncated at 2 std
    for name in ("authors", "ibm"):
        model = authors if name == "authors" else ibm
        out = model(torch.randn(2, 1, 32, 32))
        assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_transform_gain_scales_the_transforms_the_votes_use():
    """gain g with transforms W routes as gain 1 with transforms g W (the parameters stay at their init scale,
    so Adam's steps keep their size relative to them)."""
    torch.manual_seed(0)
    gained = create_model("tiny", transform_gain=2.0).double().eval()
    plain = create_model("tiny").double().eval()
    plain.load_state_dict(gained.state_dict())
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    assert not torch.allclose(gained(x), plain(x))
    with torch.no_grad():
        for layer in (plain.conv_caps1, plain.conv_caps2, plain.class_caps):
            layer.weight.mul_(2.0)
    torch.testing.assert_close(gained(x), plain(x))
