"""Tensors on disk without pickle: `safetensors` files whose non-tensor part is JSON metadata.

Every file crema writes for weights (checkpoints, encoders) is a safetensors file: a JSON header and raw
tensor bytes. Reading one runs no code, whatever the file holds. A file that is not safetensors (a
``torch.save`` zip or a raw pickle, which can run arbitrary code when loaded) is refused with
:class:`UnsafeArtifactError`; nothing in crema calls ``torch.load`` on a user path without
``weights_only=True``.

A nested state (an optimiser's ``state_dict``, say) is stored as its tensors, each under a path-like key,
plus the rest of the tree as JSON in which every tensor is ``{"__tensor__": key}``; tuples and dicts with
non-string keys are tagged so that :func:`unpack` gives back exactly what :func:`pack` took.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping

import safetensors.torch
import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class UnsafeArtifactError(ValueError):
    """A weights file that is not a well-formed safetensors file: refused, never unpickled."""


def _kind(data: bytes) -> str:
    if data[:4] == b"PK\x03\x04":
        return "a torch.save zip archive, which holds a pickle"
    if data[:1] == b"\x80":
        return "a Python pickle"
    if not data:
        return "empty"
    return "not safetensors"


def read(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file's bytes; `what` names the file in errors."""
    refused = (f"{what} is not a valid safetensors file ({{kind}}); refused: crema reads weights only as "
               "safetensors and never unpickles a file, which could run code")
    if len(data) < 8:
        raise UnsafeArtifactError(refused.format(kind=_kind(data) if data else "empty"))
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data) or data[8:9] != b"{":
        raise UnsafeArtifactError(refused.format(kind=_kind(data)))
    try:
        header = json.loads(data[8:8 + size])
        tensors = safetensors.torch.load(data)
    except Exception as err:  # truncated, corrupt: the message says which file
        raise UnsafeArtifactError(refused.format(kind=f"corrupt: {err}")) from err
    metadata = header.get("__metadata__") or {}
    return tensors, dict(metadata)


def content_digest(data: bytes) -> str:
    """SHA-256 of what a safetensors file holds — its metadata and every tensor by name, dtype and shape —
    whatever order its header lists them in. safetensors writes the metadata from an unordered map, so the
    same weights saved by two processes can differ in bytes: cache keys use this, not the bytes' hash."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    digest = hashlib.sha256(json.dumps(header.pop("__metadata__", None) or {}, sort_keys=True).encode())
    for name in sorted(header):
        spec = header[name]
        start, end = spec["data_offsets"]
        digest.update(json.dumps([name, spec["dtype"], spec["shape"]]).encode())
        digest.update(body[start:end])
    return digest.hexdigest()


def write(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes: tensors copied to contiguous CPU memory (no shared storage)."""
    plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    return safetensors.torch.save(plain, metadata=dict(metadata))


def pack(tree: object, prefix: str = "") -> tuple[dict[str, torch.Tensor], str]:
    """A nested state → (its tensors by key, the rest as JSON)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: object, path: str) -> object:
        if isinstance(node, torch.Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, Mapping):
            if all(isinstance(k, str) for k in node):
                return {k: walk(v, f"{path}/{k}") for k, v in node.items()}
            return {"__items__": [[k, walk(v, f"{path}/{k}")] for k, v in node.items()]}
        if isinstance(node, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(node)]}
        if isinstance(node, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {path or '/'} without pickle")

    skeleton = walk(tree, prefix)
    return tensors, json.dumps(skeleton)


def unpack(tensors: Mapping[str, torch.Tensor], skeleton: str) -> object:
    """What :func:`pack` took, from its two parts."""

    def build(node: object) -> object:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            if set(node) == {"__items__"}:
                return {k: build(v) for k, v in node["__items__"]}
            if set(node) == {"__tuple__"}:
                return tuple(build(v) for v in node["__tuple__"])
            return {k: build(v) for k, v in node.items()}
        if isinstance(node, list):
            return [build(v) for v in node]
        return node

    return build(json.loads(skeleton))
