"""Speak the prompt: speech to text through transformers' ``automatic-speech-recognition`` pipeline (Whisper).

``Transcriber.from_pretrained()`` loads the default model (``openai/whisper-small``, pinned to a commit; a Hub id
or a local folder otherwise); ``transcriber(audio_bytes)`` decodes audio of any container and codec a browser or a
phone records (WebM/Opus, Ogg, MP4/AAC, MP3, WAV...: PyAV's FFmpeg) to 16 kHz mono and returns the text.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np

from .errors import FaceIDError
from .hub import HubFolder, offline

SAMPLING_RATE = 16_000  # Hz, what Whisper's feature extractor reads
MAX_SECONDS = 120.0  # a spoken prompt; longer audio is refused before it is decoded further
# openai/whisper-small (Apache-2.0): multilingual, 244M parameters, fast enough on a CPU for a prompt.
DEFAULT_SPEECH_MODEL = HubFolder("openai/whisper-small", None, "973afd24965f72e36ca33b3055d56a652f456b4d")


class AudioError(FaceIDError):
    """Audio that cannot be read, is empty or too long."""


def decode_audio(data: bytes, max_seconds: float = MAX_SECONDS, label: str = "the audio") -> np.ndarray:
    """Any audio file's bytes -> 16 kHz mono float32 samples; ``AudioError`` when it is not audio, holds none, or
    is longer than ``max_seconds`` (checked while decoding: a long file stops early)."""
    try:
        import av
    except ImportError as exc:  # a dependency of faceid; only a broken install lacks it
        raise FaceIDError("decoding audio needs PyAV: pip install av") from exc
    limit = int(max_seconds * SAMPLING_RATE)
    parts: list[np.ndarray] = []
    count = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError(f"{label} holds no audio stream: send a recording (wav, webm, ogg, mp3, m4a)")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLING_RATE)
            for frame in container.decode(container.streams.audio[0]):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    count += parts[-1].size
                if count > limit:
                    raise AudioError(f"{label} is longer than {max_seconds:.0f} s: send a shorter recording")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError, OSError) as exc:  # not a container FFmpeg can read
        raise AudioError(f"{label} could not be read as audio ({' '.join(str(exc).split())[:200]})") from None
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioError(f"{label} holds no sound: record again")
    return samples.astype(np.float32, copy=False)


class Transcriber:
    """A speech recognition pipeline, one call at a time (generation keeps state on the model's generation
    config); ``name``: what it was loaded from, to show."""

    def __init__(self, pipeline: Any, name: str) -> None:
        self.pipeline = pipeline
        self.name = name
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, source: str | HubFolder | None = None, device: str | None = None) -> Transcriber:
        """``source``: a Hub id or a transformers folder of a Whisper (or any ASR) model; None: the pinned default."""
        from transformers import pipeline

        source = source or DEFAULT_SPEECH_MODEL
        model, revision = (source.repo, source.revision) if isinstance(source, HubFolder) else (str(source), None)
        try:
            asr = pipeline("automatic-speech-recognition", model=model, revision=revision, device=device)
        except OSError as exc:
            hint = " (offline: download it once online, or give a local folder)" if offline() else ""
            raise FaceIDError(f"speech model {model} could not be loaded{hint}: {exc}") from exc
        return cls(asr, str(source))

    def __call__(self, audio: bytes, language: str | None = None, prompt: str | None = None) -> str:
        """The text spoken in ``audio`` (a file's bytes). ``language``: its ISO code, else detected (multilingual
        models); ``prompt``: text that came before it (names, spelling), as Whisper takes it."""
        samples = decode_audio(audio)
        options: dict[str, Any] = {}
        if language:
            options["language"] = language
        if prompt:
            options["prompt_ids"] = self.pipeline.tokenizer.get_prompt_ids(prompt, return_tensors="pt")
        with self._lock:
            try:
                extra = {"generate_kwargs": options} if options else {}
                result = self.pipeline({"raw": samples, "sampling_rate": SAMPLING_RATE}, **extra)
            except ValueError as exc:  # a language the model does not know, ...
                raise FaceIDError(f"transcription: {' '.join(str(exc).split())[:300]}") from None
        return str(result["text"]).strip()
