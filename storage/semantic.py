"""Semantic memory wired from the settings: the embedder, the vector store, and the index over both."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.errors import ConfigurationError, VectorStoreConnectionError
from core.logging import get_logger
from core.settings import Settings
from storage.embedding import OPENAI_DIMENSIONS, Embedder, MiniLMEmbedder, OpenAIEmbedder
from storage.recall import MemoryIndex
from storage.vectors import PgVectorStore, PineconeStore, VectorStore

_log = get_logger(__name__)
EMBEDDING_TIMEOUT_S = 30.0
_local: MiniLMEmbedder | None = None


def local_embedder() -> MiniLMEmbedder:
    """The offline embedder, loaded once per process (~23 MB model)."""
    global _local
    if _local is None:
        _local = MiniLMEmbedder()
    return _local


def create_embedder(settings: Settings) -> Embedder:
    """OpenAI's embeddings when configured, else the offline all-MiniLM-L6-v2."""
    if not settings.uses_openai_embeddings:
        return local_embedder()
    from clients.http import openai_client

    dimension = settings.embedding_dimension or OPENAI_DIMENSIONS.get(settings.openai_embedding_model)
    if dimension is None:
        raise ConfigurationError(f"EMBEDDING_DIMENSION: unknown vector size of {settings.openai_embedding_model!r}; "
                                 "set it to the model's dimension")
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unused"
    client = openai_client(settings.openai_base_url, api_key, max_retries=2, timeout=EMBEDDING_TIMEOUT_S)
    return OpenAIEmbedder(client, settings.openai_embedding_model, dimension)


def pinecone_host(settings: Settings, dimension: int, create: bool = True) -> str:
    """The data-plane host of PINECONE_INDEX: as configured, else looked up, creating a serverless index if none
    (unless ``create`` is false)."""
    if settings.pinecone_host:
        return settings.pinecone_host
    from pinecone import Pinecone, ServerlessSpec
    from pinecone.errors import NotFoundError

    assert settings.pinecone_api_key is not None
    client = Pinecone(api_key=settings.pinecone_api_key.get_secret_value())
    try:
        try:
            described: Any = client.describe_index(settings.pinecone_index)
        except NotFoundError:
            if not create:
                raise
            _log.warning("pinecone.creating_index", index=settings.pinecone_index, dimension=dimension)
            described = client.create_index(name=settings.pinecone_index, dimension=dimension, metric="cosine",
                                            spec=ServerlessSpec(cloud=settings.pinecone_cloud,
                                                                region=settings.pinecone_region))
        return described.host
    except Exception as exc:
        raise VectorStoreConnectionError(f"Pinecone index {settings.pinecone_index!r} unavailable "
                                         f"({type(exc).__name__})", context={"index": settings.pinecone_index},
                                         cause=exc) from exc
    finally:
        client.close()


def create_vector_store(settings: Settings, sessions: async_sessionmaker[AsyncSession],
                        dimension: int) -> VectorStore:
    """Pinecone when PINECONE_API_KEY is set, else pgvector in the companion's PostgreSQL."""
    if settings.pinecone_api_key is None:
        return PgVectorStore(sessions)
    return PineconeStore.connect(settings.pinecone_api_key.get_secret_value(), pinecone_host(settings, dimension))


def create_memory_index(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> MemoryIndex:
    embedder = create_embedder(settings)
    return MemoryIndex(sessions, embedder, create_vector_store(settings, sessions, embedder.dimension))
