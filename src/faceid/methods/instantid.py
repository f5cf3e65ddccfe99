"""InstantID (SDXL): IdentityNet, a ControlNet on the face keypoints whose context is the identity tokens, and
its IP-Adapter (a Resampler over the antelopev2 embedding) in the UNet's cross-attention."""
