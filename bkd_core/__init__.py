"""bkd_core: block-wise logit distillation (Block-KD) in plain PyTorch. No Ray, MLflow or Hydra."""
from . import data, models, train
from .blocknet import BlockNet
from .connectors import build_connector
from .distiller import BlockKD, BlockKDOutput, LogitKD
from .losses import dkd_loss, kd_loss, kd_ls_loss

__all__ = [
    "BlockNet", "BlockKD", "BlockKDOutput", "LogitKD", "build_connector",
    "kd_loss", "dkd_loss", "kd_ls_loss", "models", "data", "train",
]
__version__ = "0.1.0"
