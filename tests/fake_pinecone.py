"""A local server speaking Pinecone's data-plane REST API, for the real `pinecone` SDK pointed at it by host.

Implemented: POST /vectors/upsert, /query (cosine, topK, includeMetadata, includeValues), /vectors/delete (ids,
deleteAll), /describe_index_stats, with namespaces. Requests need the Api-Key header (401 otherwise); a vector of the
wrong dimension gets 400 with Pinecone's error envelope. ``down`` makes every request fail with 503.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.local_http import send_json, serve


@dataclass
class FakePinecone:
    dimension: int
    api_key: str = "pc-test-key"
    namespaces: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    down: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> str:
        self._server = serve(self._handle)
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, namespace: str) -> int:
        with self._lock:
            return len(self.namespaces.get(namespace, {}))

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        raw = request.rfile.read(length) if length else b"{}"
        if self.down:
            return send_json(request, 503, {"code": 14, "message": "Service unavailable", "details": []})
        if request.headers.get("Api-Key") != self.api_key:
            return send_json(request, 401, {"code": 16, "message": "Invalid API Key", "details": []})
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return send_json(request, 400, {"code": 3, "message": "Invalid JSON", "details": []})
        route = {"/vectors/upsert": self._upsert, "/query": self._query, "/vectors/delete": self._delete,
                 "/describe_index_stats": self._stats}.get(request.path)
        if route is None:
            return send_json(request, 404, {"code": 5, "message": f"Not found: {request.path}", "details": []})
        with self._lock:
            self.requests.append((request.path, body))
            status, payload = route(body)
        send_json(request, status, payload)

    def _bad_dimension(self, values: list[float]) -> tuple[int, dict[str, Any]] | None:
        if len(values) != self.dimension:
            return 400, {"code": 3, "message": f"Vector dimension {len(values)} does not match the dimension of "
                                               f"the index {self.dimension}", "details": []}
        return None

    def _upsert(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        vectors = body.get("vectors") or []
        for vector in vectors:
            bad = self._bad_dimension(vector.get("values") or [])
            if bad:
                return bad
        space = self.namespaces.setdefault(body.get("namespace") or "", {})
        for vector in vectors:
            space[str(vector["id"])] = {"values": vector["values"], "metadata": vector.get("metadata") or {}}
        return 200, {"upsertedCount": len(vectors)}

    def _query(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        query = body.get("vector") or []
        bad = self._bad_dimension(query)
        if bad:
            return bad
        namespace = body.get("namespace") or ""
        scored = []
        for vector_id, stored in self.namespaces.get(namespace, {}).items():
            score = _cosine(query, stored["values"])
            match: dict[str, Any] = {"id": vector_id, "score": score, "values": []}
            if body.get("includeValues"):
                match["values"] = stored["values"]
            if body.get("includeMetadata"):
                match["metadata"] = stored["metadata"]
            scored.append(match)
        scored.sort(key=lambda match: -match["score"])
        return 200, {"matches": scored[:int(body.get("topK", 10))], "namespace": namespace,
                     "usage": {"readUnits": 1}}

    def _delete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        namespace = body.get("namespace") or ""
        if body.get("deleteAll"):
            self.namespaces.pop(namespace, None)
        else:
            space = self.namespaces.get(namespace, {})
            for vector_id in body.get("ids") or []:
                space.pop(str(vector_id), None)
        return 200, {}

    def _stats(self, _body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        namespaces = {name or "__default__": {"vectorCount": len(space)} for name, space in self.namespaces.items()}
        return 200, {"namespaces": namespaces, "dimension": self.dimension, "indexFullness": 0.0,
                     "totalVectorCount": sum(len(space) for space in self.namespaces.values()),
                     "metric": "cosine", "vectorType": "dense"}


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
