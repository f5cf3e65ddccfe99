"""PuLID: the ID encoder (antelopev2 embedding + EVA02-CLIP-L features -> identity tokens) and its attention
pieces, in the SDXL UNet (v1.1) and between the FLUX.1 transformer's blocks (v0.9.1)."""
