# stand-in: replaced by branch s1/s3
"""Minimal stand-in for the s3 merge module (dataclasses of sharding.md only)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class SortKey:
    column: int
    descending: bool = False
    nulls_first: bool | None = None


@dataclass(frozen=True)
class Agg:
    column: int
    func: str
    count_column: int | None = None


@dataclass(frozen=True)
class MergeSpec:
    order_by: tuple = ()
    limit: int | None = None
    offset: int = 0
    group_by: tuple = ()
    aggregates: tuple = ()
    distinct: bool = False
    visible: int | None = None
