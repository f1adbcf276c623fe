"""Baselines trained with the same encoder, augmentation and loss as MocoSFL."""
