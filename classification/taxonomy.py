"""The data-category taxonomy: dotted keys in the style of fideslang, with derived legal flags.

A key names a kind of personal data (`user.contact.email`). A rule on a parent key
(`user.contact`) matches all its children. Each key carries two derived flags: whether it is a
GDPR Art. 9 special category, and whether it is one of HIPAA's Safe Harbor identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

from lethe.kernel.errors import LetheError


class UnknownCategory(LetheError):
    """A category key is not in the taxonomy."""


@dataclass(frozen=True)
class Category:
    """One key of the taxonomy and its legal flags (inherited from its ancestors)."""

    key: str
    special: bool
    """GDPR Art. 9 special category (health, biometric, genetic, ...)."""
    hipaa_identifier: bool
    """One of the 18 HIPAA Safe Harbor identifiers (45 CFR 164.514(b)(2))."""


# key -> (GDPR Art. 9 special category, HIPAA Safe Harbor identifier). Children inherit "special".
_KEYS: dict[str, tuple[bool, bool]] = {
    "user": (False, False),
    "user.name": (False, True),
    "user.contact": (False, True),
    "user.contact.email": (False, True),
    "user.contact.phone_number": (False, True),
    "user.contact.fax_number": (False, True),
    "user.contact.address": (False, True),
    "user.contact.address.postal_code": (False, True),
    "user.unique_id": (False, True),
    "user.account": (False, True),
    "user.account.username": (False, True),
    "user.government_id": (False, True),
    "user.government_id.national_identification_number": (False, True),
    "user.demographic": (False, False),
    "user.demographic.date_of_birth": (False, True),
    "user.demographic.gender": (False, False),
    "user.demographic.race_ethnicity": (True, False),
    "user.demographic.religious_belief": (True, False),
    "user.demographic.political_opinion": (True, False),
    "user.demographic.sexual_orientation": (True, False),
    "user.health_and_medical": (True, False),
    "user.health_and_medical.record_id": (True, True),
    "user.health_and_medical.insurance_beneficiary_id": (True, True),
    "user.health_and_medical.diagnosis": (True, False),
    "user.health_and_medical.treatment": (True, False),
    "user.health_and_medical.lab_result": (True, False),
    "user.health_and_medical.encounter": (True, False),
    "user.biometric": (True, True),
    "user.genetic": (True, False),
    "user.financial": (False, False),
    "user.financial.account_number": (False, True),
    "user.financial.payment_card": (False, True),
    "user.device": (False, False),
    "user.device.ip_address": (False, True),
    "user.device.device_id": (False, True),
    "user.behavior": (False, False),
    "user.behavior.browsing_history": (False, False),
    "user.location": (False, True),
    "user.content": (False, False),
    "user.content.free_text": (False, False),
    "user.credentials": (False, False),
}


def _build() -> dict[str, Category]:
    built: dict[str, Category] = {}
    for key in sorted(_KEYS, key=lambda k: k.count(".")):
        special, identifier = _KEYS[key]
        parent = built.get(key.rpartition(".")[0])
        built[key] = Category(
            key=key,
            special=special or bool(parent and parent.special),
            hipaa_identifier=identifier,
        )
    return built


TAXONOMY: dict[str, Category] = _build()


def category(key: str) -> Category:
    """The category for a key, or UnknownCategory naming it and its closest known parent."""
    found = TAXONOMY.get(key)
    if found is None:
        parent = key
        while parent and parent not in TAXONOMY:
            parent = parent.rpartition(".")[0]
        hint = f"; the closest known key is {parent!r}" if parent else ""
        raise UnknownCategory(f"category {key!r} is not in the taxonomy{hint}")
    return found


def matches(rule_key: str, data_key: str) -> bool:
    """True if a rule on `rule_key` applies to data of category `data_key` (itself or a child)."""
    return data_key == rule_key or data_key.startswith(rule_key + ".")


def specificity(key: str) -> int:
    """How deep a key is: a rule on a deeper key beats a rule on its parent."""
    return key.count(".") + 1
