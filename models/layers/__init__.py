"""Layers more than one family uses: Mamba, conv norms, USEF cross-attention and FiLM, the
speaker-conditioning path of the spectral families, the frozen GE2E speaker encoder."""
