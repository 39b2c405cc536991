"""Loaders for private (and evaluation) image data.

Every loader returns host NumPy arrays in the pejax image convention:

  images: float32, shape (N, H, W, C), values in [0, 1] (0 = black), C = 1 (grey) or 3 (RGB)
  labels: int32, shape (N,), class ids >= 0

NumPy rather than JAX arrays: loading is host I/O, and the arrays move to the device when a jitted
function first uses them. Nothing is ever unpickled: ``.npz`` files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np


class DigitsSplit(NamedTuple):
    """Train/test split of scikit-learn's digits, from :func:`load_digits_split`.

    Attributes:
      train_images: (N_train, 8, 8, 1) float32 in [0, 1].
      train_labels: (N_train,) int32 in 0..9.
      test_images: (N_test, 8, 8, 1) float32 in [0, 1].
      test_labels: (N_test,) int32 in 0..9.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class LabeledImages(NamedTuple):
    """Images with integer labels, from :func:`load_npz`.

    Attributes:
      images: (N, H, W, C) float32 in [0, 1], C = 1 or 3.
      labels: (N,) int32, >= 0.
    """

    images: np.ndarray
    labels: np.ndarray


class ImageFolder(NamedTuple):
    """Images, labels and class names, from :func:`load_image_folder`.

    Attributes:
      images: (N, H, W, C) float32 in [0, 1], C = 1 or 3.
      labels: (N,) int32 in 0..len(class_names) - 1.
      class_names: the class folder names; ``class_names[label]`` names a label.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]


_NUM_DIGITS = 1797
_NUM_DIGIT_CLASSES = 10


def load_digits_split(*, test_size: float | int = 0.25, random_state: int = 0) -> DigitsSplit:
    """Loads scikit-learn's bundled digits (1797 8 x 8 grey images, 10 classes), split in two.

    The split is exactly ``train_test_split(X, y, test_size=test_size, stratify=y,
    random_state=random_state)`` on ``sklearn.datasets.load_digits()``, so the defaults give the
    usual 1347 train / 450 test images with class proportions preserved. Pixel values 0..16 are
    divided by 16.

    Args:
      test_size: the test fraction in (0, 1), or the number of test images (an int in
        [10, 1787], so that every class appears on both sides).
      random_state: seed of the split (an int, so the split is reproducible).

    Returns:
      ``DigitsSplit(train_images, train_labels, test_images, test_labels)``: images float32
      (N, 8, 8, 1) in [0, 1], labels int32 (N,).

    Raises:
      ValueError: test_size out of range.
      TypeError: a non-numeric test_size or a non-integer random_state.
      ImportError: scikit-learn is not installed (``pip install 'pejax[demo]'``).

    Example:
      >>> split = load_digits_split()
      >>> split.train_images.shape, split.test_images.shape
      ((1347, 8, 8, 1), (450, 8, 8, 1))
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_split needs scikit-learn; install it with pip install 'pejax[demo]'."
        ) from e
    if isinstance(test_size, bool) or not isinstance(
        test_size, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"test_size must be a fraction in (0, 1) or an int count, got {test_size!r}."
        )
    if isinstance(test_size, int | np.integer):
        low, high = _NUM_DIGIT_CLASSES, _NUM_DIGITS - _NUM_DIGIT_CLASSES
        if not low <= test_size <= high:
            raise ValueError(
                f"test_size as a count must lie in [{low}, {high}] so that every class appears "
                f"in both parts, got {test_size}."
            )
    elif not 0.0 < test_size < 1.0:
        raise ValueError(
            f"test_size as a fraction must lie strictly between 0 and 1, got {test_size}."
        )
    if isinstance(random_state, bool) or not isinstance(random_state, int | np.integer):
        raise TypeError(
            f"random_state must be an int seed, got {random_state!r}; e.g. random_state=0."
        )

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data,
        digits.target,
        test_size=test_size,
        stratify=digits.target,
        random_state=random_state,
    )

    def images(a: np.ndarray) -> np.ndarray:
        return (a.reshape(-1, 8, 8, 1) / 16.0).astype(np.float32)

    return DigitsSplit(
        images(x_train), y_train.astype(np.int32), images(x_test), y_test.astype(np.int32)
    )


def _as_images(name: str, images: np.ndarray, source: str) -> np.ndarray:
    """Converts uint8 (0..255) or float ([0, 1]) (N, H, W[, C]) images to float32 NHWC."""
    where = f"{name} in {source}"
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(
            f"{where} must have shape (N, H, W) or (N, H, W, C), got shape {images.shape}."
        )
    if images.shape[0] == 0:
        raise ValueError(f"{where} holds no images (shape {images.shape}).")
    if images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{where} must have 1 (grey) or 3 (RGB) channels in the last axis, got shape "
            f"{images.shape}. Drop an alpha channel with images[..., :3]; move channels from "
            "axis 1 with images.transpose(0, 2, 3, 1)."
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(
            f"{where} must be uint8 (0..255) or floating (0..1), got dtype {images.dtype}. "
            "Convert before saving, e.g. images.astype(np.uint8) for values in 0..255."
        )
    if not np.isfinite(images).all():
        bad = np.argwhere(~np.isfinite(images))
        raise ValueError(
            f"{where} contains NaN or Inf ({len(bad)} values, first in image {int(bad[0][0])})."
        )
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        hint = " They look like 0..255 values: divide by 255." if 1.0 < hi <= 255.0 else ""
        raise ValueError(f"float {where} must lie in [0, 1], got values in [{lo}, {hi}].{hint}")
    return images.astype(np.float32)


def _as_labels(name: str, labels: np.ndarray, num_images: int, source: str) -> np.ndarray:
    where = f"{name} in {source}"
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"{where} must be integer class ids, got dtype {labels.dtype}. Save them as "
            "integers, e.g. labels.astype(np.int32), mapping class names to ids 0..K-1 first."
        )
    if labels.ndim != 1:
        raise ValueError(f"{where} must be 1-D (N,), got shape {labels.shape}.")
    if labels.shape[0] != num_images:
        raise ValueError(
            f"{where} has {labels.shape[0]} labels but there are {num_images} images; "
            "there must be exactly one label per image."
        )
    if labels.min() < 0:
        raise ValueError(
            f"{where} must be >= 0, got minimum {int(labels.min())}. Map classes to ids 0..K-1."
        )
    if labels.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{where} must fit in int32, got maximum {int(labels.max())}.")
    return labels.astype(np.int32)


def load_npz(
    path: str | os.PathLike[str], *, images_key: str = "images", labels_key: str = "labels"
) -> LabeledImages:
    """Loads labelled images from an ``.npz`` archive, never unpickling (``allow_pickle=False``).

    Args:
      path: path of an ``.npz`` file, as written by ``np.savez(path, images=..., labels=...)``.
      images_key: name of the images array: shape (N, H, W) (grey) or (N, H, W, C) with C = 1
        or 3; dtype uint8 with values 0..255 (divided by 255) or floating with values in [0, 1].
      labels_key: name of the labels array: shape (N,), integer dtype, values >= 0.

    Returns:
      ``LabeledImages(images, labels)``: float32 (N, H, W, C) in [0, 1] and int32 (N,).

    Raises:
      FileNotFoundError: no file at ``path``.
      KeyError: a missing key (the message lists the keys present).
      ValueError: not an ``.npz`` archive, object (pickled) arrays, bad shapes, no images, a label
        count that differs from the image count, negative labels, NaN/Inf, or float values
        outside [0, 1].
      TypeError: images neither uint8 nor floating, or non-integer labels.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "data.npz")
      >>> np.savez(path, images=np.full((4, 8, 8), 255, np.uint8), labels=np.arange(4))
      >>> data = load_npz(path)
      >>> data.images.shape, data.images.dtype, float(data.images.max()), data.labels.dtype
      ((4, 8, 8, 1), dtype('float32'), 1.0, dtype('int32'))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"path {str(path)!r} is not a file; give the path of an .npz archive."
        )
    source = repr(str(path))
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # EOFError: an empty file
        raise ValueError(
            f"{source} could not be read as an .npz archive without unpickling ({e}). Save "
            "plain numeric arrays with np.savez(path, images=..., labels=...)."
        ) from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{source} holds a single .npy array, not an .npz archive; save with "
            f"np.savez(path, {images_key}=..., {labels_key}=...)."
        )
    arrays = {}
    with archive:
        keys = sorted(archive.files)
        for key_name, key in (("images_key", images_key), ("labels_key", labels_key)):
            if key not in archive.files:
                raise KeyError(
                    f"{source} has no array {key!r} ({key_name}); keys present: {keys}. "
                    f"Pass {key_name}= one of them."
                )
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                raise ValueError(
                    f"array {key!r} in {source} holds Python objects, which are never "
                    f"unpickled ({e}). Save it as a numeric array."
                ) from e
    images = _as_images(f"images ({images_key!r})", arrays[images_key], source)
    labels = _as_labels(f"labels ({labels_key!r})", arrays[labels_key], len(images), source)
    return LabeledImages(images, labels)


_IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
_GREY_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})


def load_image_folder(path: str | os.PathLike[str]) -> ImageFolder:
    """Loads a folder with one subfolder of images per class.

    Layout: ``path/<class name>/<image file>``. Class subfolders are sorted by name (plain string
    order, so ``"10"`` comes before ``"2"``) and the i-th gets label i. Files in a class folder are
    read in sorted name order. Only files with an image suffix (.png, .jpg, .jpeg, .bmp, .gif,
    .tif, .tiff, .webp, .ppm, .pgm, .pbm; any case) are read; other files, and names starting with
    ``"."``, are ignored. Images are read with Pillow and all converted to one mode: ``"L"``
    (C = 1) when every image is grey (modes 1, L, LA), else ``"RGB"`` (C = 3). Alpha channels are
    dropped (not composited) and palette images count as colour. Values are divided by 255.

    Args:
      path: the root folder.

    Returns:
      ``ImageFolder(images, labels, class_names)``: float32 (N, H, W, C) in [0, 1], int32 (N,)
      labels, and the class folder names in label order.

    Raises:
      FileNotFoundError: ``path`` is not a folder.
      ValueError: no class subfolders, a class folder without images, images of different sizes
        (the message names two files of different sizes), a file Pillow cannot read, or a 16-bit,
        32-bit or float image mode (``"I;16"``, ``"I"``, ``"F"``; save those as 8-bit first).
      ImportError: Pillow is not installed (``pip install 'pejax[demo]'``).

    Example:
      >>> import os, tempfile
      >>> from PIL import Image
      >>> root = tempfile.mkdtemp()
      >>> for name in ("cat", "dog"):
      ...     os.mkdir(os.path.join(root, name))
      ...     Image.new("L", (5, 4)).save(os.path.join(root, name, "0.png"))
      >>> data = load_image_folder(root)
      >>> data.images.shape, data.labels.tolist(), data.class_names
      ((2, 4, 5, 1), [0, 1], ('cat', 'dog'))
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_image_folder needs Pillow; install it with pip install 'pejax[demo]'."
        ) from e
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"path {str(root)!r} is not a folder; give a folder with one subfolder per class."
        )
    class_dirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES]
        hint = (
            f" It holds {len(loose)} image files directly: move them into class subfolders."
            if loose
            else ""
        )
        raise ValueError(
            f"{str(root)!r} has no class subfolders; expected path/<class name>/<image file>.{hint}"
        )

    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = sorted(
            (
                p
                for p in class_dir.iterdir()
                if p.is_file()
                and not p.name.startswith(".")
                and p.suffix.lower() in _IMAGE_SUFFIXES
            ),
            key=lambda p: p.name,
        )
        if not class_files:
            raise ValueError(
                f"class folder {str(class_dir)!r} holds no image files (suffixes "
                f"{sorted(_IMAGE_SUFFIXES)}); add images or remove the folder."
            )
        files.extend((p, label) for p in class_files)

    # First pass: sizes and modes from the file headers only (Pillow decodes lazily).
    first_of_size: dict[tuple[int, int], Path] = {}
    all_grey = True
    for file, _ in files:
        try:
            with Image.open(file) as im:
                size, mode = im.size, im.mode
        except OSError as e:
            raise ValueError(f"Pillow cannot read {str(file)!r} ({e}); remove or repair it.") from e
        if mode not in _GREY_MODES | _COLOUR_MODES:
            raise ValueError(
                f"{str(file)!r} has Pillow mode {mode!r} (16-bit, 32-bit or float pixels), which "
                "is not read because converting it to 8 bits would clip values. Save it as 8-bit "
                "grey (L) or RGB."
            )
        all_grey = all_grey and mode in _GREY_MODES
        first_of_size.setdefault(size, file)
        if len(first_of_size) > 1:
            (w0, h0), (w1, h1) = first_of_size
            f0, f1 = first_of_size[(w0, h0)], first_of_size[(w1, h1)]
            raise ValueError(
                f"images in {str(root)!r} differ in size: {str(f0)!r} is {w0} x {h0} (width x "
                f"height) but {str(f1)!r} is {w1} x {h1}. Resize all images to one size first."
            )

    mode = "L" if all_grey else "RGB"
    arrays = []
    for file, _ in files:
        with Image.open(file) as im:
            arrays.append(np.asarray(im.convert(mode), dtype=np.uint8))
    images = np.stack(arrays).astype(np.float32) / np.float32(255.0)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.asarray([label for _, label in files], dtype=np.int32)
    return ImageFolder(images, labels, tuple(p.name for p in class_dirs))


__all__ = [
    "DigitsSplit",
    "ImageFolder",
    "LabeledImages",
    "load_digits_split",
    "load_image_folder",
    "load_npz",
]


class LabeledTexts(NamedTuple):
    """Texts with labels (and optional user ids), from :func:`load_texts`.

    Attributes:
      texts: N strings.
      labels: (N,) int32 in 0..len(class_names) - 1.
      class_names: the class names in label order (integer labels: ``"0"``, ``"1"``, ...).
      group_ids: (N,) user ids as read (strings or integers), or ``None``.
    """

    texts: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...]
    group_ids: np.ndarray | None


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        import json

        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"line {i} of {str(path)!r} is not valid JSON: {e}") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"line {i} of {str(path)!r} must be a JSON object such as "
                    f'{{"text": "...", "label": 0}}, got {type(row).__name__}.'
                )
            rows.append(row)
        return rows
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"text file {str(path)!r} must end in .jsonl or .csv.")


def load_texts(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    class_names: tuple[str, ...] | None = None,
) -> LabeledTexts:
    """Loads labelled texts from a JSONL file (one JSON object a line) or a CSV file with a header row.

    Labels are integers (JSON numbers, or CSV cells holding integers), used as they are, or class names,
    numbered in sorted order. Give ``class_names`` (those of the training file) to read a test file with the
    same numbering.

    Args:
      path: a ``.jsonl`` or ``.csv`` file.
      text_column: the key or column holding the text.
      label_column: the key or column holding the class.
      group_column: the key or column holding a user id (user-level privacy), or ``None``.
      class_names: known class names in label order (names in the file must be among them).

    Returns:
      ``LabeledTexts(texts, labels, class_names, group_ids)``.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: another suffix, malformed rows, a missing column (the message names the row), an empty
        file, negative labels, or names outside ``class_names``.

    Example:
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "t.csv")
      >>> _ = open(path, "w").write("text,label\\nfine day,sun\\nwet,rain\\n")
      >>> d = load_texts(path)
      >>> d.texts, d.labels.tolist(), d.class_names
      (['fine day', 'wet'], [1, 0], ('rain', 'sun'))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist.")
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"text file {str(path)!r} holds no rows.")
    columns = [("text_column", text_column), ("label_column", label_column)]
    if group_column is not None:
        columns.append(("group_column", group_column))
    texts, raw_labels, groups = [], [], []
    for i, row in enumerate(rows, start=1):
        for arg, col in columns:
            if col not in row or row[col] is None:
                raise ValueError(
                    f"row {i} of {str(path)!r} has no {col!r} ({arg}); its keys: {sorted(row)}."
                )
        text = row[text_column]
        if not isinstance(text, str):
            raise ValueError(
                f"row {i} of {str(path)!r}: {text_column!r} must be a string, got {text!r}."
            )
        texts.append(text)
        raw_labels.append(row[label_column])
        if group_column is not None:
            groups.append(row[group_column])

    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
        return None

    ints = [as_int(v) for v in raw_labels]
    if all(v is not None for v in ints):
        labels = np.asarray(ints, np.int64)
        if labels.min() < 0:
            raise ValueError(f"labels in {str(path)!r} must be >= 0, got {int(labels.min())}.")
        names = class_names or tuple(str(i) for i in range(int(labels.max()) + 1))
        if labels.max() >= len(names):
            raise ValueError(
                f"label {int(labels.max())} in {str(path)!r} is outside the {len(names)} known classes."
            )
    else:
        str_labels = [str(v) for v in raw_labels]
        names = class_names or tuple(sorted(set(str_labels)))
        index = {n: j for j, n in enumerate(names)}
        unknown = sorted(set(str_labels) - set(index))
        if unknown:
            raise ValueError(
                f"labels {unknown} in {str(path)!r} are not among the classes {list(names)}."
            )
        labels = np.asarray([index[v] for v in str_labels], np.int64)
    group_ids = None
    if group_column is not None:
        group_ids = np.asarray(
            groups if all(isinstance(g, int) for g in groups) else [str(g) for g in groups]
        )
    return LabeledTexts(texts, labels.astype(np.int32), tuple(names), group_ids)
