"""The ``"parquet"`` container: Parquet files (LLaVA-OneVision, the Cauldron, FineVision shards).

Rows are read a record batch at a time; the readers take the batches themselves
(:class:`~.arrow.ArrowPlan`), and the row dicts only where a row needs the record path. The id
pass reads the id column alone, and counting reads only the footer. Shards of one input must share
one schema (:class:`_ParquetSchema`). Registers itself with :mod:`.sources`.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .ids import arrow_ids, usable_id_type
from .sample import DatasetError
from .sources import NO_ID_FIELD, Container, InputFile, as_input_file, register_container

#: rows per record batch
PARQUET_BATCH_ROWS = 1024


def open_parquet(path: "str | InputFile"):
    """A ``pyarrow.parquet.ParquetFile`` for ``path``; a :class:`DatasetError` names the file if it is not Parquet."""
    import pyarrow.parquet as pq

    file = as_input_file(path)
    try:
        return pq.ParquetFile(file.path if file.local else file.open())
    except DatasetError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
        raise DatasetError(f"cannot read Parquet file {file.path!r}: {e}", reason="malformed",
                           path=file.path) from None


def _iter_parquet_batches(path: "str | InputFile", batch_rows: int = PARQUET_BATCH_ROWS,
                          columns: "list[str] | None" = None) -> Iterator[Any]:
    """The file's rows as Arrow record batches (only ``columns``, those of them the file has, when
    given: the others are not even decoded); a decoding failure names the file and the record."""
    file = as_input_file(path)
    pf = open_parquet(file)
    if columns is not None:
        columns = [c for c in pf.schema_arrow.names if c in set(columns)]
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            yield batch
            index += batch.num_rows
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{file.path}: cannot decode Parquet rows after record {index}: {e}",
                           reason="malformed", path=file.path, index=index) from None


def _iter_parquet_rows(path: "str | InputFile", batch_rows: int = PARQUET_BATCH_ROWS
                       ) -> Iterator[tuple[int, None, Any]]:
    index = 0
    for batch in _iter_parquet_batches(path, batch_rows):
        for row in batch.to_pylist():
            yield index, None, row
            index += 1


def _parquet_ids(file: InputFile, id_field: str):
    pf = open_parquet(file)
    if id_field not in pf.schema_arrow.names:
        yield from ((i, NO_ID_FIELD) for i in range(pf.metadata.num_rows))
        return
    field = pf.schema_arrow.field(id_field)
    if not usable_id_type(field.type):
        # no usable id column: every record is skipped (missing/invalid id) when read
        yield from ((i, None) for i in range(pf.metadata.num_rows))
        return
    yield from enumerate(arrow_ids(pf.iter_batches(batch_size=65536, columns=[id_field])))


class _ParquetSchema:
    """A Parquet file's columns and types (metadata ignored), comparable and printable in one line."""

    def __init__(self, file: InputFile):
        schema = open_parquet(file).schema_arrow
        self.fields = {f.name: str(f.type) for f in schema}

    def __eq__(self, other) -> bool:
        return isinstance(other, _ParquetSchema) and self.fields == other.fields

    def diff(self, other: "_ParquetSchema") -> str:
        a, b = self.fields, other.fields
        parts = []
        if set(a) - set(b):
            parts.append(f"columns only in the first: {sorted(set(a) - set(b))}")
        if set(b) - set(a):
            parts.append(f"columns only in the second: {sorted(set(b) - set(a))}")
        parts += [f"column {k!r} is {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]]
        return "; ".join(parts) or "column order differs"


register_container(Container(
    "parquet", iter_records=_iter_parquet_rows, count=lambda f: open_parquet(f).metadata.num_rows,
    sniff=lambda head, name: head[:4] == b"PAR1", extensions=(".parquet",), schema=_ParquetSchema,
    ids=_parquet_ids, iter_batches=lambda f, columns=None: _iter_parquet_batches(f, columns=columns)))
