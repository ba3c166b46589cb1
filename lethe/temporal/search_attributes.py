"""Lethe's Temporal search attributes: subject references and facts only, never personal data."""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey

KIND = SearchAttributeKey.for_keyword("LetheKind")
"""Which workflow: `erasure`, `erasure-dry-run`, `erasure-replay`, `key-rotation`,
`retention-sweep` or `retention-plan` (a sweep's dry run)."""
STATUS = SearchAttributeKey.for_keyword("LetheStatus")
"""Where a request stands: an `ErasureState` (`planning`, `awaiting_approval`, `on_hold`,
`completed`, ...)."""
TENANT = SearchAttributeKey.for_keyword("LetheTenant")
"""The tenant (an organisation, not a person)."""
SUBJECT_REF = SearchAttributeKey.for_keyword("LetheSubjectRef")
"""The keyed HMAC of (tenant, subject id): the only form of identity allowed here."""
REGIONS = SearchAttributeKey.for_keyword_list("LetheRegions")
"""The regions a request touches."""
DEADLINE = SearchAttributeKey.for_datetime("LetheDeadline")
"""The legal deadline of a request (GDPR Art. 12(3))."""

ALL: tuple[SearchAttributeKey[Any], ...] = (KIND, STATUS, TENANT, SUBJECT_REF, REGIONS, DEADLINE)

_CLI_TYPE = {
    "KEYWORD": "Keyword",
    "KEYWORD_LIST": "KeywordList",
    "DATETIME": "Datetime",
}


def dev_server_flags() -> list[str]:
    """The `--search-attribute Name=Type` flags that register these on a Temporal dev server."""
    flags: list[str] = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={_CLI_TYPE[key.indexed_value_type.name]}"]
    return flags


if __name__ == "__main__":
    print(" ".join(dev_server_flags()))
