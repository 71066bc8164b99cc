"""bkd_core: block-wise logit distillation (Block-KD) in plain PyTorch. No Ray, MLflow or Hydra."""
from . import data, methods, models, train
from .blocknet import BlockNet
from .connectors import build_connector
from .losses import dkd_loss, kd_loss, kd_ls_loss
from .methods import BlockKD, Distiller, DistillOutput, LogitKD
from .methods.blockkd import BlockKDOutput

__all__ = [
    "BlockNet", "BlockKD", "BlockKDOutput", "DistillOutput", "Distiller", "LogitKD", "build_connector",
    "kd_loss", "dkd_loss", "kd_ls_loss", "methods", "models", "data", "train",
]
__version__ = "0.1.0"
