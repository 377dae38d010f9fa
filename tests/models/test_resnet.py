"""The ResNets: every architecture builds and steps, the hand-built one's layout, ImageNet weights offline and from a file."""

import pytest
import torch

from core.models.resnet import WeightsError, build_model


@pytest.mark.parametrize("arch", ["resnet18-custom", "resnet34", "resnet50"])
def test_every_architecture_builds_and_steps(arch):
    model = build_model(arch, 3, weights="none", dropout=0.2)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3)
    out.sum().backward()


def test_custom_resnet18_matches_torchvision_layout():
    import torchvision
    ours = build_model("resnet18-custom", 10).state_dict()
    theirs = torchvision.models.resnet18(num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_offline_imagenet_gives_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    import torchvision.models._api as api

    def offline(self, *a, **kw):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsError) as err:
        build_model("resnet18", 2, weights="imagenet")
    msg = str(err.value)
    assert "offline" in msg and "--weights none" in msg and "resnet18-f37072fd.pth" in msg


def test_local_weights_file_loads_backbone_and_refuses_other_models(tmp_path):
    src = build_model("resnet18", 1000)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = build_model("resnet18", 2, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(model.conv1.weight, src.conv1.weight)
    assert model.fc.out_features == 2
    torch.save(build_model("resnet34", 1000).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match="does not match resnet18"):
        build_model("resnet18", 2, weights=str(tmp_path / "r34.pth"))
