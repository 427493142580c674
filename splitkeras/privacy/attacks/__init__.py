"""Attacks an honest-but-curious server can run on the tensors it receives."""

from splitkeras.privacy.attacks.labels import auc, binary_attacks, cluster_attack, cosine_attack, norm_attack
from splitkeras.privacy.attacks.reconstruction import reconstruction_scores, save_pictures, train_decoder

__all__ = ["auc", "binary_attacks", "cluster_attack", "cosine_attack", "norm_attack",
           "reconstruction_scores", "save_pictures", "train_decoder"]
