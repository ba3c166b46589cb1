"""The forget-list's sealed subjects: only the right key and the right reference open them."""

from __future__ import annotations

import base64
import os

import pytest

from lethe.contracts import Subject
from lethe.evidence.forget_list import SealBroken, seal, unseal

KEY = os.urandom(32)
SUBJECT = Subject(tenant="st-mary", subject_id="p-42", identities={"email": "ada@example.org"})


def test_seal_round_trip_hides_the_identifiers() -> None:
    sealed = seal(SUBJECT, "ref-1", KEY)
    assert "p-42" not in sealed and "ada@" not in base64.b64decode(sealed).decode(errors="ignore")
    assert unseal(sealed, "ref-1", KEY) == SUBJECT


def test_another_key_cannot_open_it() -> None:
    with pytest.raises(SealBroken, match="LETHE_SUBJECT_KEY differs"):
        unseal(seal(SUBJECT, "ref-1", KEY), "ref-1", os.urandom(32))


def test_a_seal_moved_to_another_reference_does_not_open() -> None:
    with pytest.raises(SealBroken):
        unseal(seal(SUBJECT, "ref-1", KEY), "ref-2", KEY)


def test_a_flipped_bit_is_detected() -> None:
    raw = bytearray(base64.b64decode(seal(SUBJECT, "ref-1", KEY)))
    raw[-1] ^= 1
    with pytest.raises(SealBroken):
        unseal(base64.b64encode(bytes(raw)).decode(), "ref-1", KEY)
