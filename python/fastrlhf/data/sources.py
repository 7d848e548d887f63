"""Read one dataset (local json/jsonl/parquet file, save_to_disk folder, or HF hub name) into rows.

Rows are plain dicts; a source keeps its train rows and, when the dataset ships one, its
test rows. Every failure to read becomes a DataError naming the path and the fix.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from fastrlhf.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
TEST_SPLIT_NAMES = ("test", "validation", "eval")


@dataclass
class Source:
    name: str                       # the path or hub name, used in every error message
    train: list[dict]
    test: list[dict] | None = None
    fingerprint: str = ""           # changes when the data changes (cache key)
    columns: list[str] = field(default_factory=list)


def _stat_fingerprint(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def source_fingerprint(name: str) -> str:
    """Changes when a local file or folder changes; a hub name is taken as is (HF caches it)."""
    if os.path.isfile(name):
        return _stat_fingerprint(name)
    if os.path.isdir(name):
        return ";".join(_stat_fingerprint(os.path.join(root, f))
                        for root, _, files in sorted(os.walk(name)) for f in sorted(files))
    return f"hub:{name}"


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg}). Fix: each line of "
                                f"a .jsonl file must be one JSON object like "
                                f'{{"prompt": "...", "chosen": "...", "rejected": "..."}}') from None
    return rows


def _read_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)       # a .json file written as JSON Lines, as HF accepts too
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif lists and all(len(v) == len(lists[0]) for v in lists) and len(lists) == len(data):
            data = [dict(zip(data, values)) for values in zip(*data.values())]   # columnar
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold a list of objects (rows); got "
                        f"{type(data).__name__}. Fix: write [{{\"prompt\": ..., ...}}, ...] or JSON Lines")
    return data


def _read_parquet(path: str) -> list[dict]:
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()


def _rows_of(dataset) -> list[dict]:
    return dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) for r in dataset]


def _from_dataset_dict(name: str, dd) -> tuple[list[dict], list[dict] | None]:
    if hasattr(dd, "keys"):
        if "train" not in dd:
            if len(dd) != 1:
                raise DataError(f"{name}: has splits {list(dd.keys())} but no 'train' split. Fix: "
                                f"name the training split 'train'")
            return _rows_of(next(iter(dd.values()))), None
        test = next((dd[s] for s in TEST_SPLIT_NAMES if s in dd), None)
        return _rows_of(dd["train"]), (_rows_of(test) if test is not None else None)
    return _rows_of(dd), None


def read_source(name: str) -> Source:
    """Load ``name``: a local .json/.jsonl/.parquet file, a save_to_disk folder, or a hub name."""
    if os.path.isfile(name):
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{name}: unsupported file type {suffix!r}. Fix: use one of "
                            f"{LOCAL_SUFFIXES}, a datasets.save_to_disk folder, or a hub name")
        try:
            reader = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}[suffix]
            rows = reader(name)
        except DataError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e}). Fix: check that "
                            f"it is a readable, valid {suffix} file") from None
        except Exception as e:  # pyarrow raises its own error types for a corrupt parquet file
            raise DataError(f"{name}: cannot read the file ({type(e).__name__}: {e}). Fix: check that "
                            f"it is a readable, valid {suffix} file") from None
        return Source(name, rows, None, _stat_fingerprint(name))
    if os.path.isdir(name):
        import datasets
        try:
            dd = datasets.load_from_disk(name)
        except Exception as e:
            raise DataError(f"{name}: is a folder but not a datasets.save_to_disk folder ({e}). Fix: "
                            f"point at a file, or save the dataset with Dataset.save_to_disk") from None
        train, test = _from_dataset_dict(name, dd)
        return Source(name, train, test, source_fingerprint(name))
    if os.path.splitext(name)[1].lower() in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise DataError(f"{name}: no such file or folder. Fix: check the path (relative paths are "
                        f"taken from {os.getcwd()})")
    import datasets
    try:
        dd = datasets.load_dataset(name)
    except Exception as e:
        raise DataError(f"{name}: not a local file or folder, and datasets.load_dataset({name!r}) failed "
                        f"({type(e).__name__}: {e}). Fix: check the path or the hub name and network "
                        f"access") from None
    train, test = _from_dataset_dict(name, dd)
    return Source(name, train, test, source_fingerprint(name))
