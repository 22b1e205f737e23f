"""Losses: cross-entropy + soft Dice for the classes, weighted MSE for the immune-cell heatmap.

Target mask values: a class index, IGNORE (outside every labelled region: no loss) or NOT_NERVE (an image
known to hold no nerve: only a high nerve probability is penalised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nervedet.train.data import IGNORE, NOT_NERVE  # the label values live with the labels


def class_loss(logits: torch.Tensor, mask: torch.Tensor, nerve_index: int) -> torch.Tensor:
    """Cross-entropy + soft Dice over labelled pixels (Dice per patch and class), plus -log(1 - p_nerve) on
    NOT_NERVE pixels."""
    n_cls = logits.shape[1]
    labelled = mask < n_cls
    target = torch.where(labelled, mask, torch.full_like(mask, IGNORE))
    logp = F.log_softmax(logits.float(), dim=1)
    zero = logits.sum() * 0.0  # keeps the graph when nothing is labelled
    ce = F.nll_loss(logp, target, ignore_index=IGNORE) if labelled.any() else zero
    prob = logp.exp()
    dice = zero
    if labelled.any():
        onehot = F.one_hot(torch.where(labelled, mask, 0), n_cls).permute(0, 3, 1, 2).float()
        w = labelled.unsqueeze(1).float()
        # per patch and class (N, C), averaged over the pairs present: a patch centred on a small nerve
        # weighs as much as one full of a large nerve, so small nerves are not drowned in the batch's pixels
        inter = (prob * onehot * w).sum(dim=(2, 3))
        denom = (prob * w).sum(dim=(2, 3)) + (onehot * w).sum(dim=(2, 3))
        present = (onehot * w).sum(dim=(2, 3)) > 0
        dice_c = (2 * inter + 1.0) / (denom + 1.0)
        dice = 1.0 - dice_c[present].mean()
    neg = mask == NOT_NERVE
    not_nerve = zero
    if neg.any():
        p_nerve = prob[:, nerve_index][neg].clamp(max=1 - 1e-6)
        not_nerve = -torch.log1p(-p_nerve).mean()
    return ce + dice + not_nerve


def heatmap_loss(logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, pos_weight: float = 20.0
                 ) -> torch.Tensor:
    """Weighted MSE between sigmoid(logit) and the Gaussian target, over valid pixels; the few pixels near
    cell centres weigh more so that the empty background does not win."""
    p = torch.sigmoid(logit.float())
    w = (1.0 + pos_weight * target) * valid
    return (w * (p - target) ** 2).sum() / valid.sum().clamp(min=1.0)
