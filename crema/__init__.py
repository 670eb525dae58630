"""CREMA: Contrastive Regularized Masked Autoencoder for 12-lead ECGs."""

__version__ = "0.1.0"
