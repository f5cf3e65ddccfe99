"""A stand-in for OpenPose's body network, for tests of the pose decoding without the released weights."""

from __future__ import annotations

import numpy as np
import torch

from faceid.openpose import LIMBS, NETWORK_HEIGHT, PAF_CHANNELS

# An upright person in a 320x240 photo: nose, neck, shoulders, elbows, wrists, hips, knees, ankles, eyes, ears.
UPRIGHT_PERSON = [(160, 40), (160, 70), (130, 70), (120, 110), (115, 150), (190, 70), (200, 110), (205, 150),
                  (140, 140), (140, 180), (140, 220), (180, 140), (180, 180), (180, 220), (152, 34), (168, 34),
                  (142, 40), (178, 40)]  # fmt: skip


class StandInOpenPose(torch.nn.Module):
    """OpenPose's interface (BGR image -> 38 PAF and 19 heatmap channels at 1/8) answering one made-up person:
    Gaussian peaks at ``points`` and unit vectors along every limb between them. ``points`` are pixels of a photo
    ``photo_height`` tall, which the network reads 184 px tall, pixel centre onto pixel centre (as OpenCV resizes);
    output cell i stands for input pixel 8 i + 3.5 (the centre of its 8 pixels, as the released network was
    trained)."""

    def __init__(self, points, photo_height):
        super().__init__()
        self.limbs, self.paf_channels = LIMBS, PAF_CHANNELS
        on_input = (np.asarray(points, np.float64) + 0.5) * (NETWORK_HEIGHT / photo_height) - 0.5
        self.points = (on_input - 3.5) / 8  # -> output cells

    def forward(self, x):
        h, w = x.shape[2] // 8, x.shape[3] // 8
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        heat, paf = np.zeros((19, h, w)), np.zeros((38, h, w))
        for k, (px, py) in enumerate(self.points):
            heat[k] = np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / 2.0)
        for (a, b), (cx, cy) in zip(self.limbs, self.paf_channels, strict=True):
            pa, pb = self.points[a], self.points[b]
            v = (pb - pa) / np.linalg.norm(pb - pa)
            t = np.clip(((xx - pa[0]) * v[0] + (yy - pa[1]) * v[1]) / np.linalg.norm(pb - pa), 0, 1)
            near = np.hypot(xx - pa[0] - t * (pb - pa)[0], yy - pa[1] - t * (pb - pa)[1]) < 1.5
            paf[cx][near], paf[cy][near] = v[0], v[1]
        return torch.from_numpy(paf[None]).float(), torch.from_numpy(heat[None]).float()
