"""Data: tokenizers, indexed binary datasets, preprocessing, blending, samplers."""
