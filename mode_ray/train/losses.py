"""The CLIP loss of every trial: open_clip's `ClipLoss` (its feature gathering across workers included), with
the label smoothing the CLIP-MoE reference uses in its MCL stages, and the MoE's load-balancing term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from mode_ray.train.job import Balance


class SmoothedClipLoss(ClipLoss):
    """`ClipLoss` with label smoothing on both directions (0: exactly open_clip's loss)."""

    def __init__(self, label_smoothing: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.label_smoothing = label_smoothing

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):  # noqa: ANN001
        if not self.label_smoothing:
            return super().forward(image_features, text_features, logit_scale, logit_bias, output_dict)
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias=logit_bias)
        labels = self.get_ground_truth(image_features.device, per_image.shape[0])
        s = self.label_smoothing
        loss = (
            F.cross_entropy(per_image, labels, label_smoothing=s) + F.cross_entropy(per_text, labels, label_smoothing=s)
        ) / 2
        return {"contrastive_loss": loss} if output_dict else loss


def global_batch_loss(label_smoothing: float, rank: int, world_size: int) -> SmoothedClipLoss:
    """The CLIP loss over the global batch at any worker count: every rank's features are negatives, gathered
    with their gradients (`gather_with_grad`), and each rank takes the rows it holds (`local_loss`: linear
    memory). DDP's mean over ranks is then the one-worker job's gradient (`tests/test_ddp.py` checks it)."""
    return SmoothedClipLoss(label_smoothing, rank=rank, world_size=world_size, gather_with_grad=True, local_loss=True)


def training_loss(loss_fn: ClipLoss, model: torch.nn.Module, outputs: tuple, balance: Balance | None) -> torch.Tensor:
    """CLIP loss, plus `coef · (image + text_weight · text)` load balancing when the model routes (CLIP-MoE)."""
    img_f, txt_f, logit_scale = outputs
    loss = loss_fn(img_f, txt_f, logit_scale)
    if balance and balance.coef:
        from mode_ray.models.moe import moe_balance_loss

        balancing = moe_balance_loss(model, balance.counts, balance.text_weight, balance.form, loss_fn.world_size)
        loss = loss + balance.coef * balancing.to(loss)
    return loss
