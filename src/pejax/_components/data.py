"""Built-in data sources of :mod:`pejax.registry` (imported by it; heavy imports stay inside each builder)."""

from __future__ import annotations

import numpy as np

from pejax import _validate
from pejax.registry import REQUIRED
from pejax.registry import Dataset
from pejax.registry import Option
from pejax.registry import check_path
from pejax.registry import register


def _group_ids(values: np.ndarray, n: int, where: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise ValueError(
            f"{where} must hold one user id per private sample ({n},), got shape {values.shape}."
        )
    if values.dtype.kind in "iu":
        return values.astype(np.int64)
    if values.dtype.kind in "USO":
        return np.unique(values.astype(str), return_inverse=True)[1].astype(np.int64)
    raise TypeError(f"{where} must hold integer or string user ids, got dtype {values.dtype}.")


@register(
    "data",
    "digits",
    doc="scikit-learn's bundled 8 x 8 digits (1347 private, 450 held out for evaluation)",
    extra="demo",
    modality="image",
)
def _digits(opts, ctx):
    from pejax.data import load_digits_split

    s = load_digits_split()
    names = tuple(str(i) for i in range(10))
    return Dataset(
        s.train_images, s.train_labels, s.test_images, s.test_labels, None, names, "image"
    )


@register(
    "data",
    "npz",
    doc="an .npz archive of images and labels (never unpickled); optional user ids",
    modality="image",
    options=(
        Option("path", REQUIRED, "the private .npz archive"),
        Option("test_path", None, "a held-out .npz for evaluation"),
        Option(
            "images_key",
            "images",
            "name of the images array (N, H, W[, C]), uint8 or float in [0, 1]",
        ),
        Option("labels_key", "labels", "name of the labels array (N,)"),
        Option("group_ids_key", None, "name of a (N,) user-id array: user-level privacy"),
    ),
)
def _npz(opts, ctx):
    from pejax.data import load_npz

    kw = {"images_key": opts["images_key"], "labels_key": opts["labels_key"]}
    path = check_path("data.path", opts["path"])
    train = load_npz(path, **kw)
    groups = None
    if opts["group_ids_key"] is not None:
        key = opts["group_ids_key"]
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise KeyError(
                    f"{path!r} has no array {key!r} (data.group_ids_key); arrays present: {sorted(archive.files)}."
                )
            try:
                raw = archive[key]
            except ValueError as e:
                raise ValueError(
                    f"array {key!r} in {path!r} holds Python objects, never unpickled."
                ) from e
        groups = _group_ids(raw, len(train.labels), f"data.group_ids_key array {key!r}")
    test = (
        None
        if opts["test_path"] is None
        else load_npz(check_path("data.test_path", opts["test_path"]), **kw)
    )
    return Dataset(
        train.images,
        train.labels,
        None if test is None else test.images,
        None if test is None else test.labels,
        groups,
        None,
        "image",
    )


@register(
    "data",
    "folder",
    doc="a folder with one subfolder of images per class (the class names are the folder names)",
    extra="demo",
    modality="image",
    options=(
        Option("path", REQUIRED, "root folder: path/<class name>/<image file>"),
        Option("test_path", None, "a held-out folder of the same layout for evaluation"),
    ),
)
def _folder(opts, ctx):
    from pejax.data import load_image_folder

    train = load_image_folder(check_path("data.path", opts["path"]))
    test = None
    if opts["test_path"] is not None:
        test = load_image_folder(check_path("data.test_path", opts["test_path"]))
        if test.class_names != train.class_names:
            raise ValueError(
                f"data.test_path has classes {list(test.class_names)} but data.path has "
                f"{list(train.class_names)}; both need the same class folders."
            )
    return Dataset(
        train.images,
        train.labels,
        None if test is None else test.images,
        None if test is None else test.labels,
        None,
        train.class_names,
        "image",
    )


@register(
    "data",
    "text",
    doc="texts with labels from a JSONL or CSV file; optional user ids",
    modality="text",
    options=(
        Option("path", REQUIRED, "the private .jsonl or .csv file"),
        Option("test_path", None, "a held-out file of the same layout for evaluation"),
        Option("text_column", "text", "the column (JSONL key) holding the text"),
        Option("label_column", "label", "the column holding the class (integers or names)"),
        Option("group_column", None, "a column of user ids: user-level privacy"),
        Option("max_bytes", 2048, "private texts are cut to this many UTF-8 bytes"),
    ),
)
def _text(opts, ctx):
    from pejax.data import load_texts
    from pejax.generators.text_codec import encode_texts

    max_bytes = _validate.positive_int("data.max_bytes", opts["max_bytes"])
    cols = {k: opts[k] for k in ("text_column", "label_column", "group_column")}
    train = load_texts(check_path("data.path", opts["path"]), **cols)
    test = None
    if opts["test_path"] is not None:
        test = load_texts(
            check_path("data.test_path", opts["test_path"]),
            **cols | {"group_column": None},
            class_names=train.class_names,
        )
    groups = None
    if train.group_ids is not None:
        groups = _group_ids(
            train.group_ids, len(train.labels), f"data.group_column {opts['group_column']!r}"
        )
    return Dataset(
        encode_texts(train.texts, max_bytes),
        train.labels,
        None if test is None else encode_texts(test.texts, max_bytes),
        None if test is None else test.labels,
        groups,
        train.class_names,
        "text",
    )
