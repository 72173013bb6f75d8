import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import attnseg  # noqa: F401  (registers the attnseg_* names)


def test_features_only_gives_the_pyramid_with_timm_feature_info():
    model = timm.create_model("attnseg_nat_mini", features_only=True, out_indices=(1, 2, 3)).eval()
    assert model.feature_info.channels() == [128, 256, 512]
    assert model.feature_info.reduction() == [8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 96, 130))
    assert [tuple(m.shape) for m in maps] == [(1, 128, 12, 17), (1, 256, 6, 9), (1, 512, 3, 5)]


def test_classifier_and_refusal_to_download():
    model = timm.create_model("attnseg_mambaout_femto", num_classes=7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="never downloads weights"):
        timm.create_model("attnseg_nat_mini", pretrained=True)


def test_no_timm_name_is_overridden():
    script = (
        "import timm\n"
        "from timm.models import model_entrypoint\n"
        "before = {n: model_entrypoint(n) for n in timm.list_models()}\n"
        "import attnseg\n"
        "after = set(timm.list_models())\n"
        "new = after - set(before)\n"
        "assert new and all(n.startswith('attnseg_') for n in new), sorted(new)[:5]\n"
        "assert all(model_entrypoint(n) is fn for n, fn in before.items())\n"
        "assert 'attnseg_dinat_tiny' in new and not any(n.startswith('attnseg_test_') for n in new)\n"
        "print(len(new))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning:timm", "-c", script], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip()) >= 15


@pytest.mark.parametrize("name", ["attnseg_sparsifiner_deit_tiny", "attnseg_karat_vit_tiny"])
def test_vit_family_features_only_gives_the_simple_feature_pyramid(name):
    model = timm.create_model(name, features_only=True, img_size=128).eval()  # 65 tokens: Sparsifiner K = 10
    assert model.feature_info.reduction() == [4, 8, 16, 32] and model.feature_info.channels()[2] == 192
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 128))
    assert [tuple(m.shape[-2:]) for m in maps] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [m.shape[1] for m in maps] == model.feature_info.channels()
