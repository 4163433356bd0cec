"""Class identity is the class name.

``ClassTable`` holds every class of a dataset (``all_class.txt``), its global id (the rank of its name in Python's
case-sensitive sort of ``all_class.txt``, as every reference does), the name-map from the ``original`` class name to
the ``manual`` name under which its text embedding is stored, and the text embeddings themselves.

The references pair class id ``c`` with the ``c``-th vector of the embedding dict sorted by *manual* key, which gives
many classes another class's vector (UCF 79/101, ActivityNet 8/200, VGGSound 205/309). The default here looks each
class up by name; ``text_order="official"`` reproduces the reference order.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avlowshot.errors import DataError

TEXT_ORDERS = ("by-name", "official")


def read_class_list(path: Path, *, sort: bool = True) -> list[str]:
    """One class name per line, stripped; sorted like the references' ``get_class_names``."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(
            "class list not found", path=path, fix="point --root-dir at the unpacked dataset folder"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not a UTF-8 text file ({exc})", path=path) from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError("class list is empty", path=path, fix="every split file lists at least one class")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataError(
                f"class '{name}' is listed twice", path=path, key=name, fix="list every class once (delete one line)"
            )
        seen.add(name)
    return sorted(names) if sort else names


def class_list_notes(path: Path) -> list[str]:
    """What ``read_class_list`` tidied up in a class list (CRLF line ends, spaces around names), for reports."""
    try:
        raw = path.read_bytes()
    except OSError:
        return []
    notes = []
    if b"\r\n" in raw:
        notes.append(f"{path}: CRLF line ends, read as plain line ends")
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    padded = sum(1 for line in lines if line.strip() and line != line.strip())
    if padded:
        notes.append(f"{path}: spaces around {padded} class name(s) stripped")
    return notes


def read_name_map(path: Path, key_column: str = "manual") -> dict[str, str]:
    """``original -> key_column`` from a ``*_class_names.csv`` (``original,manual[,category]``)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise DataError(
            "class-name map not found", path=path, fix="copy it from the authors' class-split folder"
        ) from None
    if not rows or "original" not in rows[0] or key_column not in rows[0]:
        raise DataError(f"expected columns 'original' and '{key_column}'", path=path, key=key_column)
    return {row["original"].strip(): row[key_column].strip() for row in rows}


@dataclass
class ClassTable:
    """All classes of a dataset, ids, and the text embedding of each, by name."""

    names: list[str]  # original names, sorted; id = position
    case_insensitive: bool  # UCF / ActivityNet look names up lower-cased (absorbs HandStandPushups vs HandstandPushups)
    text_key: list[str]  # per class id: the key of its embedding (``manual`` name)
    text: dict[str, np.ndarray]  # embedding key -> vector (float32)
    source: str = ""  # where the names came from, for messages
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for i, n in enumerate(self.names):
            other = self._index.setdefault(self._fold(n), i)
            if other != i:  # e.g. 'HandstandPushups' and 'HandStandPushups' in a case-insensitive dataset
                raise DataError(
                    f"classes '{self.names[other]}' and '{n}' differ only in case, which this dataset ignores",
                    path=self.source or None,
                    key=n,
                    fix="list every class once in all_class.txt",
                )

    def _fold(self, name: str) -> str:
        return name.lower() if self.case_insensitive else name

    def __len__(self) -> int:
        return len(self.names)

    def has(self, name: str) -> bool:
        return self._fold(name) in self._index

    def id_of(self, name: str, *, where: str | Path | None = None) -> int:
        try:
            return self._index[self._fold(name)]
        except KeyError:
            raise DataError(
                f"class '{name}' is not in all_class.txt",
                path=where or self.source,
                key=name,
                fix="fix the spelling of the class (file) name or add it to class-split/all_class.txt",
            ) from None

    def ids(self, names: list[str], *, where: str | Path | None = None) -> np.ndarray:
        return np.array(sorted(self.id_of(n, where=where) for n in names), dtype=np.int64)

    @property
    def text_dim(self) -> int:
        return int(next(iter(self.text.values())).shape[0])

    def embeddings(self, order: str = "by-name") -> torch.Tensor:
        """``[K, Dt]`` float32; row c is the text embedding of class id c.

        ``by-name``: the vector stored under the class's own (manual) name.
        ``official``: the reference behaviour, the c-th vector of the dict sorted by key.
        """
        if order == "by-name":
            rows = [self.text[k] for k in self.text_key]
        elif order == "official":
            values = [self.text[k] for k in sorted(self.text)]
            if len(values) < len(self.names):
                raise DataError(
                    f"official text order needs one vector per class ({len(self.names)}), found {len(values)}",
                    path=self.source,
                )
            rows = values[: len(self.names)]
        else:
            raise ValueError(f"unknown text order {order!r}; expected one of {TEXT_ORDERS}")
        return torch.from_numpy(np.stack(rows).astype(np.float32, copy=False))

    def misassigned_in_official_order(self) -> list[int]:
        """Class ids whose vector differs between the official and the by-name order."""
        keys = sorted(self.text)
        return [c for c, k in enumerate(self.text_key) if c < len(keys) and keys[c] != k]


def build_class_table(
    all_class_file: Path,
    name_map: dict[str, str] | None,
    text: dict[str, np.ndarray],
    *,
    case_insensitive: bool,
    text_file: Path | None = None,
    expected_dim: int | None = None,
) -> ClassTable:
    """Resolve each class's embedding key through the ``original -> manual`` map and check the text table."""
    names = read_class_list(all_class_file)
    where = text_file or all_class_file
    folded_map = {}
    if name_map is not None:
        folded_map = {(k.lower() if case_insensitive else k): v for k, v in name_map.items()}
    keys = []
    for name in names:
        key = folded_map.get(name.lower() if case_insensitive else name, name)
        if key not in text:
            raise DataError(
                f"class '{name}' (embedding key '{key}') has no text embedding",
                path=where,
                key=key,
                fix="add the class's vector to the embedding file or fix the name in the *_class_names.csv map",
            )
        keys.append(key)
    for key, vec in text.items():
        arr = np.asarray(vec)
        if arr.ndim != 1 or (expected_dim is not None and arr.shape[0] != expected_dim):
            raise DataError(
                f"embedding has shape {arr.shape}, expected ({expected_dim},)",
                path=where,
                key=str(key),
                fix="use the embedding file that belongs to this layout",
            )
        if not np.isfinite(arr.astype(np.float64)).all():
            raise DataError("embedding contains NaN or Inf", path=where, key=str(key), fix="re-extract the embeddings")
    text32 = {k: np.asarray(v, dtype=np.float32) for k, v in text.items()}
    return ClassTable(
        names=names, case_insensitive=case_insensitive, text_key=keys, text=text32, source=str(all_class_file)
    )
