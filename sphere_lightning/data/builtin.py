"""The built-in counterfactual fact set shipped with the package.

``builtin_facts.json`` holds 343 hand-written edit requests about well-known entities across 11
relations (city -> country, country -> capital, country -> official language, person -> mother
tongue, country -> continent, company -> headquarters city, athlete -> sport, musician ->
instrument, country -> currency, scientist -> field, landmark -> city). ``target_true`` is the
real answer and ``target_new`` a false answer of the same type. Paraphrase prompts ask for the
same fact in other words; neighbourhood prompts ask about *other* entities whose true answer is
the record's ``target_true`` (for one-to-one relations such as capitals: landmarks in that
city). Within a relation no neighbourhood prompt mentions an entity that is itself edited, so
editing several records of a relation does not change each other's neighbourhood answers.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from sphere_lightning.data.formats import parse_records
from sphere_lightning.data.requests import EditRequest

BUILTIN_FACTS_FILE = "builtin_facts.json"


@lru_cache(maxsize=1)
def _load() -> tuple[EditRequest, ...]:
    text = resources.files("sphere_lightning.data").joinpath(BUILTIN_FACTS_FILE).read_text("utf-8")
    return tuple(parse_records(json.loads(text), BUILTIN_FACTS_FILE, "builtin"))


def load_builtin_facts() -> list[EditRequest]:
    """Return the built-in fact set as edit requests, in file order (``case_id`` 0, 1, ...).

    Returns:
        A new list on every call (the requests themselves are immutable).
    """
    return list(_load())


def builtin_relations() -> dict[int | str, str]:
    """Map each built-in ``case_id`` to its relation id (e.g. ``"country_capital"``).

    Returns:
        ``{case_id: relation}`` for every record of the built-in set.
    """
    text = resources.files("sphere_lightning.data").joinpath(BUILTIN_FACTS_FILE).read_text("utf-8")
    return {record["case_id"]: record["relation"] for record in json.loads(text)}
