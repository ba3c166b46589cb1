"""Merkle tree hashing as RFC 9162 (Certificate Transparency v2) section 2.1 defines it.

A bulk erasure records one root per batch in the ledger; each subject's outcome is a leaf, and
an inclusion proof shows that leaf is under that root without the other subjects' leaves.

- leaf hash: SHA-256(0x00 || data); interior node: SHA-256(0x01 || left || right);
- a tree of n > 1 leaves splits at k, the largest power of two below n: MTH(D[0:k]) on the
  left, MTH(D[k:n]) on the right; the empty tree's hash is SHA-256 of nothing.

Written here, against the RFC, rather than taken from a library: the one on PyPI (pymerkle) is
GPLv3 and says of itself that it is not audited. Roots and proof elements are lowercase hex.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _subtree(hashes: Sequence[bytes], start: int, end: int) -> bytes:
    """MTH of the leaves whose hashes are hashes[start:end] (end > start)."""
    if end - start == 1:
        return hashes[start]
    middle = start + _split(end - start)
    return node_hash(_subtree(hashes, start, middle), _subtree(hashes, middle, end))


def root_bytes(leaves: Sequence[bytes]) -> bytes:
    """The tree head MTH(D[n]) of the leaves' data, as bytes."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _subtree([leaf_hash(leaf) for leaf in leaves], 0, len(leaves))


def root(leaves: Sequence[bytes]) -> str:
    """The tree head of the leaves' data, in hex (the empty tree: SHA-256 of nothing)."""
    return root_bytes(leaves).hex()


def _path(hashes: Sequence[bytes], index: int, start: int, end: int) -> list[bytes]:
    """PATH(index, D[start:end]) of RFC 9162 section 2.1.3.1, the leaf's sibling first."""
    if end - start == 1:
        return []
    middle = start + _split(end - start)
    if start + index < middle:
        return [*_path(hashes, index, start, middle), _subtree(hashes, middle, end)]
    return [*_path(hashes, index - (middle - start), middle, end), _subtree(hashes, start, middle)]


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[str]:
    """The inclusion proof (audit path) of leaf `index` in the tree of `leaves`, in hex."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} is not in a tree of {len(leaves)} leaves")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    return [node.hex() for node in _path(hashes, index, 0, len(hashes))]


def _unhex(value: str) -> bytes | None:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        return None
    return raw if len(raw) == hashlib.sha256().digest_size else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[str], root: str) -> bool:
    """Whether `leaf` (its data) is leaf `index` of the tree of `size` leaves whose head is
    `root`, by `proof`: the algorithm of RFC 9162 section 2.1.3.2."""
    path = [_unhex(element) for element in proof]
    expected = _unhex(root)
    if not 0 <= index < size or expected is None:
        return False
    fn, sn, r = index, size - 1, leaf_hash(leaf)
    for p in path:
        if p is None or sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == expected
