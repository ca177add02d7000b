"""Headless training for FireRed-Image-Edit: data, buckets, noise levels, losses, extraction and the trainer.

Everything here reuses the inference code in ``firered_core`` (conditioning, references, latents, sampling) so a
model is trained on exactly what it sees at inference.
"""
