"""mdaf_dist: distributed training of MDAF (Mamba-DCN with Adaptive Fusion) CTR models."""

__version__ = "0.1.0"
