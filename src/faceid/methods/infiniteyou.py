"""InfiniteYou (FLUX.1): the recognizer embedding projected into identity tokens, and InfuseNet, a FLUX
ControlNet that reads them in place of text."""
