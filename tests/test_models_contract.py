"""One contract over every registered segmentation model (smp's style: one test body, every entry).

Whatever a model is, :func:`finetune.models.build_model` must give a network that keeps the
input's spatial size, has one logit channel per class (one for binary), rebuilds exactly
from its ``config()`` (what ``model.pth`` stores), takes 2D encoder weights strictly (inflated
for 3D), and freezes its encoder: no gradients, BatchNorm statistics fixed in train mode.
"""

from __future__ import annotations

import pytest
import timm
import torch

from finetune.models import MODELS, build_model, logits_to_probs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "unet2d": {},
    "unet3d": {"decoder_channels": (8, 8, 8, 8, 8), "geometry": "anisotropic"},
    "rsunet": {"widths": (4, 4, 8, 8, 8)},
    "asem_unet": {"num_fmaps": 2},
}
INPUT = {2: (1, 1, 64, 96), 3: (1, 1, 8, 32, 64)}


def test_every_registered_model_has_a_case():
    assert set(TINY) == set(MODELS), "a new model needs its tiny settings here"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract(name):
    torch.manual_seed(0)
    state2d = timm.create_model("resnet18", in_chans=1, num_classes=0).state_dict()
    takes_weights = MODELS[name].takes_encoder_weights
    arch = {"arch": "resnet18"} if takes_weights else {}
    if takes_weights:
        model = build_model(name, **arch, num_classes=3, weights=state2d, freeze_encoder=True, **TINY[name])
    else:  # trains from scratch or from a whole model: 2D encoder weights are refused, naming why
        with pytest.raises(ValueError, match="no ResNet encoder"):
            build_model(name, num_classes=3, weights=state2d, **TINY[name])
        model = build_model(name, num_classes=3, freeze_encoder=True, **TINY[name])
    x = torch.rand(INPUT[model.dim])
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (1, 3) + x.shape[2:]
    probs = logits_to_probs(logits)
    torch.testing.assert_close(probs.sum(1), torch.ones_like(probs[:, 0]))

    if takes_weights:  # The encoder holds the 2D weights (inflated in 3D: a depth-1 stem sums to the 2D kernel).
        stem = model.encoder.conv1.weight
        torch.testing.assert_close(stem.reshape(64, 1, -1, 7, 7).sum(2), state2d["conv1.weight"])

    # Frozen: no gradient reaches it and train mode keeps its BatchNorm statistics.
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    model.train()
    assert not any(p.requires_grad for p in model.encoder.parameters())
    model(torch.rand(2, *x.shape[1:])).sum().backward()
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in before.items())
    # The decoder freezes the same way, and the output head (what a transfer re-initialises) still learns.
    model.freeze_decoder(True)
    model.zero_grad()
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    model.train()
    assert not any(p.requires_grad for p in model.decoder.parameters())
    model(torch.rand(2, *x.shape[1:])).sum().backward()
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in before.items())
    head = [p for k, p in model.named_parameters() if k.startswith(model.head_prefix)]
    assert head and all(p.requires_grad and p.grad is not None for p in head)

    # config() rebuilds the same network: the saved state dict loads strictly and gives the same output.
    saved = model.config()
    rebuilt = build_model(saved.pop("model"), **saved)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))

    # Binary tasks have one logit channel (read through a sigmoid).
    binary = build_model(name, **arch, num_classes=2, **TINY[name])
    with torch.no_grad():
        assert binary.eval()(x).shape == (1, 1) + x.shape[2:]
