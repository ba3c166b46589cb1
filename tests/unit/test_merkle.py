"""RFC 9162 Merkle trees: known heads worked out from the definition, every proof of trees of
1 to 40 leaves verifies, and any change to the leaf, its index, the size, a proof element or the
root makes the proof fail."""

from __future__ import annotations

import hashlib

import pytest

from lethe.evidence import merkle


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _leaf(data: bytes) -> bytes:
    return _h(b"\x00" + data)


def _node(left: bytes, right: bytes) -> bytes:
    return _h(b"\x01" + left + right)


LEAVES = [f"leaf-{n}".encode() for n in range(40)]


def test_the_empty_tree_is_the_hash_of_nothing() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle.root([]) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_one_leaf_is_its_leaf_hash() -> None:
    assert merkle.root([b""]) == _leaf(b"").hex()
    # SHA-256 of the single byte 0x00: the RFC 6962 test vector for the empty leaf.
    assert merkle.root([b""]) == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


def test_heads_worked_out_from_the_definition() -> None:
    a, b, c, d, e = (_leaf(data) for data in LEAVES[:5])
    assert merkle.root(LEAVES[:2]) == _node(a, b).hex()
    # Three leaves split at two: ((a b) c), not (a (b c)).
    assert merkle.root(LEAVES[:3]) == _node(_node(a, b), c).hex()
    assert merkle.root(LEAVES[:4]) == _node(_node(a, b), _node(c, d)).hex()
    # Five leaves split at four: the last leaf is lifted, not duplicated.
    assert merkle.root(LEAVES[:5]) == _node(_node(_node(a, b), _node(c, d)), e).hex()


def test_a_proof_is_the_path_of_siblings_from_the_leaf_up() -> None:
    a, b, c, d, e = (_leaf(data) for data in LEAVES[:5])
    assert merkle.inclusion_proof(LEAVES[:5], 2) == [
        d.hex(),
        _node(a, b).hex(),
        e.hex(),
    ]
    assert merkle.inclusion_proof(LEAVES[:5], 4) == [_node(_node(a, b), _node(c, d)).hex()]
    assert merkle.inclusion_proof(LEAVES[:1], 0) == []


# The reference vectors of RFC 6962's tree hashing (unchanged in RFC 9162), as the Certificate
# Transparency implementations test against: eight leaves, the head of each prefix, and the
# proof of the first leaf in the tree of eight.
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
CT_HEADS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_the_certificate_transparency_reference_vectors() -> None:
    for size in range(1, 9):
        assert merkle.root(CT_LEAVES[:size]) == CT_HEADS[size - 1], size
    proof = merkle.inclusion_proof(CT_LEAVES, 0)
    assert proof == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert merkle.verify_inclusion(CT_LEAVES[0], 0, 8, proof, CT_HEADS[7])


@pytest.mark.parametrize("size", range(1, 41))
def test_every_leaf_of_every_tree_up_to_40_verifies(size: int) -> None:
    leaves = LEAVES[:size]
    head = merkle.root(leaves)
    for index, leaf in enumerate(leaves):
        proof = merkle.inclusion_proof(leaves, index)
        assert merkle.verify_inclusion(leaf, index, size, proof, head), (size, index)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 31, 32, 33, 40])
def test_any_change_makes_a_proof_fail(size: int) -> None:
    leaves = LEAVES[:size]
    head = merkle.root(leaves)
    for index, leaf in enumerate(leaves):
        proof = merkle.inclusion_proof(leaves, index)
        assert not merkle.verify_inclusion(leaf + b"!", index, size, proof, head)
        assert not merkle.verify_inclusion(leaf, index, size, proof, _flipped(head))
        for other in range(size + 1):
            if other != index:
                assert not merkle.verify_inclusion(leaf, other, size, proof, head), other
        for at in range(len(proof)):
            changed = [*proof[:at], _flipped(proof[at]), *proof[at + 1 :]]
            assert not merkle.verify_inclusion(leaf, index, size, changed, head)
        assert not merkle.verify_inclusion(leaf, index, size, [*proof, head], head)
        if proof:
            assert not merkle.verify_inclusion(leaf, index, size, proof[:-1], head)


def test_a_wrong_size_or_malformed_input_fails_without_raising() -> None:
    leaves = LEAVES[:6]
    head = merkle.root(leaves)
    proof = merkle.inclusion_proof(leaves, 3)
    assert merkle.verify_inclusion(leaves[3], 3, 6, proof, head)
    assert not merkle.verify_inclusion(leaves[3], 3, 12, proof, head)
    assert not merkle.verify_inclusion(leaves[3], 3, 3, proof, head)
    assert not merkle.verify_inclusion(leaves[3], -1, 6, proof, head)
    assert not merkle.verify_inclusion(leaves[3], 6, 6, proof, head)
    assert not merkle.verify_inclusion(leaves[3], 3, 6, [*proof[:-1], "zz"], head)
    assert not merkle.verify_inclusion(leaves[3], 3, 6, proof, head[:-2])
    with pytest.raises(IndexError):
        merkle.inclusion_proof(leaves, 6)


def _flipped(hex_hash: str) -> str:
    """The same hash with its last bit changed."""
    return hex_hash[:-1] + format(int(hex_hash[-1], 16) ^ 1, "x")
