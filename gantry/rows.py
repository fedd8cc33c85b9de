"""Rows read on the way of every request, by one plain statement built once per process.

For a query this small the ORM takes several times longer to build the SQL than the database takes to
answer it, and each web process builds it again for every request (the authenticated user, first of
all). `Rows` builds the statement once and turns each row into the model's instance as the ORM would:
the same columns, each value through the same database and field converters (SQLite's dates, say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, Generic, TypeVar
from weakref import WeakKeyDictionary

from django.db import connections
from django.db.models import Model

M = TypeVar("M", bound=Model)
Converter = Callable[[Any, Any, Any], Any]


class Rows(Generic[M]):
    """The rows of `model` matching `where` (SQL over its columns, with %s for the parameters; "": all
    of them), in the order of `order_by` (SQL too), the first `limit` of them (0: all); `for_update`
    holds them to the end of the caller's transaction, where the database can."""

    def __init__(
        self, model: type[M], where: str = "", order_by: str = "", limit: int = 0, for_update: bool = False, using: str = "default"
    ) -> None:
        self.model = model
        self.where = where
        self.order_by = order_by
        self.limit = limit
        self.for_update = for_update
        self.using = using
        # Each thread has a connection of its own; their converters are the same functions, bound to it.
        self._converters_of: WeakKeyDictionary[Any, list[tuple[int, list[Converter], Any]]] = WeakKeyDictionary()

    @cached_property
    def _fields(self) -> list[Any]:
        return list(self.model._meta.concrete_fields)

    @cached_property
    def sql(self) -> str:
        connection = connections[self.using]
        quote = connection.ops.quote_name
        columns = ", ".join(quote(field.column) for field in self._fields)
        sql = f"SELECT {columns} FROM {quote(self.model._meta.db_table)}"
        sql += f" WHERE {self.where}" if self.where else ""
        sql += f" ORDER BY {self.order_by}" if self.order_by else ""
        sql += f" LIMIT {int(self.limit)}" if self.limit else ""
        return f"{sql} {connection.ops.for_update_sql()}" if self.for_update and connection.features.has_select_for_update else sql

    def _converters(self, connection: Any) -> list[tuple[int, list[Converter], Any]]:
        found = self._converters_of.get(connection)
        if found is None:
            found = self._converters_of[connection] = self._build_converters(connection)
        return found

    def _build_converters(self, connection: Any) -> list[tuple[int, list[Converter], Any]]:
        table = self.model._meta.db_table
        found = []
        for index, field in enumerate(self._fields):
            column = field.get_col(table)
            converters = connection.ops.get_db_converters(column) + column.get_db_converters(connection)
            if converters:
                found.append((index, converters, column))
        return found

    def fetch(self, params: Sequence[Any] = ()) -> list[M]:
        connection = connections[self.using]
        with connection.cursor() as cursor:
            cursor.execute(self.sql, list(params))
            rows = cursor.fetchall()
        if not rows:
            return []
        converters = self._converters(connection)
        names = [field.attname for field in self._fields]
        found = []
        for row in rows:
            values = list(row)
            for index, functions, column in converters:
                for convert in functions:
                    values[index] = convert(values[index], column, connection)
            found.append(self.model.from_db(self.using, names, values))
        return found

    def first(self, params: Sequence[Any] = ()) -> M | None:
        found = self.fetch(params)
        return found[0] if found else None
