"""Dataset input and output: readers that turn LLaVA / ShareGPT / JSONL / Parquet / datasets / WebDataset records into
:class:`Sample` objects, image loading with clear failures, the ``skipped.jsonl`` log, writers that
emit a selected subset in the input's own format, and the bundled demo dataset generator.

Layers, lowest first (a module imports only those before it): :mod:`.sample`, :mod:`.ids`,
:mod:`.images`, :mod:`.skiplog`; :mod:`.sources` (what ``--data`` names, the container registry);
:mod:`.records` (the record rules); :mod:`.arrow` (the same rules column-wise); one module per
container, each registering itself with :mod:`.sources` (:mod:`.json_list`, :mod:`.jsonl`,
:mod:`.parquet`, :mod:`.hf`, :mod:`.webdataset`); :mod:`.readers` (the read loop); :mod:`.writers`.

Nothing here imports torch; Pillow is imported only when images are loaded or generated.
"""
from .images import load_image, resolve_image_path
# the containers register themselves with .sources on import, in the order sniffing tries them
from . import json_list, jsonl, parquet, hf, webdataset  # noqa: F401,E402  (``datasets`` only imported when used)
from .readers import count_records, detect_format, iter_records, read_dataset
from .records import SOURCE_FIELDS, record_id_or_none, record_source
from .sample import IMAGE_TOKEN, ROLES, DatasetError, EmbeddedImage, ImageError, Sample
from .skiplog import SkipLog, read_skip_log
from .sources import DataSource, formats, input_files, open_dataset
from .writers import input_layout, selected_name, write_selected

__all__ = [
    "DataSource", "DatasetError", "EmbeddedImage", "FORMATS", "IMAGE_TOKEN", "ImageError", "ROLES", "SOURCE_FIELDS", "Sample", "SkipLog",
    "count_records", "detect_format", "formats", "input_files", "open_dataset", "iter_records", "load_image", "read_dataset",
    "record_id_or_none", "read_skip_log", "record_source", "resolve_image_path",
    "input_layout", "selected_name", "write_selected",
]


def __getattr__(name: str):
    # FORMATS is read from the container registry when asked for, so it lists every registered container
    if name == "FORMATS":
        return formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
