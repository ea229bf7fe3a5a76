"""Deep mutual learning.

Zhang, Xiang, Hospedales, Lu: "Deep Mutual Learning", CVPR 2018,
https://arxiv.org/abs/1706.00384

Two networks train together, each on CE + lambda * KL(softmax(other) ||
softmax(own)), batch mean, the other's prediction taken as a fixed target.
train_dml.py applies it (one call per network, arguments swapped); it is not
a --kd_mode of train_kd.py, so it is exported but not registered.
"""
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DML']


class DML(nn.Module):
    def forward(self, out1, out2):
        """KL(softmax(out2) || softmax(out1)); out2 is a target, so no gradient reaches it."""
        log_p1 = F.log_softmax(out1.float(), dim=1)
        log_p2 = F.log_softmax(out2.detach().float(), dim=1)
        return F.kl_div(log_p1, log_p2, reduction='batchmean', log_target=True)
