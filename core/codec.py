"""Payloads encrypted on the client: what users write never reaches Temporal's database (or its backups) in clear.

Every payload a client or worker sends (workflow and activity inputs and results, signals, updates, queries, memos,
the summaries the UI shows) is compressed when that makes it smaller, then encrypted with AES-256-GCM under the first
key of PAYLOAD_KEYS; the key's id travels in the payload's metadata, so a payload written under an older key is read
with that key as long as PAYLOAD_KEYS still holds it (keys rotate by putting a new one first). Payloads that were
never encrypted (written before keys were set) are read as they are. The codec server (cli/codec_server.py) gives
authorised operators the same decoding for the Temporal UI and CLI.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from core.errors import ConfigurationError

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
COMPRESSED = "compressed"  # b"zlib" when the payload was compressed before it was encrypted
KEY_BYTES = 32
NONCE_BYTES = 12
_KEY_ID_FORM = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class PayloadKeyError(ConfigurationError):
    """A payload can't be read with the keys at hand: its key is not in PAYLOAD_KEYS, or it was altered."""

    code = "PAYLOAD_KEY_ERROR"


def parse_keys(text: str) -> dict[str, bytes]:
    """PAYLOAD_KEYS, `ID:KEY,ID:KEY` (KEY: 32 bytes in URL-safe base64), in order: the first encrypts."""
    keys: dict[str, bytes] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        if not sep or not _KEY_ID_FORM.fullmatch(key_id):
            raise ValueError("expected ID:KEY pairs separated by commas, as `companion keys new` prints them")
        try:
            key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {key_id} is not {KEY_BYTES} bytes in URL-safe base64 (`companion keys new` makes "
                             "one)")
        if key_id in keys:
            raise ValueError(f"key id {key_id} appears twice")
        keys[key_id] = key
    if not keys:
        raise ValueError("no key: expected ID:KEY pairs separated by commas")
    return keys


def new_key_line(now: datetime | None = None) -> str:
    """A fresh key as a PAYLOAD_KEYS entry: `ID:KEY`, the id naming the day it was made."""
    key_id = f"k{(now or datetime.now(UTC)):%Y%m%d}-{secrets.token_hex(3)}"
    return f"{key_id}:{base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip('=')}"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over whole payloads (their metadata included), compressed first when that makes them smaller."""

    def __init__(self, keys: dict[str, bytes]):
        if not keys:
            raise ConfigurationError("an encryption codec needs at least one key")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.key_id = next(iter(keys))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        plain = payload.SerializeToString()
        packed = zlib.compress(plain, 6)
        compressed = len(packed) < len(plain)
        nonce = os.urandom(NONCE_BYTES)
        metadata = {"encoding": ENCODING, KEY_ID: self.key_id.encode()}
        if compressed:
            metadata[COMPRESSED] = b"zlib"
        sealed = self._ciphers[self.key_id].encrypt(nonce, packed if compressed else plain, self.key_id.encode())
        return Payload(metadata=metadata, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # written before payloads were encrypted
        key_id = payload.metadata.get(KEY_ID, b"").decode()
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadKeyError(f"a payload is encrypted with key {key_id!r}, which PAYLOAD_KEYS does not hold",
                                  context={"key_id": key_id})
        try:
            plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
        except InvalidTag:
            raise PayloadKeyError(f"a payload under key {key_id!r} does not decrypt: it was altered, or the key "
                                  "is not the one it was written with", context={"key_id": key_id}) from None
        if payload.metadata.get(COMPRESSED) == b"zlib":
            plain = zlib.decompress(plain)
        return Payload.FromString(plain)
