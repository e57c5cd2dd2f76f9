"""Dataset input and output: readers that turn LLaVA / ShareGPT / JSONL / Parquet / datasets / WebDataset records into
:class:`Sample` objects, image loading with clear failures, the ``skipped.jsonl`` log, writers that
emit a selected subset in the input's own format, and the bundled demo dataset generator.

Nothing here imports torch; Pillow is imported only when images are loaded or generated.
"""
from .images import load_image, resolve_image_path
from .readers import (FORMATS, SOURCE_FIELDS, count_records, detect_format, iter_records, read_dataset,
                      record_id_or_none, record_source)
from . import hf  # noqa: F401,E402  (registers the "datasets" container; imports `datasets` only when used)
from . import webdataset  # noqa: F401,E402  (registers the "webdataset" container: tar shards)
from .sample import IMAGE_TOKEN, ROLES, DatasetError, EmbeddedImage, ImageError, Sample
from .skiplog import SkipLog, read_skip_log
from .sources import DataSource, input_files, open_source
from .writers import input_layout, selected_name, write_selected

__all__ = [
    "DataSource", "DatasetError", "EmbeddedImage", "FORMATS", "IMAGE_TOKEN", "ImageError", "ROLES", "SOURCE_FIELDS", "Sample", "SkipLog",
    "count_records", "detect_format", "input_files", "open_source", "iter_records", "load_image", "read_dataset", "record_id_or_none",
    "read_skip_log", "record_source", "resolve_image_path",
    "input_layout", "selected_name", "write_selected",
]
