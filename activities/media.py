"""transcribe and describe_image: what a voice note said or a photo showed, which becomes the user's message.

Regular activities on the LLM task queue, like generate_reply (paid calls, rate limited across workers, retried on
another worker when one dies). They download the file from Telegram by its id, so the bytes never pass through the
workflow's history.
"""

from __future__ import annotations

from temporalio import activity

from activities.errors import translate_errors
from activities.usage import UsageRecorder, records_usage
from clients.media import IMAGE_TYPES, MediaModel, audio_filename
from clients.telegram import TelegramChannel
from core.errors import ConfigurationError, InvalidMemoryDataError
from core.logging import get_logger
from schemas.turn import Attachment, UnderstandInput, Understood

_log = get_logger(__name__)


class MediaActivities:
    """The steps that turn an attachment into text, over Telegram (to download it) and the media model."""

    def __init__(self, telegram: TelegramChannel | None, media: MediaModel | None,
                 usage: UsageRecorder | None = None):
        self._telegram, self._media, self._usage = telegram, media, usage

    @activity.defn(name="transcribe")
    @translate_errors
    @records_usage
    async def transcribe(self, data: UnderstandInput) -> Understood:
        """The transcript of a voice note, audio file or round video (and its caption): the user's message."""
        attachment = data.attachment
        filename = audio_filename(attachment.mime_type, attachment.kind.value)
        if filename is None:
            raise InvalidMemoryDataError(f"audio of type {attachment.mime_type} can't be transcribed",
                                         context={"message_key": data.message_key})
        media = self._ready(hears=True)
        audio = await self._download(attachment)
        heard = await media.transcribe(audio, filename, float(attachment.duration_s or 0))
        _log.info("media.understood", message_key=data.message_key, kind=attachment.kind.value, chars=len(heard))
        text = "\n\n".join(part for part in (heard or "(nothing to hear)", attachment.caption) if part)
        return Understood(text=text, model=media.transcribe_model)

    @activity.defn(name="describe_image")
    @translate_errors
    @records_usage
    async def describe_image(self, data: UnderstandInput) -> Understood:
        """A photo's description beside its caption: the user's message."""
        attachment = data.attachment
        mime_type = attachment.mime_type or "image/jpeg"  # Telegram's photos are JPEG
        if mime_type not in IMAGE_TYPES:
            raise InvalidMemoryDataError(f"an image of type {mime_type} can't be described",
                                         context={"message_key": data.message_key})
        media = self._ready(hears=False)
        image = await self._download(attachment)
        seen = await media.describe(image, mime_type, attachment.caption)
        _log.info("media.understood", message_key=data.message_key, kind=attachment.kind.value, chars=len(seen))
        text = f"[Photo: {seen}]" + (f"\n\n{attachment.caption}" if attachment.caption else "")
        return Understood(text=text, model=media.vision_model)

    def _ready(self, hears: bool) -> MediaModel:
        if self._media is None or not (self._media.hears if hears else self._media.sees):
            what = "transcription" if hears else "vision"
            raise ConfigurationError(f"this worker has no {what} model: set OPENAI_API_KEY or OPENAI_BASE_URL"
                                     + (" (or TRANSCRIBE_BASE_URL)" if hears else ""))
        return self._media

    async def _download(self, attachment: Attachment) -> bytes:
        if self._telegram is None:
            raise ConfigurationError("this worker has no TELEGRAM_BOT_TOKEN, so it cannot download the file")
        return await self._telegram.download(attachment.file_id)

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.transcribe, self.describe_image]
