import pytest
import torch

from emcaps.models import BaselineCNN, MatrixCapsNet, count_parameters, create_model
from emcaps.routing import RoutingConfig, Runtime


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


CAPS = r"MatrixCapsNet expects a non-empty batch of floating-point images \(N, 1, H, W\) with H, W >= 17; got "
CNN = r"BaselineCNN\(image_size=32\) expects a non-empty batch of floating-point images \(N, 1, 32, 32\); got "


@pytest.mark.parametrize("name, expects", [("tiny", CAPS), ("cnn", CNN)])
@pytest.mark.parametrize("images, got", [
    (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), r"torch.uint8: convert them first, e.g. x.float\(\)"),
    (torch.zeros(2, 1, 32, 32, dtype=torch.int64), r"torch.int64: convert them first"),
    (torch.zeros(2, 3, 32, 32), r"shape \(2, 3, 32, 32\)"),
    (torch.zeros(2, 1, 32), r"shape \(2, 1, 32\)"),
    (torch.zeros(0, 1, 32, 32), r"shape \(0, 1, 32, 32\)"),
])
def test_bad_images_are_named_before_any_layer_runs(name, expects, images, got):
    with pytest.raises(ValueError, match=expects + got):
        create_model(name)(images)


@pytest.mark.parametrize("name", ["tiny", "cnn"])
def test_images_in_another_dtype_than_the_model_say_how_to_convert(name):
    model = create_model(name).eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"has torch.float32 weights and was given torch.float64 images: convert the "
                                         r"images \(x.to\(torch.float32\)\) or the model"):
        model(x)
    assert model(x.float()).dtype == torch.float32 and model.double()(x).dtype == torch.float64


def test_the_smallest_images_follow_from_the_kernels():
    """Conv1 (5, stride 2) -> ConvCaps1 (3, stride 2) -> ConvCaps2 (3, stride 1) -> one class-capsule position:
    17 pixels; a kernel that grows raises the minimum."""
    model = create_model("tiny")
    assert model.min_image_size == 17
    assert model(torch.randn(1, 1, 17, 20)).shape == (1, 5)
    with pytest.raises(ValueError, match=CAPS + r"shape \(1, 1, 16, 20\)"):
        model(torch.randn(1, 1, 16, 20))
    model.conv_caps2.kernel = 5
    assert model.min_image_size == 25                     # 5 -> (5 - 1) * 2 + 3 = 11 -> (11 - 1) * 2 + 5


def test_the_cnn_takes_the_image_size_it_is_built_for():
    cnn = create_model("cnn", image_size=24, classes=3, in_channels=2)
    assert cnn(torch.randn(2, 2, 24, 24)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"BaselineCNN\(image_size=24\) expects .* \(N, 2, 24, 24\); got shape "
                                         r"\(2, 2, 32, 32\)"):
        cnn(torch.randn(2, 2, 32, 32))


def test_a_run_config_builds_the_cnn_for_its_crop():
    """`quick` crops 24: the CNN it builds classifies 24x24 images (its classifier was sized for 32 before)."""
    from emcaps import config
    from emcaps.training.build import build_model

    run = config.load(config.named_config_path("quick"), ["model.name=cnn"])
    assert run.data.crop == 24
    cnn = build_model(run, classes=5, in_channels=2)
    assert isinstance(cnn, BaselineCNN) and cnn.image_size == 24
    assert cnn(torch.randn(2, 2, 24, 24)).shape == (2, 5)


def test_unknown_keywords_say_what_a_model_takes():
    with pytest.raises(TypeError, match=r"a capsule network takes classes, in_channels, routing, runtime, "
                                        r".*decoder.*; got iterations; routing settings go in "
                                        r"routing=RoutingConfig\(iterations=\.\.\.\) or "
                                        r"routing=RoutingConfig.named\(NAME, iterations=\.\.\.\)"):
        create_model("small", iterations=2)
    with pytest.raises(TypeError, match=r"got chunk; how the routing runs goes in runtime=Runtime\(chunk=\.\.\.\)"):
        create_model("small", chunk=2)
    with pytest.raises(TypeError, match=r"got colour$"):
        create_model("small", colour=2)
    with pytest.raises(TypeError, match=r"routing must be a RoutingConfig or a parameterisation's name"):
        create_model("tiny", routing={"iterations": 2})
    with pytest.raises(TypeError, match=r"model 'cnn' takes classes, in_channels, image_size, dropout; got an "
                                        r"unexpected keyword argument 'routing'"):
        create_model("cnn", routing=RoutingConfig())


def test_routing_and_runtime_by_name():
    """routing='paper' is RoutingConfig.named('paper'), initialisation included; a runtime's name is its backend."""
    torch.manual_seed(0)
    by_name = create_model("tiny", routing="paper", runtime="torch")
    torch.manual_seed(0)
    by_config = create_model("tiny", routing=RoutingConfig.named("paper"), runtime=Runtime(backend="torch"))
    assert by_name.config == by_config.config and by_name.config.routing.parameterisation == "paper"
    for (k, a), (_, b) in zip(by_name.state_dict().items(), by_config.state_dict().items()):
        assert torch.equal(a, b), k
    assert by_name.class_caps.runtime == Runtime(backend="torch")
    model = create_model("tiny").set_runtime("native")
    assert all(layer.runtime == Runtime(backend="native")
               for layer in (model.conv_caps1, model.conv_caps2, model.class_caps))
    with pytest.raises(ValueError, match="unknown routing backend 'torhc'"):
        model.set_runtime("torhc")
    with pytest.raises(TypeError, match="runtime must be a Runtime or a backend name, got dict"):
        model.set_runtime({"backend": "torch"})


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
