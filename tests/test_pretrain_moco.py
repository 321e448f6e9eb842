"""MoCo algorithm pieces against naive references, the lr schedule and the config (one process)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cemcurate.common.archs import ARCHS
from cemcurate.common.config import config_to_dict, load_config
from pretrain.config import MocoConfig
from pretrain.moco import MoCo, create_backbone, info_nce
from pretrain.train import lr_at

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_info_nce_matches_a_naive_loop():
    q, k, queue, t = _unit(5, 8, 0), _unit(5, 8, 1), _unit(12, 8, 2), 0.2
    loss, logits = info_nce(q, k, queue, t)
    expected = 0.0
    for i in range(5):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(12))
        expected += -math.log(pos / (pos + neg)) / 5
    assert logits.shape == (5, 13)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # A query identical to its key and orthogonal-ish to negatives scores lower loss.
    assert info_nce(k, k, queue, t)[0] < loss


def test_key_encoder_starts_as_a_frozen_copy():
    fresh = MoCo("resnet18", feature_dim=16, queue_size=24)
    for (name, q), k in zip(fresh.encoder_q.named_parameters(), fresh.encoder_k.parameters()):
        assert torch.equal(q, k), name
        assert q.requires_grad and not k.requires_grad
    assert torch.allclose(fresh.queue.norm(dim=1), torch.ones(24))
    assert int(fresh.queue_ptr) == 0


def test_momentum_update_is_an_exponential_moving_average():
    torch.manual_seed(1)
    m = MoCo("resnet18", feature_dim=16, queue_size=24, key_momentum=0.9)
    with torch.no_grad():
        for p in m.query_parameters():
            p.add_(1.0)
    before_k = [p.clone() for p in m.key_parameters()]
    m.update_key_encoder()
    for k0, q, k1 in zip(before_k, m.query_parameters(), m.key_parameters()):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q, atol=1e-6)


def test_forward_trains_only_the_query_branch_and_enqueues_its_keys():
    torch.manual_seed(0)
    model = MoCo("resnet18", feature_dim=16, queue_size=24, key_momentum=0.9, temperature=0.2)
    x = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    old_queue = model.queue.clone()
    out = model(x, x.flip(-1))
    out.loss.backward()
    assert out.logits.shape == (8, 1 + 24) and out.keys.shape == (8, 16)
    assert all(p.grad is not None for p in model.query_parameters())
    assert all(p.grad is None for p in model.key_parameters())
    assert torch.equal(model.queue[:8], out.keys) and torch.equal(model.queue[8:], old_queue[8:])
    assert int(model.queue_ptr) == 8
    # The loss used the queue as it was before this step's keys went in.
    q = F.normalize(model.head_q(model.encoder_q(x)), dim=1)
    assert torch.allclose(out.logits[:, 1:] * 0.2, (q @ old_queue.T).detach(), atol=1e-4)


def test_single_process_shuffle_bn_keeps_each_key_out_of_its_partners_batch():
    """In one process a key depends only on its own BatchNorm group (a random quarter of the batch)."""
    x = torch.randn(8, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    grouped = MoCo("resnet18", feature_dim=16, queue_size=24, key_bn_groups=4)
    whole = MoCo("resnet18", feature_dim=16, queue_size=24, key_bn_groups=1)
    whole.load_state_dict(grouped.state_dict())
    keys, gathered = grouped.encode_keys(x, shuffle_seed=7)
    assert torch.equal(keys, gathered) and keys.shape == (8, 16)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    group_of = {int(i): g for g, members in enumerate(perm.chunk(4)) for i in members}
    outsider = next(i for i in range(8) if group_of[i] != group_of[0])
    changed = x.clone()
    changed[outsider] = changed[outsider] * 3 + 1
    # Key 0 is untouched by a sample outside its group, but moves with the whole-batch BatchNorm.
    assert torch.allclose(grouped.encode_keys(changed, shuffle_seed=7)[0][0], keys[0], atol=1e-5)
    base = whole.encode_keys(x)[0]
    assert not torch.allclose(whole.encode_keys(changed)[0][0], base[0], atol=1e-3)
    # The keys come back in input order: the outsider's key is the one that changed.
    moved = (grouped.encode_keys(changed, shuffle_seed=7)[0] - keys).abs().sum(dim=1) > 1e-4
    assert moved[outsider] and int(moved.sum()) == 2


def test_enqueue_wraps_and_rejects_uneven_batches():
    m = MoCo("resnet18", feature_dim=4, queue_size=12)
    for i in range(4):
        m.enqueue(torch.full((4, 4), float(i)))
    # 4 batches of 4 into 12 rows: the 4th batch overwrote the 1st.
    assert m.queue[:4].eq(3).all() and m.queue[4:8].eq(1).all() and m.queue[8:].eq(2).all()
    assert int(m.queue_ptr) == 4
    with pytest.raises(ValueError, match="not divisible"):
        m.enqueue(torch.zeros(5, 4))


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError) as err:
        create_backbone("resnet5O")
    assert all(name in str(err.value) for name in ARCHS)
    # A timm ResNet that later stages cannot fine-tune (grouped convolutions) is refused up front.
    with pytest.raises(ValueError, match="every stage"):
        create_backbone("resnext50_32x4d")
    net = create_backbone("resnet18")
    assert net(torch.zeros(2, 1, 64, 64)).shape == (2, 512)
    assert net.conv1.weight.shape[1] == 1
    assert isinstance(getattr(net, "fc", torch.nn.Identity()), torch.nn.Identity)


def test_step_schedule_divides_by_ten_at_milestones_and_scales_with_batch():
    cfg = MocoConfig(batch_size=256, queue_size=65536, epochs=200)
    per_epoch = 100
    assert cfg.base_lr == pytest.approx(0.03)  # 0.015 at 128, linearly scaled
    assert lr_at(cfg, 0, per_epoch) == pytest.approx(0.03)
    assert lr_at(cfg, 119 * per_epoch + 99, per_epoch) == pytest.approx(0.03)
    assert lr_at(cfg, 120 * per_epoch, per_epoch) == pytest.approx(0.003)
    assert lr_at(cfg, 160 * per_epoch, per_epoch) == pytest.approx(0.0003)
    cos = MocoConfig(lr_schedule="cosine", epochs=10)
    assert lr_at(cos, 0, 7) == pytest.approx(0.015)
    assert lr_at(cos, 35, 7) == pytest.approx(0.0075)
    assert lr_at(cos, 70, 7) == pytest.approx(0.0, abs=1e-12)


def test_yaml_holds_the_paper_settings_and_equals_the_defaults():
    from_yaml = load_config(MocoConfig, REPO / "configs" / "pretrain" / "mocov2_cem500k.yaml")
    assert config_to_dict(from_yaml) == config_to_dict(MocoConfig())
    c = from_yaml
    assert (c.arch, c.batch_size, c.queue_size, c.lr, c.lr_milestones, c.epochs) == (
        "resnet50",
        128,
        65536,
        0.015,
        [120, 160],
        200,
    )
    assert (c.temperature, c.key_momentum, c.feature_dim, c.mlp, c.sgd_momentum, c.weight_decay) == (
        0.2,
        0.999,
        128,
        True,
        0.9,
        1e-4,
    )
    assert c.crop_scale == [0.2, 1.0] and c.blur_sigma == [0.1, 2.0] and c.noise_var == [1e-5, 1e-4]


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(queue_size=1000, batch_size=128), "not divisible by the global batch_size 128"),
        (dict(lr_schedule="linear"), "lr_schedule must be one of"),
        (dict(key_bn="group"), "key_bn must be one of"),
        (dict(key_momentum=1.0), "key_momentum"),
        (dict(noise_p=1.5), "probability"),
        (dict(crop_scale=[0.5, 0.2]), "low <= high"),
        (dict(max_steps=0), "max_steps"),
    ],
)
def test_config_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        MocoConfig(**bad)
