"""The Arrow front end of the readers: whole record batches into :class:`~.sample.Sample`.

Parquet files, ``save_to_disk`` folders and ``datasets.Dataset`` objects arrive as Arrow record
batches. Turning each row into a dict (``to_pylist``) and each dict into a sample
(:func:`~.records.parse_record`) costs an interpreted call and a dozen small objects per row: 3x
the bare library read at 1 KB images, and still 2x with the same rules written column-wise in
Python. :class:`ArrowPlan` (decided once per schema) hands the column buffers a sample needs (ids,
the turns' roles and texts, the image structs' bytes and paths, the source) to the native builder
(``csrc/arrow_rows.cpp``, :func:`scalselect_fast.native.arrow_samples`), which builds the *plain*
rows' objects with the C API:

* a row is plain when its id needs no check (non-empty, no line break; or the schema has no id
  column and the row is named by its position, :func:`~.records.position_id`), every turn has a role
  spelling the alias table knows as it is and a text, every image has bytes, and its placeholders
  match its images (as many ``<image>`` as images, or none, when the images go before the first
  user turn);
* every other row goes through :func:`~.records.parse_record` on its row dict, which decides what
  it is (a sample, or a skip with its reason), exactly as for a JSON record. Without the native
  extension every row does.

The rules themselves are those of :mod:`.records`; ``tests/test_data_arrow.py`` checks, on rows
chosen to hit every branch and on random ones, that both give identical samples and skips.
``Sample.raw`` of a plain row is a :class:`~.sample.LazyRow`: the row dict is built only if read.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..native import HAVE_NATIVE, arrow_samples
from .ids import IdRegistry
from .records import IMAGE_FOLDER, ROLE_ALIASES, SOURCE_FIELDS, image_folder, position_id, record_source
from .sample import IMAGE_TOKEN, EmbeddedImage, LazyRow, Sample, raw_slot

__all__ = ["ArrowPlan"]

#: Rows built per native call: small enough that a consumer drops the samples before the garbage
#: collector promotes them to an older generation (1024 at once was 5x slower in bench_data.py).
CHUNK_ROWS = 128

_TURN_FIELDS = {"conversations": ("from", "value"), "messages": ("role", "content")}

# the slots the native side fills (the dataclasses' __init__ only stores its arguments in them)
_SAMPLE_SLOTS = tuple(Sample.__dict__[f] for f in ("id", "images", "messages", "source", "index", "line")) \
    + (raw_slot,)
_IMAGE_SLOTS = (EmbeddedImage.__dict__["data"], EmbeddedImage.__dict__["name"])


def _is_str(t) -> bool:
    import pyarrow.types as pt
    return pt.is_string(t) or pt.is_large_string(t)


def _is_bin(t) -> bool:
    import pyarrow.types as pt
    return pt.is_binary(t) or pt.is_large_binary(t)


def _image_struct(t) -> bool:
    import pyarrow.types as pt
    return (pt.is_struct(t) and {f.name for f in t} == {"bytes", "path"} and _is_bin(t.field("bytes").type)
            and _is_str(t.field("path").type))


def _large(t) -> bool:
    import pyarrow.types as pt

    return pt.is_large_string(t) or pt.is_large_binary(t) or pt.is_large_list(t)


def _strings(arr, large: bool) -> tuple:
    """A string or binary array as ``(validity, offsets, data, offset, length, large)`` buffers."""
    validity, offsets, data = arr.buffers()
    return validity, offsets, data, arr.offset, len(arr), large


def _list(arr, large: bool) -> tuple:
    """A list array as ``(validity, offsets, offset, length, large)``; the offsets index ``arr.values``."""
    b = arr.buffers()
    return b[0], b[1], arr.offset, len(arr), large


def _bits(arr) -> tuple:
    """An array's validity as ``(bitmap or None, offset, length)``."""
    return arr.buffers()[0], arr.offset, len(arr)


class ArrowPlan:
    """How to build samples straight from the columns of Arrow record batches of one schema
    (decided once per schema by :meth:`for_schema`; ``None`` there means every row goes through
    :func:`~.records.parse_record`: content parts, the ``texts`` flavour, image paths, both
    ``image`` and ``images``, ...)."""

    @classmethod
    def for_schema(cls, schema, id_field: str, positional: bool = False,
                   source_field: str | None = None) -> "ArrowPlan | None":
        """The plan for batches of ``schema``, or ``None`` (every row through the record path).
        ``positional``: rows of a schema without ``id_field`` get their positional id
        (:func:`~.records.position_id`), as the record path gives them (:class:`~.records.IdRule`).
        ``source_field``: what ``Sample.source`` reads, as for :func:`~.records.record_source`."""
        import pyarrow.types as pt

        if not HAVE_NATIVE:  # the samples are built by the extension; without it, the record path
            return None
        names = schema.names
        if len(set(names)) != len(names) or (id_field not in names and not positional):
            return None
        idt = schema.field(id_field).type if id_field in names else None
        if idt is not None and not (_is_str(idt) or pt.is_integer(idt)):
            return None
        flavours = [k for k in ("conversations", "messages", "texts") if k in names]
        if len(flavours) != 1 or flavours[0] not in _TURN_FIELDS:
            return None
        key = flavours[0]
        role_f, text_f = _TURN_FIELDS[key]
        t = schema.field(key).type
        if not (pt.is_list(t) or pt.is_large_list(t)) or not pt.is_struct(t.value_type):
            return None
        sub = {f.name: f.type for f in t.value_type}
        if not (role_f in sub and text_f in sub and _is_str(sub[role_f]) and _is_str(sub[text_f])):
            return None
        img_fields = [k for k in ("images", "image") if k in names]
        kind = None
        if len(img_fields) > 1:
            return None
        if img_fields:
            it = schema.field(img_fields[0]).type
            if (pt.is_list(it) or pt.is_large_list(it)) and _image_struct(it.value_type):
                kind = "struct_list"
            elif _image_struct(it):
                kind = "struct"
            elif _is_bin(it):
                kind = "bytes"
            else:
                return None  # paths, lists of bytes, ...: the record path
        if source_field is None:
            sources = [f for f in SOURCE_FIELDS if f in names]
        else:  # one named field (absent: no row has a source), or none read at all (IMAGE_FOLDER)
            sources = [source_field] if source_field != IMAGE_FOLDER and source_field in names else []
        plan = cls()
        # whether each array the native side reads has 64-bit offsets (large_string, large_list, ...)
        img_t = schema.field(img_fields[0]).type if img_fields else None
        item_t = img_t.value_type if kind == "struct_list" else img_t
        plan.large = {"id": idt is not None and _large(idt), "turns": _large(t), "role": _large(sub[role_f]), "text": _large(sub[text_f]),
                      "images": kind == "struct_list" and _large(img_t),
                      "bytes": kind is not None and _large(item_t if kind == "bytes" else item_t.field("bytes").type),
                      "path": kind in ("struct", "struct_list") and _large(item_t.field("path").type),
                      "source": bool(sources) and _large(schema.field(sources[0]).type)}
        plan.id_field, plan.key, plan.role_f, plan.text_f = id_field, key, role_f, text_f
        plan.img_field = img_fields[0] if img_fields else None
        plan.kind = kind
        plan.sources = sources
        plan.image_folder = source_field == IMAGE_FOLDER
        plan.one_str_source = len(sources) == 1 and _is_str(schema.field(sources[0]).type)
        plan.int_ids = idt is not None and pt.is_integer(idt)
        plan.positional = idt is None
        return plan

    def _image_folders(self, batch) -> list:
        """Each row's :func:`~.records.image_folder`, from the paths of its image structs only (the
        row dicts would copy every image's bytes)."""
        n = batch.num_rows
        if self.kind not in ("struct", "struct_list"):  # no image column, or bare bytes: no path
            return [None] * n
        col = batch.column(self.img_field)
        if self.kind == "struct":
            paths, valid = col.field("path").to_pylist(), col.is_valid().to_pylist()
            return [image_folder({self.img_field: {"path": p}}) if ok else None for p, ok in zip(paths, valid)]
        # a list's offsets index its child array as a whole (a sliced list keeps the child unsliced)
        offsets, valid = col.offsets.to_pylist(), col.is_valid().to_pylist()
        structs = col.values
        paths, ok_struct = structs.field("path"), structs.is_valid()
        out = []
        for i in range(n):
            j = offsets[i]
            if not valid[i] or offsets[i + 1] == j:
                out.append(None)
            else:
                first = {"path": paths[j].as_py()} if ok_struct[j].as_py() else None
                out.append(image_folder({self.img_field: [first]}))
        return out

    def samples(self, batch, index: int, local: int, where: str, registry: IdRegistry, name: str = ""
                ) -> Iterator[tuple[list, list[int]]]:
        """The batch's plain rows as samples, built by the native extension from the column buffers,
        :data:`CHUNK_ROWS` rows at a time.

        Parameters
        ----------
        batch : pyarrow.RecordBatch
            Rows of this plan's schema; its first row is record ``index`` of the dataset and record
            ``local`` of its file, which is called ``where`` (names unnamed embedded images).
        registry : IdRegistry
            The plain rows' ids are added to it here, a chunk at a time.
        name : str
            The file's name relative to the dataset root: a schema without an id column names its
            rows ``<name>#<row in file>``.

        Yields
        ------
        samples : list of Sample or None
            One entry per row of the chunk; ``None`` at the rows in ``others``.
        others : list of int
            The chunk's rows (0-based in the batch, ascending) that must go through the record path.
        """
        n, large = batch.num_rows, self.large
        conv = batch.column(self.key)
        turns = conv.values
        spec: dict[str, Any] = {
            "n": n, "index": index, "local": local, "where": where, "token": IMAGE_TOKEN, "user": "user",
            "aliases": ROLE_ALIASES, "sample_cls": Sample, "sample_slots": _SAMPLE_SLOTS,
            "image_cls": EmbeddedImage, "image_slots": _IMAGE_SLOTS, "raw": LazyRow(batch, index),
            "turns": _list(conv, large["turns"]), "turn_valid": _bits(turns),
            "roles": _strings(turns.field(self.role_f), large["role"]),
            "texts": _strings(turns.field(self.text_f), large["text"])}
        if self.positional:  # no id column: each row's place in its file, as the record path names it
            spec["id_list"] = [position_id(name, local + i) for i in range(n)]
        elif self.int_ids:  # str(int) is never empty and holds no line break
            spec["id_list"] = [None if v is None else str(v) for v in batch.column(self.id_field).to_pylist()]
        else:
            spec["ids"] = _strings(batch.column(self.id_field), large["id"])
        if self.kind is not None:
            col = batch.column(self.img_field)
            spec["image_kind"] = self.kind
            if self.kind == "bytes":
                spec["image_bytes"] = _strings(col, large["bytes"])
            else:
                if self.kind == "struct_list":
                    spec["image_rows"] = _list(col, large["images"])
                    structs = col.values
                else:
                    structs = col
                spec["image_valid"] = _bits(structs)
                spec["image_bytes"] = _strings(structs.field("bytes"), large["bytes"])
                paths = structs.field("path")
                spec["image_paths"] = None if paths.null_count == len(paths) else _strings(paths, large["path"])
        if self.image_folder:
            spec["source_list"] = self._image_folders(batch)
        elif self.one_str_source:
            spec["source"] = _strings(batch.column(self.sources[0]), large["source"])
        elif self.sources:
            cols = [batch.column(f).to_pylist() for f in self.sources]
            spec["source_list"] = [record_source(dict(zip(self.sources, vals))) for vals in zip(*cols)]

        for start in range(0, n, CHUNK_ROWS):
            stop = min(n, start + CHUNK_ROWS)
            out, others, digests = arrow_samples(spec, start, stop)
            rows = np.arange(index + start, index + stop, dtype=np.int64)
            if others:
                keep = np.ones(stop - start, dtype=bool)
                keep[np.asarray(others) - start] = False
                registry.add_digests(digests[keep], rows[keep])
            else:
                registry.add_digests(digests, rows)
            yield out, others
