"""MoCoV2 (He et al. 2020; Chen et al. 2020): a query encoder, a momentum key encoder, a queue.

One step (Appendix 1, figure 3a of the CEM500K paper): two augmented views of a batch go through
the query encoder and the key encoder; each query is scored against its own key (the positive)
and against every key in the queue (negatives); the InfoNCE loss trains the query encoder; the
key encoder follows it as an exponential moving average; this step's keys from all processes
replace the oldest batch in the queue.

The module holds no device or process-group logic: collectives come from
:mod:`pretrain.distributed` and are identities in a single process.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from cemcurate.common.archs import get_arch
from pretrain import distributed


def create_backbone(arch: str, in_chans: int = 1) -> nn.Module:
    """A randomly initialised timm ResNet without classifier: ``(n, in_chans, H, W)`` -> ``(n, C)``.

    ``C`` is ``model.num_features`` (2048 for resnet50, 512 for resnet18). The last BatchNorm of
    each residual block starts at 1, not timm's 0, as in the torchvision ResNets that MoCo and
    CEM500K trained (with timm's zero start, embeddings of different EM patches began with
    cosine similarity ~0.98 and short small-batch runs learned more slowly in our tests).
    """
    get_arch(arch)
    return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=0, zero_init_last=False)


def projection_head(in_features: int, out_features: int, mlp: bool = True) -> nn.Sequential:
    """MoCoV2's head: Linear(C, C) -> ReLU -> Linear(C, out); MoCo v1's single Linear if not ``mlp``."""
    if not mlp:
        return nn.Sequential(nn.Linear(in_features, out_features))
    return nn.Sequential(
        nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, out_features)
    )


class EmbeddingBranch(nn.Module):
    """Encoder + head + L2 normalisation, sharing the modules it is given.

    MoCo wraps its query branch in one of these so DistributedDataParallel can own exactly the
    trained parameters (not the key encoder or the 32 MB queue, which DDP would otherwise
    broadcast every step).
    """

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)).float(), dim=1)


class MocoOutput(NamedTuple):
    loss: torch.Tensor  # scalar, float32
    logits: torch.Tensor  # (n, 1 + queue_size), detached; column 0 is the positive
    keys: torch.Tensor  # (n, feature_dim), this rank's keys in input order


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss of queries against their keys (positives) and a queue (negatives).

    Args:
        q: ``(n, d)`` L2-normalised queries (float32).
        k: ``(n, d)`` L2-normalised keys, row ``i`` the positive of ``q[i]``.
        queue: ``(K, d)`` L2-normalised negatives.

    Returns:
        ``(loss, logits)``: mean cross-entropy with target 0, and the ``(n, 1 + K)`` logits.
    """
    positive = (q * k).sum(dim=1, keepdim=True)
    negative = q @ queue.T
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target), logits


class MoCo(nn.Module):
    """MoCoV2 on a timm ResNet.

    State dict keys: ``encoder_q.*`` (the backbone to publish), ``head_q.*``, ``encoder_k.*``,
    ``head_k.*``, ``queue`` (float32 ``(queue_size, feature_dim)``, one key per row) and
    ``queue_ptr`` (int64 scalar, the row the next batch of keys is written to).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        feature_dim: int = 128,
        queue_size: int = 65536,
        key_momentum: float = 0.999,
        temperature: float = 0.2,
        mlp: bool = True,
        in_chans: int = 1,
        shuffle_bn: bool = True,
        key_bn_groups: int = 4,
    ):
        super().__init__()
        self.arch, self.in_chans = arch, in_chans
        self.key_momentum, self.temperature, self.shuffle_bn = key_momentum, temperature, shuffle_bn
        self.key_bn_groups = key_bn_groups
        self.encoder_q = create_backbone(arch, in_chans)
        self.head_q = projection_head(self.encoder_q.num_features, feature_dim, mlp)
        # The key branch starts as an exact copy and is only ever moved by the momentum update.
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.head_k = copy.deepcopy(self.head_q)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, feature_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder_q.parameters(), *self.head_q.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder_k.parameters(), *self.head_k.parameters()]

    def query_branch(self) -> EmbeddingBranch:
        """The trained path (shares parameters with this module); wrap it in DDP for multi-process runs."""
        return EmbeddingBranch(self.encoder_q, self.head_q)

    @torch.no_grad()
    def update_key_encoder(self) -> None:
        """``k <- m * k + (1 - m) * q`` for every parameter (BatchNorm statistics are the key encoder's own)."""
        keys, queries = self.key_parameters(), self.query_parameters()
        torch._foreach_mul_(keys, self.key_momentum)
        torch._foreach_add_(keys, queries, alpha=1.0 - self.key_momentum)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor, shuffle_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of ``im_k`` (``(n, C, H, W)``): ``(this rank's (n, d), all ranks' (world*n, d))``.

        With shuffle-BN on more than one process, the batch is spread across processes before
        the key encoder, so no BatchNorm batch holds both views of an image (a shortcut the
        query could otherwise learn), and gathered back in order after it. In one process the
        batch is shuffled and encoded in ``key_bn_groups`` groups instead (the single-GPU
        recipe of the MoCo authors' CIFAR demo), since a whole-batch BatchNorm would hold
        every query's partner key.
        """
        branch = EmbeddingBranch(self.encoder_k, self.head_k)
        if self.shuffle_bn and distributed.world_size() > 1:
            shuffled, perm = distributed.shuffle_batch(im_k, shuffle_seed)
            return distributed.unshuffle_batch(branch(shuffled), perm)
        # A BatchNorm group needs two samples; tiny batches get fewer groups.
        groups = min(self.key_bn_groups, len(im_k) // 2)
        if self.shuffle_bn and groups > 1:
            perm = distributed.permutation(len(im_k), shuffle_seed, im_k.device)
            shuffled = torch.cat([branch(group) for group in im_k[perm].chunk(groups)])
            k = torch.empty_like(shuffled)
            k[perm] = shuffled
            return k, k
        k = branch(im_k)
        return k, distributed.all_gather_cat(k)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest ``len(keys)`` rows of the queue by ``keys`` (``(m, d)``, all ranks' keys)."""
        size, m = len(self.queue), len(keys)
        if size % m:
            raise ValueError(f"queue size {size} is not divisible by the global batch {m}")
        ptr = int(self.queue_ptr)
        self.queue[ptr : ptr + m] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + m) % size)

    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, *, shuffle_seed: int = 0, query_net: nn.Module | None = None
    ) -> MocoOutput:
        """One MoCo step's forward pass; updates the key encoder and the queue as side effects.

        Args:
            im_q, im_k: ``(n, in_chans, H, W)`` float views of the same ``n`` images.
            shuffle_seed: same integer on every rank, fresh each step (shuffle-BN permutation).
            query_net: the query branch to call, e.g. a DDP wrapper of :meth:`query_branch`;
                default: this module's own query branch.
        """
        q = (query_net if query_net is not None else self.query_branch())(im_q)
        self.update_key_encoder()
        k, k_all = self.encode_keys(im_k, shuffle_seed)
        # The queue is overwritten below while autograd still needs it for dL/dq.
        loss, logits = info_nce(q, k, self.queue.clone(), self.temperature)
        self.enqueue(k_all)
        return MocoOutput(loss, logits.detach(), k)
