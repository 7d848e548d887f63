"""The files of a saved model: whether a dir holds a whole HF model (`hf_model_problem`: every
weights and JSON file read back, none truncated), and which files a fastrlhf save wrote into a dir
(`MODEL_MANIFEST`), so that the next save replaces exactly those and never deletes anything else."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from typing import List, Optional

# Every save writes the names of the files it put into out_dir to MODEL_MANIFEST. The next save
# into that dir removes the files of that list it does not write again (so that e.g. a stale LoRA
# adapter or value head is never loaded on top of new weights) and nothing else: out_dir may be a
# dir of the user's (--overwrite_output_dir), whose files are never fastrlhf's to delete.
MODEL_MANIFEST = "fastrlhf_saved_files.json"
# files only fastrlhf writes, removed even when a save of an older fastrlhf left no manifest
_FASTRLHF_ONLY_FILES = ("fastrlhf_lora.json", "fastrlhf_lora.safetensors", "reward_model.json",
                        "value_head.safetensors")


def saved_files(out_dir: str) -> List[str]:
    """The files the last fastrlhf save wrote into out_dir ([] when none did)."""
    try:
        with open(os.path.join(out_dir, MODEL_MANIFEST)) as f:
            files = json.load(f).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in files if isinstance(n, str) and n == os.path.basename(n) and n not in (".", "..")]


def move_into_place(stage: str, out_dir: str) -> None:
    """The files of a finished save in `stage` replace the previous save's in out_dir."""
    new = set(os.listdir(stage))
    for name in set(saved_files(out_dir)) | set(_FASTRLHF_ONLY_FILES):
        path = os.path.join(out_dir, name)
        if name not in new and os.path.isfile(path):
            os.remove(path)
    for name in sorted(new, key=lambda n: n == "config.json"):  # config.json last: a dir without it is no model
        dest = os.path.join(out_dir, name)
        if os.path.isdir(dest) and not os.path.islink(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(stage, name), dest)
    os.rmdir(stage)
    tmp = os.path.join(out_dir, MODEL_MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"files": sorted(new)}, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MODEL_MANIFEST))


def safetensors_problem(path: str) -> Optional[str]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path} is truncated ({size} bytes)"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"{path} is truncated (its header alone needs {8 + n} bytes, the file has {size})"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return f"{path} has an unreadable header"
    if 8 + n + end != size:
        return f"{path} is truncated ({size} bytes of {8 + n + end})"
    return None


def torch_file_problem(path: str) -> Optional[str]:
    """A torch.save file (a zip archive): its directory is readable and every member lies inside."""
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path} is truncated"
    except (OSError, zipfile.BadZipFile) as e:
        return f"{path} is damaged or truncated ({e})"
    return None


def json_problem(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            json.load(f)
    except ValueError as e:
        return f"{path} is not valid JSON ({e})"
    except OSError as e:
        return f"{path} cannot be read ({e.strerror})"
    return None


def hf_model_problem(path: str) -> Optional[str]:
    """Why the HF model dir `path` is not whole (naming the file), or None: config.json parses, and
    there are weights (or a LoRA adapter), none of them truncated."""
    if not os.path.isfile(os.path.join(path, "config.json")) and \
            not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return f"{path} has no config.json"
    weights = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".json"):
            problem = json_problem(full)
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(full)
            weights.append(name)
        elif name.endswith(".bin"):
            problem = torch_file_problem(full)
            weights.append(name)
        else:
            continue
        if problem:
            return problem
    if not weights:
        return f"{path} holds no weights file (*.safetensors / *.bin)"
    return None
