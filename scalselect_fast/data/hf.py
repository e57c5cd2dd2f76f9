"""Hugging Face ``datasets`` inputs: ``save_to_disk`` directories and in-memory ``Dataset`` objects.

Registers the ``"datasets"`` container, which also reads in-memory ``datasets.Dataset`` /
``IterableDataset`` objects (:func:`is_hf_object`, :func:`hf_object_source`). A ``save_to_disk``
directory (``state.json`` + ``dataset_info.json`` + Arrow files) is read with ``datasets.load_from_disk`` (memory-mapped, not
loaded); rows are taken in Arrow form, so ``Image`` columns arrive as their stored
``{"bytes", "path"}`` structs and are never decoded here. ``datasets`` is an optional dependency
(``pip install scalselect-fast[data]``): it is imported only when such an input is met.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

from .ids import arrow_ids, usable_id_type
from .sample import DatasetError
from .sources import NO_ID_FIELD, Container, DataSource, InputFile, register_container

__all__ = ["hf_object_source", "is_hf_object", "is_save_to_disk_dir"]

#: rows fetched from Arrow per batch
BATCH_ROWS = 1024


def import_datasets(what: str):
    """The ``datasets`` module, or a :class:`DatasetError` saying how to install it (``what`` needs it)."""
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{what} needs the Hugging Face `datasets` package: pip install "
                           "'scalselect-fast[data]' (or pip install datasets)", reason="io", path=what) from None
    return datasets


def is_hf_object(obj: Any) -> bool:
    """Whether ``obj`` is a Hugging Face ``datasets`` object (checked without importing ``datasets``)."""
    mod = type(obj).__module__ or ""
    return mod.startswith("datasets.") and type(obj).__name__ in ("Dataset", "IterableDataset",
                                                                  "DatasetDict", "IterableDatasetDict")


def is_save_to_disk_dir(path: str) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and (
        (os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")))
        or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def _splits(path: str) -> list[str]:
    """The split folders of a ``DatasetDict.save_to_disk`` folder (from ``dataset_dict.json``)."""
    import json

    try:
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as fh:
            splits = [str(s) for s in json.load(fh)["splits"]]
    except (OSError, ValueError, KeyError, TypeError):
        splits = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    return [s for s in splits if is_save_to_disk_dir(os.path.join(path, s))]


def split_dir(path: str) -> str:
    """Container hook: the folder to read for a ``save_to_disk`` folder named as ``--data``.

    A ``Dataset`` folder is itself. A ``DatasetDict`` folder (``dataset_dict.json`` + one folder per
    split) with a single split is that split's folder; with several, which one to select from is the
    user's choice: a :class:`DatasetError` lists them and the ``--data`` spelling of each.
    """
    if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return path
    splits = _splits(path)
    if len(splits) == 1:
        return os.path.join(path, splits[0])
    if not splits:
        raise DatasetError(f"--data {path!r} is a DatasetDict folder without any split folder (dataset_dict.json "
                           "names none that holds a saved dataset); save the dataset again", reason="format",
                           path=path)
    raise DatasetError(f"--data {path!r} is a DatasetDict with splits {splits}; select from one split: "
                       + " or ".join(f"--data {os.path.join(path, s)}" for s in splits), reason="format",
                       path=path)


def _load(file: InputFile):
    ds_mod = import_datasets(file.path)
    path = split_dir(file.path)  # open_dataset resolves it already; an InputFile made by hand may not
    try:
        return ds_mod.load_from_disk(path)
    except Exception as e:  # FileNotFoundError, json errors in state.json, Arrow errors
        raise DatasetError(f"cannot read the datasets directory {file.path!r}: {str(e).splitlines()[0]}",
                           reason="malformed", path=file.path) from None


def _pil_to_bytes(value: Any) -> Any:
    """A decoded PIL image (what an ``IterableDataset`` may still yield) back to PNG bytes."""
    buf = io.BytesIO()
    value.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _plain(row: dict) -> dict:
    for key in ("image", "images"):
        v = row.get(key)
        if hasattr(v, "save") and hasattr(v, "mode"):
            row[key] = _pil_to_bytes(v)
        elif isinstance(v, list) and any(hasattr(x, "save") and hasattr(x, "mode") for x in v):
            row[key] = [_pil_to_bytes(x) if hasattr(x, "save") and hasattr(x, "mode") else x for x in v]
    return row


def _arrow_batches(ds: Any) -> Iterator[Any]:
    """A ``Dataset``'s rows as Arrow record batches (images undecoded), in row order."""
    if getattr(ds, "_indices", True) is None:
        # no indices mapping (not a select/shuffle view): the Arrow table's own batches, 5-8x
        # faster than with_format("arrow").iter in bench_data.py, same rows in the same order
        yield from ds.data.to_batches(max_chunksize=BATCH_ROWS)
    else:
        for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            yield from table.to_batches()


def _reading(label: str, rows: Iterator[Any]) -> Iterator[Any]:
    """``rows`` with any library error turned into a one-line :class:`DatasetError` naming ``label``."""
    try:
        yield from rows
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{label}: cannot read rows ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                           reason="malformed", path=label) from None


def iter_dataset_batches(ds: Any, label: str) -> Iterator[Any]:
    """A ``Dataset``'s Arrow record batches (the rows of :func:`iter_dataset_rows`, column-wise)."""
    return _reading(label, _arrow_batches(ds))


def _rows(ds: Any) -> Iterator[dict]:
    if type(ds).__name__ == "Dataset":
        for batch in _arrow_batches(ds):
            yield from batch.to_pylist()
    else:
        if hasattr(ds, "decode"):
            ds = ds.decode(False)  # Image features stay {"bytes", "path"}
        for row in ds:
            yield _plain(dict(row))


def iter_dataset_rows(ds: Any, label: str) -> Iterator[dict]:
    """Rows of a ``Dataset`` (Arrow batches, images undecoded) or ``IterableDataset`` (decoding off)."""
    return _reading(label, _rows(ds))


def _iter_dir(file: InputFile) -> Iterator[tuple[int, None, Any]]:
    for i, row in enumerate(iter_dataset_rows(_load(file), file.path)):
        yield i, None, row


def _count_dir(file: InputFile) -> int:
    return _load(file).num_rows


def _columns(ds: Any, columns: "list[str] | None") -> Any:
    """``ds`` with only ``columns`` (those it has; all when ``None``), without copying data."""
    if columns is None:
        return ds
    return ds.select_columns([c for c in ds.column_names if c in set(columns)])


def _dir_ids(file: InputFile, id_field: str) -> Iterator[tuple[int, str | None]]:
    """Container hook: every record's id from the id column alone (no image bytes are touched)."""
    ds = _load(file)
    if id_field not in ds.column_names:
        yield from ((i, NO_ID_FIELD) for i in range(ds.num_rows))
        return
    if not usable_id_type(ds.data.schema.field(id_field).type):
        yield from ((i, None) for i in range(ds.num_rows))  # every record is skipped when read
        return
    yield from enumerate(arrow_ids(iter_dataset_batches(ds.select_columns([id_field]), file.path)))


class _ObjectSource(DataSource):
    """A ``datasets.Dataset`` / ``IterableDataset`` held in memory (Python API only)."""

    def __init__(self, ds: Any):
        n = getattr(ds, "num_rows", None)
        super().__init__([], "datasets", f"datasets.{type(ds).__name__}" + (f" ({n} rows)" if n is not None else ""),
                         dataset=ds)
        self._pseudo = InputFile(f"<{self.label}>", None, "")

    @property
    def single(self) -> bool:
        return True

    def counts(self) -> list[int]:
        if self._counts is None:
            n = getattr(self.dataset, "num_rows", None)
            self._counts = [int(n) if n is not None else sum(1 for _ in iter_dataset_rows(self.dataset, self.label))]
        return list(self._counts)

    def iter_records(self, start: int = 0):
        # one object, no files to pass over: the reader drops the rows before ``start``
        for i, row in enumerate(iter_dataset_rows(self.dataset, self.label)):
            yield i, None, row, self._pseudo, i

    def has_batches(self) -> bool:
        return type(self.dataset).__name__ == "Dataset"

    def iter_batches(self, columns: "list[str] | None" = None, start: int = 0):
        i = 0
        for batch in iter_dataset_batches(_columns(self.dataset, columns), self.label):
            yield i, batch, self._pseudo, i
            i += batch.num_rows

    def input_paths(self) -> list[str]:
        return []

    def relative_name(self, file: InputFile) -> str:
        return ""  # an object has no file: its rows' positional ids are "#<row>"

    def total_bytes(self) -> int:
        try:
            return int(self.dataset.data.nbytes)
        except Exception:  # an IterableDataset has no table
            return 0


def hf_object_source(ds: Any) -> DataSource:
    """A :class:`DataSource` over a ``datasets.Dataset`` or ``IterableDataset``."""
    kind = type(ds).__name__
    if kind in ("DatasetDict", "IterableDatasetDict"):
        raise DatasetError(f"got a {kind} with splits {sorted(ds)}; pass one split, e.g. ds[{sorted(ds)[0]!r}]",
                           reason="format")
    return _ObjectSource(ds)


register_container(Container("datasets", iter_records=_iter_dir, count=_count_dir,
                             is_dataset_dir=is_save_to_disk_dir, dataset_dir=split_dir, ids=_dir_ids,
                             iter_batches=lambda f, columns=None: iter_dataset_batches(_columns(_load(f), columns),
                                                                                       f.path),
                             wraps=is_hf_object, object_source=hf_object_source))
