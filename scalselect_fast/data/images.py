"""Image paths and pixels: confine paths to an image root, decode images fully or fail clearly.

Path confinement is decided on the *resolved* path (``os.path.realpath``), so ``..`` components,
absolute paths and symlinks are all judged by where they actually lead: a path is accepted when it
ends up inside the (resolved) root, wherever it was written to point. Pixels are not touched here
until :func:`load_image` is called.
"""
from __future__ import annotations

import errno
import io
import os
import stat
import threading
import warnings
from pathlib import Path

from .sample import (EmbeddedImage, REASON_IMAGE_CORRUPT, REASON_IMAGE_MISSING, REASON_IMAGE_OUTSIDE_ROOT,
                     REASON_IMAGE_TOO_LARGE, REASON_IMAGE_TRUNCATED, REASON_IMAGE_UNREADABLE,
                     REASON_INVALID_FIELD, DatasetError, ImageError)


class ImagePathError(ValueError):
    """One image path of a record is unusable (escapes the root, empty, a URL, not a string)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def resolve_root(image_root: str | os.PathLike) -> str:
    """Return the real path of ``image_root``; raise :class:`DatasetError` if it is not a directory."""
    root = os.path.realpath(os.fspath(image_root))
    if not os.path.isdir(root):
        raise DatasetError(f"--image-root {os.fspath(image_root)!r} is not an existing directory; "
                           "pass the folder that the dataset's image paths are relative to",
                           reason="io", path=os.fspath(image_root))
    return root


class ImageResolver:
    """Resolve and confine image paths, caching the real path of each directory seen.

    ``os.path.realpath`` costs one ``lstat`` per path component; datasets keep millions of images in
    a few directories, so directories are resolved once and each image then costs a single
    ``lstat`` (to notice a symlinked file, which is resolved in full).

    Parameters
    ----------
    root : str or None
        Real path of ``--image-root`` (see :func:`resolve_root`). When given, relative paths are
        joined to it and the resolved result must lie inside it. When ``None``, relative paths are
        joined to ``base_dir`` and nothing is confined.
    base_dir : str
        Directory of the dataset file (used only when ``root`` is None).
    """

    _MAX_DIRS = 1 << 16

    def __init__(self, root: str | None, base_dir: str):
        self.root = root
        self.base_dir = base_dir
        self._prefix = None if root is None else root.rstrip(os.sep) + os.sep
        self._dirs: dict[str, str] = {}  # directory as written -> its real path + os.sep
        self._base = (root if root is not None else base_dir).rstrip(os.sep) + os.sep

    def _realpath(self, joined: str) -> str:
        # Plain string splitting: os.path.split/join cost more than the lstat on this hot path.
        cut = joined.rfind(os.sep)
        head, tail = joined[:cut] or os.sep, joined[cut + 1:]
        if tail in ("", ".", ".."):
            return os.path.realpath(joined)
        real_head = self._dirs.get(head)
        if real_head is None:
            real_head = os.path.realpath(head).rstrip(os.sep) + os.sep
            if len(self._dirs) >= self._MAX_DIRS:
                self._dirs.clear()
            self._dirs[head] = real_head
        candidate = real_head + tail
        try:
            if stat.S_ISLNK(os.lstat(candidate).st_mode):
                return os.path.realpath(candidate)
        except OSError:
            pass  # missing: load_image reports it; the path itself is what it is
        return candidate

    def __call__(self, path: object) -> str:
        """Return the absolute, symlink-resolved path; raise :class:`ImagePathError` if unusable.

        ``reason`` is ``"image_outside_root"`` or ``"invalid_field"`` (empty, not a string, a URL).
        """
        if not isinstance(path, str) or not path.strip():
            raise ImagePathError(f"image path must be a non-empty string, got {path!r}", REASON_INVALID_FIELD)
        if "://" in path:
            raise ImagePathError(f"image {path!r} is a URL; download the images and pass local paths "
                                 "(relative to --image-root)", REASON_INVALID_FIELD)
        if "\x00" in path:
            raise ImagePathError(f"image path {path!r} contains a NUL byte", REASON_INVALID_FIELD)
        joined = path if os.path.isabs(path) else self._base + path
        real = self._realpath(joined)
        if self.root is not None and not (real == self.root or real.startswith(self._prefix)):
            how = "an absolute path" if os.path.isabs(path) else (
                "a '..' path" if ".." in Path(path).parts else "a symlink")
            raise ImagePathError(
                f"image {path!r} resolves to {real!r}, outside --image-root {self.root!r} ({how}); "
                "refusing to read it. Move the image under the root or pass a root that contains it",
                REASON_IMAGE_OUTSIDE_ROOT)
        return real


def resolve_image_path(path: object, root: str | None, base_dir: str) -> str:
    """Resolve one image path (uncached convenience form of :class:`ImageResolver`)."""
    return ImageResolver(root, base_dir)(path)


#: default of ``--max-image-pixels``: larger images are skipped as ``image_too_large`` before decoding
#: (40 Mpx is a 7300 x 5500 photo; decoded RGB it needs 120 MB, and the model resizes it anyway)
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


def _open_regular(path: str):
    """Open ``path`` for reading only if it is a regular file (a FIFO or device would block or never end).

    The type is checked with ``stat`` before opening and again on the open descriptor (the path may
    have been swapped in between); ``O_NONBLOCK`` keeps the open itself from waiting for a FIFO writer.
    """
    st = os.stat(path)  # FileNotFoundError / PermissionError: the caller maps them to reasons
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL,
                                f"not a regular file ({_file_kind(st.st_mode)})")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)})")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


#: held while Pillow's own pixel limit is lifted (a process-wide setting), so it is restored exactly once
_PILLOW_LIMIT_LOCK = threading.Lock()


def _decode(source, path: str, max_pixels: int | None):
    """Open ``source``, refuse it from the header if over ``max_pixels``, else decode it to RGB."""
    from PIL import Image

    with warnings.catch_warnings():
        if max_pixels is not None:  # refused below, before decoding: Pillow's warning is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(source)
    with im:
        if max_pixels is not None and im.width * im.height > max_pixels:
            raise ImageError(f"image {path!r} is {im.width}x{im.height} = {im.width * im.height:,} "
                             f"pixels, over --max-image-pixels {max_pixels:,}; skipped without decoding "
                             f"(raise the limit to use it)", path=path, reason=REASON_IMAGE_TOO_LARGE)
        with warnings.catch_warnings():
            if max_pixels is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
        return im.convert("RGB")


def load_image(path: "str | os.PathLike | EmbeddedImage", max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS):
    """Open and fully decode an image as RGB.

    Decoding happens here (``Image.load``), so a truncated or corrupt file fails in this call and not
    later inside a model's preprocessing. Only regular files are opened (a FIFO or a device file is
    refused without reading), and the pixel count is checked from the header before decoding.

    Parameters
    ----------
    path : str, path-like or EmbeddedImage
        Image file, or encoded image bytes carried in the dataset (decoded from memory; errors
        name ``EmbeddedImage.name``).
    max_pixels : int or None
        Refuse images with more than this many pixels (width x height) before decoding them;
        default :data:`DEFAULT_MAX_IMAGE_PIXELS`. This limit alone decides, above or below Pillow's
        own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``). ``None`` leaves only Pillow's.

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, pixels loaded, file closed.

    Raises
    ------
    ImageError
        ``reason`` is ``"image_missing"`` (no such file), ``"image_unreadable"`` (permissions,
        a directory, a FIFO, a device), ``"image_corrupt"`` (not an image PIL can decode),
        ``"image_truncated"`` or ``"image_too_large"`` (over ``max_pixels`` or PIL's
        decompression-bomb limit).
    """
    from PIL import Image, UnidentifiedImageError

    embedded = isinstance(path, EmbeddedImage)
    data = path.data if embedded else None
    path = os.fspath(path)
    try:
        source = io.BytesIO(data) if embedded else _open_regular(path)
        with source:
            try:
                rgb = _decode(source, path, max_pixels)
            except Image.DecompressionBombError:
                if max_pixels is None:
                    raise
                # Pillow refuses over 2 x its MAX_IMAGE_PIXELS (179 Mpx) before we see the size: read
                # the header again with its limit off, so --max-image-pixels decides, with its message
                source.seek(0)
                with _PILLOW_LIMIT_LOCK:
                    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        rgb = _decode(source, path, max_pixels)
                    finally:
                        Image.MAX_IMAGE_PIXELS = saved
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"image {path!r} does not exist", path=path, reason=REASON_IMAGE_MISSING) from None
    except (IsADirectoryError, PermissionError) as e:
        raise ImageError(f"image {path!r} cannot be read: {e.strerror or e}", path=path,
                         reason=REASON_IMAGE_UNREADABLE) from None
    except UnidentifiedImageError:
        raise ImageError(f"image {path!r} is corrupt or not an image format Pillow can decode",
                         path=path, reason=REASON_IMAGE_CORRUPT) from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {path!r} is too large to decode safely: {e}", path=path,
                         reason=REASON_IMAGE_TOO_LARGE) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports truncation as OSError("image file is truncated ...") or, for some
        # decoders, "broken data stream"; anything else is a corrupt payload.
        text = str(e)
        truncated = "truncat" in text.lower() or "broken data stream" in text.lower()
        raise ImageError(f"image {path!r} is {'truncated' if truncated else 'corrupt'}: {text}",
                         path=path, reason=REASON_IMAGE_TRUNCATED if truncated else REASON_IMAGE_CORRUPT
                         ) from None
    if rgb.width == 0 or rgb.height == 0:
        raise ImageError(f"image {path!r} has zero size", path=path, reason=REASON_IMAGE_CORRUPT)
    return rgb
