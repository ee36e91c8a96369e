"""The Masked Autoencoder (He et al. 2021) in plain PyTorch. Knows nothing of HTTP."""

from model.config import CONFIGS, MAEConfig, get_config
from model.family import DecoderMissingError, MaskedAutoencoder
from model.mae import MAE
from model.masking import Masking, explicit_masking, len_keep_for_ratio, random_noise
from model.outputs import Embedding, EncodeBatch, ReconstructBatch, Reconstruction

__all__ = [
    "CONFIGS",
    "MAE",
    "DecoderMissingError",
    "Embedding",
    "EncodeBatch",
    "MAEConfig",
    "MaskedAutoencoder",
    "Masking",
    "ReconstructBatch",
    "Reconstruction",
    "explicit_masking",
    "get_config",
    "len_keep_for_ratio",
    "random_noise",
]
