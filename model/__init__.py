"""The Masked Autoencoder (He et al. 2021) in plain PyTorch. Knows nothing of HTTP."""

from model.config import CONFIGS, MAEConfig, get_config
from model.mae import MAE, DecoderMissingError, ReconstructOutput
from model.masking import Masking, explicit_masking, len_keep_for_ratio, random_noise

__all__ = [
    "CONFIGS",
    "MAE",
    "DecoderMissingError",
    "MAEConfig",
    "Masking",
    "ReconstructOutput",
    "explicit_masking",
    "get_config",
    "len_keep_for_ratio",
    "random_noise",
]
