"""Canonical names of data sets that circulate under several spellings.

Config profiles (`datasets.<name>` blocks) and per-data-set facts (modality) are keyed on the canonical name;
the prepared data set's recorded name (dataset.json `name`, from `--name` or the source folder) is mapped here
first, so LViT's own folder names (`QaTa-Covid19`, `MosMedDataPlus`) find the same settings as
`QaTa-COV19` and `MosMedData+`.
"""

from __future__ import annotations

ALIASES = {
    "qata-cov19": ("qata-cov19", "qata-covid19", "qata_cov19", "qata_covid19", "qata", "qatacov19"),
    "mosmeddata+": ("mosmeddata+", "mosmeddataplus", "mosmeddata_plus", "mosmeddata", "mosmed", "mosmed+"),
}
_LOOKUP = {alias: canon for canon, names in ALIASES.items() for alias in names}


def canonical_name(name: str | None) -> str | None:
    """Lower-case name, mapped to its canonical spelling when it is a known alias."""
    if name is None:
        return None
    key = str(name).strip().lower()
    return _LOOKUP.get(key, key)
