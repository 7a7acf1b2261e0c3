"""Datasets and input pipelines: embedded digits, the toy Gaussian mixture, TFDS ImageNet."""
