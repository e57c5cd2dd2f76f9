"""The read loop: a dataset (any input, any container) into a stream of :class:`~.sample.Sample`.

:func:`read_dataset` opens the input (:func:`~.sources.open_dataset`: files, globs, URLs, ``datasets``
objects), walks its records in order through the container modules that registered themselves
with :mod:`.sources` (:mod:`.json_list`, :mod:`.jsonl`, :mod:`.parquet`, :mod:`.hf`,
:mod:`.webdataset`), turns each into a sample by the rules of :mod:`.records`, and checks that ids
are unique (:func:`check_unique_ids` is the same check as a pass of its own). It holds no parsing
rule and knows no container: a new format is a new module, not an edit here.

What stops the read and what skips one sample
---------------------------------------------
Fatal (:class:`DatasetError` raised, nothing more is yielded): the file is missing or unreadable,
malformed JSON or a malformed JSONL line (file, line and column in the message), a top level that
is not a list of records, two records with the same id (both positions; raised after the last
record, see below), an empty dataset (no records, or every record skipped), a nonexistent
``image_root``, and for several files: a glob that matches nothing, mixed containers, Parquet
shards with different schemas.

Per sample (the sample is not yielded): a missing or invalid required field (an ``id`` that is
there but null, empty or not a string/integer, or missing when ``id_field`` names it; a record with
no ``id`` field at all gets its positional id, see :class:`~.records.IdRule`;
``conversations``/``messages``, a turn's role or text), an image path that escapes ``image_root``
or is not a local path, placeholders that cannot be matched to images. With a ``skip_log`` these are
written to it (one line each, never silently) and reading continues; without one they raise
:class:`DatasetError` naming the record, the field and the fix. Missing/corrupt image *files* are
not detected here (reading would have to decode every image): :func:`~.images.load_image` raises
:class:`~.sample.ImageError` for them when the pixels are needed.

Arrow containers (Parquet, ``save_to_disk``, ``datasets.Dataset``) are read a record batch at a
time: :class:`~.arrow.ArrowPlan` (decided once per schema) builds the plain rows' samples from whole
columns with the same rules; the rows it does not cover go through
:func:`~.records.parse_record` on their row dict. ``Sample.raw`` of a plain row is built on first
access (:class:`~.sample.LazyRow`).

Memory: every container is streamed (a JSON list too: a bounded text window, see
:mod:`.json_list`), and duplicate ids are found with constant memory (:mod:`.ids`: 16 bytes per
record spilled to temporary files, checked when the last record has been read), so reading 10M
records needs no memory proportional to N.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from .arrow import ArrowPlan
from .ids import IdRegistry
from .images import ImagePathError, ImageResolver, resolve_root
from .records import IdRule, RecordProblem, parse_record, position_id, record_id
from .sample import REASON_INVALID_FIELD, DatasetError, Sample, UnusableRecord, position_text
from .skiplog import summarize_skips
from .sources import NO_ID_FIELD, DataSource, InputFile, check_data_argument, containers, open_dataset, sniff_container


def detect_format(path: str | os.PathLike) -> str:
    """Return the container of ``path`` (a file, directory, glob, URL or list): ``"json"``, ``"jsonl"``,
    ``"parquet"`` or another registered container, from the files' first bytes."""
    check_data_argument(path, "detect_format: path")
    return open_dataset(path).container


def iter_records(path, format: str = "auto") -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(index, line, record)`` for every record, unvalidated and streamed.

    ``path`` is anything :func:`~scalselect_fast.data.sources.open_dataset` accepts (a file, directory,
    glob, URL, list, or ``datasets`` object); ``index`` is global across files (sorted file names,
    then record order) and ``line`` is the line inside the record's own file.
    """
    check_data_argument(path, "iter_records: path", format)
    for index, line, record, _f, _l in open_dataset(path, format).iter_records():
        yield index, line, record


def count_records(path, format: str = "auto") -> int:
    """Number of records of the dataset (progress bars, shard ranges), checking its syntax on the way.

    JSON and JSONL are parsed completely (every line of a JSONL file), so a malformed record
    anywhere raises :class:`DatasetError` (file, line, column) here, before any expensive work
    starts; Parquet reads only footers (its pages are checked when they are decoded).
    """
    try:
        check_data_argument(path, "count_records: path", format)
        return open_dataset(path, format).count()
    except DatasetError as e:
        if e.reason == "empty":  # an empty file holds zero records; that is an answer, not an error
            return 0
        raise



def _raise_duplicates(source: DataSource, registry: IdRegistry, rule: IdRule) -> None:
    """Raise :class:`DatasetError` for the first (by later position) confirmed duplicate id, if any."""
    candidates = registry.duplicates()
    if not candidates:
        return
    wanted = {i for pair in candidates for i in pair}
    last = max(wanted)
    seen: dict[int, tuple[str | None, InputFile, int, int | None]] = {}
    for index, line, record, file, local in source.iter_records():  # error path only: a second pass
        if index in wanted:
            seen[index] = (rule.of(record, source.relative_name(file), local), file, local, line)
        if index >= last:
            break
    for a, b in candidates:
        (sid, fa, la, lna), (sid_b, fb, lb, lnb) = seen[a], seen[b]
        if sid is None or sid != sid_b:
            continue  # two different ids with the same 64-bit digest
        first = position_text(la, lna) + (f" of {fa.path}" if not source.single else "")
        raise DatasetError(f"{fb.path}: duplicate id {sid!r}: {first} and {position_text(lb, lnb)}. Ids must be unique; "
                           "rename or drop one of them", reason="duplicate_id", path=fb.path, index=b, line=lnb,
                           sample_id=sid)


def check_unique_ids(data, format: str = "auto", id_field: str | None = None) -> int:
    """Raise :class:`DatasetError` if two records share an id; return the number of records with an id.

    Reads only the ids where the container allows it (a Parquet file's id column); memory stays
    constant (see :mod:`.ids`). ``scalselect run`` calls it before extraction so a duplicate stops
    the run before any model work; the same pass gives the record counts (cached on the source).
    Containers without an id reader are checked while reading. ``id_field`` as for
    :func:`read_dataset` (records without an id field are counted with their positional id).
    """
    source = open_dataset(data, format)
    rule = IdRule(id_field)
    c = containers()[source.container]
    with IdRegistry() as registry:
        if c.ids is not None and source.dataset is None:
            offset, counts = 0, []
            source.check_schemas()
            for f in source.files:
                n = 0
                name = source.relative_name(f)
                for local, sid in c.ids(f, rule.field):  # every record, so this pass also counts them
                    if sid is NO_ID_FIELD:
                        sid = position_id(name, local) if rule.positional else None
                    if sid is not None:
                        registry.add(sid, offset + local)
                    n = local + 1
                counts.append(n)
                offset += n
            if source._counts is None:  # a JSON/JSONL count is a full parse: do not make it twice
                source._counts = counts
        else:
            for index, _line, record, f, local in source.iter_records():
                sid = rule.of(record, source.relative_name(f), local) if isinstance(record, dict) else None
                if sid is not None:
                    registry.add(sid, index)
        _raise_duplicates(source, registry, rule)
        return registry.count


class _RemoteImages:
    """Image paths of a remote dataset: only with ``image_root`` (there is no local folder to be relative to)."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, path: object) -> str:
        raise ImagePathError(f"image {path!r} is a path, but the dataset {self.label!r} is remote; pass "
                             "--image-root with the folder those paths are relative to (or embed the images)",
                             REASON_INVALID_FIELD)


def read_dataset(path, image_root: str | os.PathLike | None = None,
                 format: str = "auto", skip_log=None, id_field: str | None = None,
                 source_field: str | None = None, start: int = 0) -> Iterator[Sample]:
    """Stream the samples of a dataset.

    Parameters
    ----------
    path : str, path-like, list, DataSource, or datasets.Dataset / IterableDataset
        A file (LLaVA JSON, ShareGPT JSON, JSONL of either, Parquet, ...), a directory, a glob
        (``data/train-*.parquet``), a URL (``s3://``, ``hf://``, ``memory://`` ...), a list of those,
        or a Hugging Face ``datasets`` object; see :func:`~scalselect_fast.data.sources.open_dataset`.
    image_root : str or path-like, optional
        Directory that relative image paths are joined to; every resolved image path (after ``..``
        and symlinks) must lie inside it, otherwise the sample is refused. Without it, relative
        paths are relative to the directory of the file holding the record, and nothing is confined.
        Embedded images (bytes in the dataset) need no root.
    format : str
        ``"auto"`` (recognise each file from its first bytes) or a container name (``"json"``,
        ``"jsonl"``, ``"parquet"``, ...).
    skip_log : SkipLog, optional
        Where per-sample problems go (reading continues). Without it they raise.
    id_field : str, optional
        Record field (column) that holds the unique id (unique across all files). ``None`` (the
        default): ``id``, and a record with no ``id`` field at all (a Parquet file or ``datasets``
        folder without an ``id`` column, as the Cauldron and FineVision ship) gets the positional id
        ``<file relative to the dataset root>#<row in the file>`` (:func:`position_id`). A named
        field is required: a record without it is skipped with ``missing_field``.
    source_field : str, optional
        What ``Sample.source`` reads (the run's ``--source-field``): ``None`` (the default) the first
        of :data:`~.records.SOURCE_FIELDS` present, a field name that field only, ``"image_folder"``
        the first folder of the image path; see :func:`~.records.record_source`.
    start : int, >= 0
        Yield only the samples from record ``start`` on (a rank's range, a resumed extraction). The
        files wholly before it are not read (their records are counted: JSON and JSONL files are
        parsed for that, Parquet reads footers); in the file holding it, the records before it are
        passed over unparsed (they are not validated, logged or id-checked). Ids are checked for
        duplicates among the records from ``start`` on; the empty / all-skipped checks apply only to
        a read from 0.

    Yields
    ------
    Sample
        In order (sorted file names, then record order); ``Sample.index`` numbers every record
        globally, skipped ones included; ``Sample.line`` is the line in the record's own file.

    Raises
    ------
    DatasetError
        Fatal problems (no such file, a glob matching nothing, mixed containers, malformed file,
        duplicate ids, empty dataset, ...) and, without a ``skip_log``, per-sample problems. The
        message names the file, record and line.
    """
    check_data_argument(path, "read_dataset: path", format)
    if image_root is not None and not (isinstance(image_root, str) or (
            isinstance(image_root, os.PathLike) and isinstance(os.fspath(image_root), str))):
        raise TypeError(f"read_dataset: image_root must be a directory path (str or os.PathLike) or None, got "
                        f"{type(image_root).__name__}")
    if source_field is not None and (not isinstance(source_field, str) or not source_field):
        raise TypeError(f"read_dataset: source_field must be a field name (a non-empty str), 'image_folder' or "
                        f"None, got {source_field!r:.100}")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise TypeError(f"read_dataset: start must be a record index (an int >= 0), got {start!r:.100}")
    source = open_dataset(path, format)
    rule = IdRule(id_field)
    id_field = rule.field
    root = resolve_root(image_root) if image_root is not None else None
    resolvers: dict[str, Any] = {}
    names: dict[str, str] = {}  # file path -> name relative to the dataset root (positional ids)
    many = not source.single
    n_records = n_skipped = 0
    reasons: dict[str, int] = {}  # skips per reason, and the first of each, for the all-skipped message
    examples: dict[str, dict] = {}

    def resolver(file: InputFile):  # image paths resolve relative to the record's own file
        if root is not None:
            return resolvers.get("") or resolvers.setdefault("", ImageResolver(root, root))
        if file.local:
            return resolvers.get(file.path) or resolvers.setdefault(
                file.path, ImageResolver(None, file.base_dir or os.getcwd()))
        return resolvers.get(file.path) or resolvers.setdefault(file.path, _RemoteImages(file.path))

    def skip(p: RecordProblem, sid: str | None, file: InputFile, index: int, line: int | None, local: int) -> None:
        if skip_log is None:
            raise DatasetError(f"{file.path}: {position_text(local, line)}" + (f" (id {sid!r})" if sid else "")
                               + f": {p.detail}. Fix the record, or read with a SkipLog to skip such "
                               "samples and continue", reason=p.reason, path=file.path, index=index,
                               line=line, sample_id=sid) from None
        skip_log.add(sid if sid is not None else p.sample_id, index, p.reason, p.detail, line=line,
                     file=file.path if many else None)
        reasons[p.reason] = reasons.get(p.reason, 0) + 1
        if p.reason not in examples:
            examples[p.reason] = {"id": sid if sid is not None else p.sample_id, "index": local, "line": line,
                                  "file": file.path, "detail": p.detail}

    with IdRegistry() as registry:  # duplicate ids: constant memory, checked once every id is known
        add_id = registry.add

        def record_sample(record: Any, index: int, line: int | None, file: InputFile, local: int, resolve,
                          sid: str | None = None) -> Sample:
            """The record path (a row dict): the sample, or ``RecordProblem`` carrying the id read so far."""
            try:
                if isinstance(record, UnusableRecord):  # the container already knows why it is unusable
                    sid = record.sample_id
                    raise RecordProblem(record.reason, record.detail)
                if sid is None:
                    if rule.by_position(record):
                        name = names.get(file.path) or names.setdefault(file.path, source.relative_name(file))
                        sid = position_id(name, local)
                    else:
                        sid = record_id(record, id_field)
                    add_id(sid, index)
                return parse_record(record, index=index, line=line, resolve=resolve, id_field=id_field,
                                    sample_id=sid, where=file.name, local=local, source_field=source_field)
            except RecordProblem as p:
                p.read_id = sid
                raise

        if source.has_batches():  # Arrow: column-wise per batch where the schema allows (ArrowPlan)
            file = resolve = schema = plan = None
            for index0, batch, f, local0 in source.iter_batches(start=start):
                if index0 + batch.num_rows <= start:
                    continue
                if index0 < start:  # the batch holding record `start`: its rows from there on
                    cut = start - index0
                    batch, index0, local0 = batch.slice(cut), start, local0 + cut
                if f is not file:
                    file, resolve = f, resolver(f)
                n_records += batch.num_rows
                if schema is None or not batch.schema.equals(schema):  # (hashing a schema costs 6 us)
                    schema = batch.schema
                    plan = ArrowPlan.for_schema(schema, id_field, rule.positional, source_field)
                if plan is None:  # every row through the record path
                    records = batch.to_pylist()
                    chunks = [([None] * batch.num_rows, list(range(batch.num_rows)))]
                else:
                    records = None
                    name = names.get(file.path) or names.setdefault(file.path, source.relative_name(file))
                    chunks = plan.samples(batch, index0, local0, file.name, registry, name)
                row = 0  # the chunk's first row in the batch
                for samples, others in chunks:
                    if not others:
                        yield from samples
                        row += len(samples)
                        continue
                    for k, sample in enumerate(samples):
                        if sample is None:  # the record path decides: a sample, or a skip and why
                            i = row + k
                            try:
                                record = records[i] if records is not None else batch.slice(i, 1).to_pylist()[0]
                                sample = record_sample(record, index0 + i, None, file, local0 + i, resolve)
                            except RecordProblem as p:
                                skip(p, p.read_id, file, index0 + i, None, local0 + i)
                                n_skipped += 1
                                continue
                        yield sample
                    row += len(samples)
        else:
            file = resolve = None
            for index, line, record, f, local in source.iter_records(start=start):
                if index < start:
                    continue
                n_records += 1
                if f is not file:
                    file, resolve = f, resolver(f)
                try:
                    sample = record_sample(record, index, line, file, local, resolve)
                except RecordProblem as p:
                    skip(p, p.read_id, file, index, line, local)
                    n_skipped += 1
                    continue
                yield sample
        _raise_duplicates(source, registry, rule)
    if start:
        return  # a tail of the dataset: whether the whole is empty or all skipped is not known here
    n_yielded = n_records - n_skipped
    if n_records == 0:
        raise DatasetError(f"dataset {source.label!r} is empty (no records)", reason="empty",
                           path=source.files[0].path if source.files else None)
    if n_yielded == 0:
        logged = getattr(skip_log, "path", None)
        where = f"; every one is listed in {logged}" if logged is not None else ""
        top = min(reasons, key=lambda r: (-reasons[r], r)) if reasons else None
        why = summarize_skips(reasons, examples.get(top))
        raise DatasetError(f"dataset {source.label!r}: all {n_records} records were skipped, nothing to select: "
                           f"{why}{where}{format_mismatch_hint(source)}", reason="empty",
                           path=source.files[0].path if source.files else None)


def format_mismatch_hint(source: DataSource) -> str:
    """``". Its content is json, but it was read as jsonl ..."`` when the first file's content is another
    container than the one it was read as (a JSON list under ``--format jsonl``), else ``""``."""
    if not source.files or (source.files[0].local and os.path.isdir(source.files[0].path)):
        return ""
    try:
        kind = sniff_container(source.files[0])
    except DatasetError:
        return ""
    if kind == source.container:
        return ""
    return (f". Its content is {kind}, but it was read as {source.container} (--format {source.container}): "
            f"pass --format {kind} or --format auto")
