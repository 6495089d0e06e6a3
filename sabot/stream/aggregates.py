"""Aggregations over groups of rows, computed on whole Arrow batches.

An aggregation keeps accumulator columns per group. Three steps use them:

* ``partial``: group the rows of one batch and compute their accumulators
  with Arrow's hash aggregation kernels;
* ``merge``: combine accumulator rows of the same group (stored state
  followed by a batch's partials) with the same kernels;
* ``finish``: turn accumulators into the output values.

``mean`` keeps a sum and a count, ``count_distinct`` the list of distinct
values. A user :class:`Aggregation` keeps a pickled Python value per group
and is the one place where Python code runs once per group and batch.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import ConfigError, DataflowError, SchemaError
from sabot.stream.operators import describe_function

FUNCTIONS = ("count", "sum", "mean", "min", "max", "first", "last", "count_distinct")

#: Output names that a window operator writes itself.
RESERVED_NAMES = ("window_start", "window_end", "final")

_ONLY_VALID = pc.CountOptions(mode="only_valid")
_ALL = pc.CountOptions(mode="all")


@dataclass(frozen=True)
class Aggregation:
    """A user aggregation: an initial accumulator and a batch-level update.

    ``update(accumulator, values)`` is called once per group (key and
    window) and batch, with that group's values from the batch as a
    ``pyarrow.Array`` in arrival order, and returns the new accumulator.
    ``initial`` is the accumulator of a new group; a callable is called to
    make it, anything else is deep-copied. The accumulator is the output
    value, converted to ``type`` when given. It must pickle, because it is
    written to the changelog. Session windows merge sessions, so they need
    ``merge(left, right)``, which combines two accumulators.

    >>> import pyarrow.compute as pc
    >>> spread = Aggregation(
    ...     initial=lambda: [None, None],
    ...     update=lambda acc, v: [min(x for x in (acc[0], pc.min(v).as_py()) if x is not None),
    ...                            max(x for x in (acc[1], pc.max(v).as_py()) if x is not None)])
    """

    initial: Any
    update: Callable[[Any, pa.Array], Any]
    merge: Callable[[Any, Any], Any] | None = None
    type: pa.DataType | None = None

    def __post_init__(self):
        if not callable(self.update):
            raise TypeError(f"Aggregation(update=...) needs a callable, got {self.update!r}")
        if self.merge is not None and not callable(self.merge):
            raise TypeError(f"Aggregation(merge=...) needs a callable, got {self.merge!r}")

    def new_accumulator(self) -> Any:
        return self.initial() if callable(self.initial) else copy.deepcopy(self.initial)


@dataclass(frozen=True)
class AggSpec:
    """One output column: ``name=(column, function)``."""

    name: str
    column: str | None  # None counts rows: ("*", "count")
    function: str | Aggregation

    @property
    def custom(self) -> bool:
        return isinstance(self.function, Aggregation)


def parse_aggs(aggs: Mapping[str, Any], key_name: str) -> list[AggSpec]:
    """Check ``agg(name=(column, function), ...)`` arguments and return their specs."""
    if not aggs:
        raise ConfigError("agg() needs at least one name=(column, function), for example "
                          "agg(flights=('flight', 'count'))")
    specs = []
    for name, value in aggs.items():
        if name.startswith("_") or name in RESERVED_NAMES or name == key_name:
            raise ConfigError(
                f"agg({name}=...): the name {name!r} is taken by the window output "
                f"(the key {key_name!r}, {', '.join(RESERVED_NAMES)}) or starts with '_'; "
                f"choose another name"
            )
        if not (isinstance(value, tuple) and len(value) == 2):
            raise ConfigError(f"agg({name}={value!r}) must be a (column, function) pair, "
                              f"for example ('dep_delay', 'mean')")
        column, function = value
        if not isinstance(column, str) or not column:
            raise ConfigError(f"agg({name}=...): the column must be a column name, "
                              f"got {column!r}")
        if isinstance(function, str):
            if function not in FUNCTIONS:
                raise ConfigError(f"agg({name}=...): unknown function {function!r}; "
                                  f"use one of {', '.join(FUNCTIONS)} or an Aggregation")
            if column == "*" and function != "count":
                raise ConfigError(f"agg({name}=('*', {function!r})): '*' works only with "
                                  f"'count'; name a column")
        elif not isinstance(function, Aggregation):
            raise ConfigError(f"agg({name}=...): the function must be a name such as "
                              f"'sum' or an Aggregation, got {function!r}")
        specs.append(AggSpec(name, None if column == "*" else column, function))
    return specs


def state_columns(spec: AggSpec) -> list[str]:
    """Return the accumulator column names of one aggregation."""
    if spec.function == "mean":
        return [f"{spec.name}.sum", f"{spec.name}.count"]
    return [spec.name]


class AggregationPlan:
    """Partial, merge and finish steps for a list of aggregations.

    ``group`` names the grouping columns, which lead every accumulator
    table; the accumulator columns follow in the order of ``specs``.
    """

    def __init__(self, specs: list[AggSpec], group: list[str]):
        self.specs = specs
        self.group = group
        self.builtin = [spec for spec in specs if not spec.custom]
        self.custom = [spec for spec in specs if spec.custom]
        self.distinct = [spec for spec in specs if spec.function == "count_distinct"]
        self.input_columns = sorted({spec.column for spec in specs if spec.column})
        self.accumulator_names = [c for spec in specs for c in state_columns(spec)]

    # -- partial -------------------------------------------------------------------------

    def partial(self, rows: pa.Table) -> pa.Table:
        """Group ``rows`` (group columns plus input columns) and return accumulators.

        The groups come out in the order of their first row. Custom
        aggregations are left out here: see :meth:`update_custom`.
        """
        targets: list[tuple[str, str, Any]] = []
        renames: dict[str, str] = {}
        null_inputs: dict[str, pa.DataType] = {}
        columns = {name: rows.column(name) for name in self.group}
        for index, spec in enumerate(self.builtin):
            alias = f"__v{index}"
            if spec.column is None:
                columns[alias] = pa.nulls(rows.num_rows, pa.int8())
                targets.append((alias, "count", _ALL))
                renames[f"{alias}_count"] = spec.name
                continue
            values = rows.column(spec.column)
            if pa.types.is_dictionary(values.type):
                values = values.cast(values.type.value_type)
            columns[alias] = values
            if pa.types.is_null(values.type):
                # Arrow's hash kernels reject (or crash on) the null type, which
                # the JSON reader gives a column that is null in the whole batch.
                null_inputs[alias] = values.type
                continue
            for function, options, out in _partial_functions(spec):
                targets.append((alias, function, options))
                renames[f"{alias}_{function}"] = out
        table = pa.table(columns)
        grouped = table.group_by(self.group, use_threads=False).aggregate(targets)
        out = {name: grouped.column(name) for name in self.group}
        for alias, function, _ in targets:
            out[renames[f"{alias}_{function}"]] = grouped.column(f"{alias}_{function}")
        if null_inputs:
            groups = grouped.num_rows
            for index, spec in enumerate(self.builtin):
                if f"__v{index}" in null_inputs:
                    for name, column in _null_partial(spec, groups).items():
                        out[name] = column
        return pa.table({name: out[name] for name in [*self.group, *self._builtin_names()]})

    def _builtin_names(self) -> list[str]:
        return [c for spec in self.builtin for c in state_columns(spec)]

    # -- merge ---------------------------------------------------------------------------

    def merge(self, tables: list[pa.Table]) -> pa.Table:
        """Combine accumulator rows of equal groups; earlier tables are older.

        Returns one row per group, groups in the order of their first row.
        Custom accumulators of a group are merged with ``Aggregation.merge``.
        """
        combined = concat(tables)
        targets = []
        for spec in self.builtin:
            if spec.function == "count_distinct":
                continue
            for column, function in _merge_functions(spec):
                targets.append((column, function))
        grouped = combined.group_by(self.group, use_threads=False).aggregate(targets)
        out = {name: grouped.column(name) for name in self.group}
        for column, function in targets:
            out[column] = grouped.column(f"{column}_{function}")
        for spec in self.distinct:
            out[spec.name] = self._merge_distinct(combined, grouped, spec.name)
        for spec in self.custom:
            out[spec.name] = self._merge_custom(combined, grouped, spec)
        return pa.table({name: out[name] for name in [*self.group, *self.accumulator_names]})

    def _merge_distinct(self, combined: pa.Table, grouped: pa.Table, name: str) -> pa.Array:
        lists = combined.column(name).combine_chunks()
        parents = pc.list_parent_indices(lists)
        flat = pc.list_flatten(lists)
        long = {column: combined.column(column).take(parents) for column in self.group}
        long["value"] = flat
        distinct = pa.table(long).group_by(self.group, use_threads=False).aggregate(
            [("value", "distinct", _ONLY_VALID)])
        position = _positions(grouped, distinct, self.group)
        values = distinct.column("value_distinct").combine_chunks()
        result = values.take(pa.array(position, type=pa.int64(), mask=position < 0))
        # A group whose lists were all empty has no row in ``distinct``.
        empty = pa.array([[]] * len(grouped), type=values.type)
        return pc.if_else(pc.is_null(result), empty, result) if result.null_count else result

    def _merge_custom(self, combined: pa.Table, grouped: pa.Table, spec: AggSpec) -> pa.Array:
        aggregation: Aggregation = spec.function  # type: ignore[assignment]
        position = _positions(combined, grouped, self.group)
        pickled = combined.column(spec.name).to_pylist()
        merged: list[Any] = [None] * grouped.num_rows
        seen = np.zeros(grouped.num_rows, dtype=bool)
        for row, group in enumerate(position):
            if pickled[row] is None:  # a batch's partial, before update_custom
                continue
            value = pickle.loads(pickled[row])
            if not seen[group]:
                merged[group] = value
                seen[group] = True
                continue
            if aggregation.merge is None:
                raise ConfigError(
                    f"agg({spec.name}=...): two accumulators of one group must be merged, "
                    f"but the Aggregation has no merge=; give merge(left, right)"
                )
            merged[group] = _call(spec, aggregation.merge, merged[group], value)
        return pa.array([pickle.dumps(value) if seen[group] else None
                         for group, value in enumerate(merged)], type=pa.binary())

    # -- custom --------------------------------------------------------------------------

    def update_custom(self, accumulators: pa.Table, rows: pa.Table) -> pa.Table:
        """Apply each custom aggregation's update to the groups present in ``rows``.

        ``accumulators`` has one row per group of ``rows`` (group columns
        plus accumulators; custom accumulators may be null for new groups).
        Calls ``update`` once per group, with the group's values in row order.
        """
        if not self.custom:
            return accumulators
        group_of_row = _positions(rows, accumulators, self.group)
        order = np.argsort(group_of_row, kind="stable")
        bounds = np.searchsorted(group_of_row[order], np.arange(accumulators.num_rows + 1))
        for spec in self.custom:
            aggregation: Aggregation = spec.function  # type: ignore[assignment]
            values = rows.column(spec.column).combine_chunks().take(pa.array(order))
            current = accumulators.column(spec.name).to_pylist()
            updated = []
            for group in range(accumulators.num_rows):
                start, stop = bounds[group], bounds[group + 1]
                acc = aggregation.new_accumulator() if current[group] is None \
                    else pickle.loads(current[group])
                if stop > start:
                    acc = _call(spec, aggregation.update, acc, values.slice(start, stop - start))
                updated.append(pickle.dumps(acc))
            index = accumulators.schema.get_field_index(spec.name)
            accumulators = accumulators.set_column(index, spec.name,
                                                   pa.array(updated, type=pa.binary()))
        return accumulators

    def with_custom_columns(self, table: pa.Table) -> pa.Table:
        """Add null custom accumulator columns, in order, to a table of partials."""
        if not self.custom:
            return table
        columns = {name: table.column(name) for name in table.schema.names}
        for spec in self.custom:
            columns[spec.name] = pa.nulls(table.num_rows, pa.binary())
        return pa.table({name: columns[name]
                         for name in [*self.group, *self.accumulator_names]})

    # -- finish --------------------------------------------------------------------------

    def finish(self, state: pa.Table) -> dict[str, pa.Array]:
        """Return the output column of each aggregation from accumulator rows."""
        out: dict[str, pa.Array] = {}
        for spec in self.specs:
            if spec.function == "mean":
                total = state.column(f"{spec.name}.sum").combine_chunks()
                count = state.column(f"{spec.name}.count").combine_chunks()
                if pa.types.is_null(total.type):
                    out[spec.name] = pa.nulls(len(total), pa.float64())
                    continue
                mean = pc.divide(total.cast(pa.float64()), count.cast(pa.float64()))
                out[spec.name] = pc.if_else(pc.equal(count, 0), None, mean)
            elif spec.function == "count_distinct":
                lengths = pc.list_value_length(state.column(spec.name).combine_chunks())
                out[spec.name] = lengths.cast(pa.int64())
            elif spec.custom:
                aggregation: Aggregation = spec.function  # type: ignore[assignment]
                values = [pickle.loads(v) for v in state.column(spec.name).to_pylist()]
                try:
                    out[spec.name] = pa.array(values, type=aggregation.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise DataflowError(
                        f"agg({spec.name}=...): the accumulators cannot become an Arrow "
                        f"column ({exc}); give Aggregation(type=...) or return plain values"
                    ) from exc
            else:
                out[spec.name] = state.column(spec.name).combine_chunks()
        return out


def _partial_functions(spec: AggSpec) -> list[tuple[str, Any, str]]:
    name = spec.name
    function = spec.function
    if function == "count":
        return [("count", _ONLY_VALID, name)]
    if function == "mean":
        return [("sum", None, f"{name}.sum"), ("count", _ONLY_VALID, f"{name}.count")]
    if function == "count_distinct":
        return [("distinct", _ONLY_VALID, name)]
    return [(function, None, name)]


def _merge_functions(spec: AggSpec) -> list[tuple[str, str]]:
    name = spec.name
    function = spec.function
    if function in ("count", "sum"):
        return [(name, "sum")]
    if function == "mean":
        return [(f"{name}.sum", "sum"), (f"{name}.count", "sum")]
    return [(name, function)]


def _null_partial(spec: AggSpec, groups: int) -> dict[str, pa.Array]:
    """Accumulators of groups whose input column has the null type."""
    if spec.function == "count":
        return {spec.name: pa.array(np.zeros(groups, dtype=np.int64))}
    if spec.function == "mean":
        return {f"{spec.name}.sum": pa.nulls(groups, pa.null()),
                f"{spec.name}.count": pa.array(np.zeros(groups, dtype=np.int64))}
    if spec.function == "count_distinct":
        return {spec.name: pa.array([[]] * groups, type=pa.list_(pa.null()))}
    return {spec.name: pa.nulls(groups, pa.null())}


def _positions(rows: pa.Table, groups: pa.Table, columns: list[str]) -> np.ndarray:
    """Return, for each row of ``rows``, the index of its group in ``groups`` or -1."""
    if len(columns) == 1:
        index = pc.index_in(rows.column(columns[0]), value_set=groups.column(columns[0]))
        return pc.fill_null(index, -1).to_numpy().astype(np.int64)
    left = rows.select(columns).append_column(
        "__row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    right = groups.select(columns).append_column(
        "__group", pa.array(np.arange(groups.num_rows, dtype=np.int64)))
    joined = left.join(right, keys=columns, join_type="left outer", use_threads=False)
    position = np.full(rows.num_rows, -1, dtype=np.int64)
    position[joined.column("__row").to_numpy()] = \
        pc.fill_null(joined.column("__group"), -1).to_numpy()
    return position


def concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate tables of accumulators, widening types that differ (int64 to double)."""
    tables = [table for table in tables if table is not None]
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise SchemaError(
            f"a column changed to an incompatible type between batches ({exc}); fix the "
            f"type with the dataflow's schema= or a with_columns() cast"
        ) from exc


def _call(spec: AggSpec, fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        raise DataflowError(
            f"agg({spec.name}=...): {describe_function(fn)} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
