"""faceid: identity-preserving image generation with IP-Adapter-FaceID."""

__version__ = "0.1.0"
