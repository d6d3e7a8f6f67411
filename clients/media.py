"""What a voice note said and what a photo showed: the OpenAI-compatible audio.transcriptions endpoint and a
vision-capable chat model, through the openai SDK."""

from __future__ import annotations

import base64
import time

from openai import AsyncOpenAI
from openai.types.audio import Transcription
from openai.types.chat import ChatCompletion

from clients.http import openai_client
from clients.llm import REQUEST_TIMEOUT_S, SDK_RETRIES, count_call, model_errors
from core.errors import OpenAIServiceError
from core.logging import get_logger
from core.settings import Settings
from core.usage import ModelCall, note_call

# The formats the transcription endpoint reads, by the file name's extension (Telegram's voice notes are Ogg Opus,
# round videos MP4).
AUDIO_FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
AUDIO_EXTENSIONS = {"audio/ogg": "ogg", "audio/opus": "ogg", "audio/mpeg": "mp3", "audio/mp3": "mp3",
                    "audio/mp4": "m4a", "audio/m4a": "m4a", "audio/x-m4a": "m4a", "audio/aac": "m4a",
                    "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac",
                    "audio/x-flac": "flac", "audio/webm": "webm", "video/mp4": "mp4", "video/webm": "webm"}
# The image formats vision models read.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
DESCRIBE_TOKENS = 300
DESCRIBE_PROMPT = (
    "You are the eyes of a companion the user is chatting with. Describe the photo the user just sent in two or "
    "three plain sentences: who or what is in it, where, what is happening, any text in it. Name people, pets and "
    "places only when the caption names them. Say only what is there; no greeting, no advice.")

_log = get_logger(__name__)


class MediaModel:
    """Transcribes audio and describes images for the companion; each call raises OpenAIServiceError on failure,
    retryable or not by its cause, as the chat model does."""

    def __init__(self, transcriber: AsyncOpenAI | None, transcribe_model: str, vision: AsyncOpenAI | None,
                 vision_model: str):
        self._transcriber, self.transcribe_model = transcriber, transcribe_model
        self._vision, self.vision_model = vision, vision_model

    @property
    def hears(self) -> bool:
        return self._transcriber is not None

    @property
    def sees(self) -> bool:
        return self._vision is not None

    async def close(self) -> None:
        for client in {self._transcriber, self._vision} - {None}:
            await client.close()  # type: ignore[union-attr]

    async def transcribe(self, audio: bytes, filename: str, audio_seconds: float = 0.0) -> str:
        """What is said in ``audio`` (named with its format's extension, ``audio_seconds`` long when known), as
        text."""
        if self._transcriber is None:
            raise OpenAIServiceError("no transcription model is configured", retryable=False)
        started = time.perf_counter()
        with model_errors(self.transcribe_model, "transcribe", "the transcription endpoint"):
            result = await self._transcriber.audio.transcriptions.create(model=self.transcribe_model,
                                                                         file=(filename, audio))
        count_call(self.transcribe_model, "ok", time.perf_counter() - started, purpose="transcribe")
        text = result.text if isinstance(result, Transcription) else str(result)
        used = result.usage if isinstance(result, Transcription) else None
        note_call(ModelCall(purpose="transcribe", model=self.transcribe_model,
                            prompt_tokens=getattr(used, "input_tokens", 0) or 0,
                            completion_tokens=getattr(used, "output_tokens", 0) or 0,
                            audio_seconds=audio_seconds or float(getattr(used, "seconds", 0) or 0)))
        _log.info("media.transcribed", model=self.transcribe_model, bytes=len(audio), chars=len(text),
                  duration_ms=round((time.perf_counter() - started) * 1000))
        return text.strip()

    async def describe(self, image: bytes, mime_type: str, caption: str | None) -> str:
        """What ``image`` shows, in a few sentences, read with its caption."""
        if self._vision is None:
            raise OpenAIServiceError("no vision model is configured", retryable=False)
        url = f"data:{mime_type};base64,{base64.b64encode(image).decode()}"
        said = f"The caption: {caption}" if caption else "No caption."
        body = {"model": self.vision_model, "max_tokens": DESCRIBE_TOKENS, "temperature": 0,
                "messages": [{"role": "system", "content": DESCRIBE_PROMPT},
                             {"role": "user", "content": [{"type": "text", "text": said},
                                                          {"type": "image_url", "image_url": {"url": url}}]}]}
        started = time.perf_counter()
        with model_errors(self.vision_model, "describe_image", "the vision model"):
            response = await self._vision.post("/chat/completions", body=body, cast_to=ChatCompletion)
        count_call(self.vision_model, "ok", time.perf_counter() - started, response.usage,
                    purpose="describe_image", images=1)
        text = (response.choices[0].message.content or "").strip() if response.choices else ""
        if not text:
            raise OpenAIServiceError("the vision model returned no description", context={"model": self.vision_model})
        return text


def audio_filename(mime_type: str | None, kind: str) -> str | None:
    """A file name whose extension tells the transcription endpoint the format; None for a format it can't read."""
    if mime_type is None:
        return f"{kind}.ogg" if kind == "voice" else f"{kind}.mp4" if kind == "video_note" else None
    extension = AUDIO_EXTENSIONS.get(mime_type.lower())
    return f"{kind}.{extension}" if extension else None


def create_media_model(settings: Settings) -> MediaModel:
    """The transcription and vision models these settings configure (either may be absent: the embedded model
    neither hears nor sees)."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unused"
    shared = None if settings.uses_local_model else openai_client(settings.openai_base_url, key,
                                                                   max_retries=SDK_RETRIES, timeout=REQUEST_TIMEOUT_S)
    transcriber = shared
    if settings.transcribe_base_url is not None:
        transcriber = openai_client(settings.transcribe_base_url, key, max_retries=SDK_RETRIES,
                                    timeout=REQUEST_TIMEOUT_S)
    return MediaModel(transcriber, settings.transcribe_model, shared,
                      settings.vision_model or settings.openai_chat_model)
