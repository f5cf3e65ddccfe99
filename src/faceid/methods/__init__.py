"""Identity methods beside IP-Adapter-FaceID: InstantID, PuLID and InfiniteYou, each a piece on the same seams.

A method says what it needs from a face (which insightface pack embeds it, keypoints, a parsed crop), what it
makes of it (identity tokens, a ControlNet, attention pieces in the denoiser) and how that enters the base model
for one call. Each lives in its own module; this package's table lists them with their released files.
"""
