"""holons.ssl: self-supervised pretraining (Adam-v2 localizability, composability, decomposability)."""

from holons.ssl.backbone import Backbone, create_backbone
from holons.ssl.heads import CompositionHead, DecompositionHead, LocalizabilityHead
from holons.ssl.losses import (
    LocalizabilityLoss,
    LocalizabilityOutput,
    composition_loss,
    decomposition_loss,
    koleo_loss,
    mix_teacher_probs,
    view_pairs,
)
from holons.ssl.optim import clip_gradients_per_tensor, param_groups, set_lr, set_weight_decay
from holons.ssl.schedules import (
    cosine_schedule,
    lr_schedule,
    momentum_schedule,
    scaled_lr,
    weight_decay_schedule,
)
from holons.ssl.teacher import make_teacher, unwrap_model, update_teacher

__all__ = [
    "Backbone",
    "CompositionHead",
    "DecompositionHead",
    "LocalizabilityHead",
    "LocalizabilityLoss",
    "LocalizabilityOutput",
    "clip_gradients_per_tensor",
    "composition_loss",
    "cosine_schedule",
    "create_backbone",
    "decomposition_loss",
    "koleo_loss",
    "lr_schedule",
    "make_teacher",
    "mix_teacher_probs",
    "momentum_schedule",
    "param_groups",
    "scaled_lr",
    "set_lr",
    "set_weight_decay",
    "unwrap_model",
    "update_teacher",
    "view_pairs",
    "weight_decay_schedule",
]
