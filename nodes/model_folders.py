"""The ComfyUI folders this pack reads and writes, and the one file policy of the pack.

Reading: a file name from the UI is used only if the registered folder lists it (ComfyUI's
folder_paths, or input/<subfolder>); it is joined to that folder lexically, so absolute names
and '..' never leave it. The listed entry itself may be a symlink, and it is followed: users
link big model files and dataset folders in, as ComfyUI core allows.

Writing (`output_path`): a plain file name (no separators, no leading dot, no NUL) in the first
registered folder of a key, never through a symlink, never outside that folder, and never over
an existing file unless the node's `overwrite` input is on.
"""
from __future__ import annotations

import os

import folder_paths

AUDIOTOKEN_FOLDER = "audiotoken"
AUDIO_ENCODER_FOLDER = "audio_encoders"  # core ComfyUI's folder; we add it only where core lacks it
FEATURE_CACHE_FOLDER = "audiotoken_cache"  # training's encoder-output cache, one subfolder per dataset
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin"}


def register_folder(name: str, extensions) -> None:
    """Add models/<name>, keeping the paths extra_model_paths.yaml (or core) added.

    A key that already lists extensions keeps its list as it is (core's own folders, such as
    audio_encoders, stay as core made them); a new key, or one extra_model_paths.yaml created
    without extensions, gets `extensions`.
    """
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, known = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, known or set(extensions))
    else:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


def register_model_folders() -> None:
    """Add models/audiotoken, models/audio_encoders and models/audiotoken_cache, keeping paths extra_model_paths.yaml added."""
    for name in (AUDIOTOKEN_FOLDER, AUDIO_ENCODER_FOLDER):
        register_folder(name, WEIGHT_EXTENSIONS)
    register_folder(FEATURE_CACHE_FOLDER, {".safetensors"})  # a model folder so extra_model_paths.yaml can move it


def list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files of a registered folder whose names end in one of `suffixes`, sorted."""
    return sorted(f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes))


def resolve(folder: str, name: str) -> str:
    """A listed file name -> its path in the folder (the read rule above: no '..', the entry may be a link)."""
    try:
        return folder_paths.get_full_path_or_raise(folder, name)
    except FileNotFoundError as exc:
        places = ", ".join(folder_paths.get_folder_paths(folder)) or "(none)"
        raise FileNotFoundError(
            f"Model file '{name}' was not found in the '{folder}' folders ({places}). "
            f"Put the file there and press 'r' in ComfyUI to refresh the lists."
        ) from exc


def missing_file_message(folder: str, name, suffixes: tuple[str, ...]) -> str | None:
    """For validate_inputs: why `name` cannot be loaded from `folder`, or None if it can."""
    if not isinstance(name, str):
        return f"Expected a file name from the list, got {type(name).__name__} {name!r}; pick a file from the list."
    if name in list_files(folder, suffixes):
        return None
    places = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
    return (f"'{name}' is not among the {'/'.join(suffixes)} files in the '{folder}' folders ({places}). "
            f"Put the file there, press 'r' to refresh, and pick it from the list.")


def input_subfolders(subfolder: str) -> list[str]:
    """Folder names inside ComfyUI's input/<subfolder> (datasets, evaluation sets), sorted; hidden ones skipped."""
    root = os.path.join(folder_paths.get_input_directory(), subfolder)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def transformers_folders(*folders: str) -> list[str]:
    """Names of transformers model folders (a config.json inside) in the given model folders, sorted."""
    found = set()
    for folder in folders:
        for base in folder_paths.get_folder_paths(folder):
            if os.path.isdir(base):
                found.update(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "config.json")))
    return sorted(found)


def transformers_folder_path(name: str, *folders: str) -> str:
    """The absolute path of a folder `transformers_folders(*folders)` lists (never outside its model folder)."""
    for folder in folders:
        for base in folder_paths.get_folder_paths(folder):
            if os.path.isfile(os.path.join(base, name, "config.json")):
                return listed_path(base, name, "Model folder")
    places = " or ".join(f"models/{f}" for f in folders)
    raise FileNotFoundError(f"'{name}' is not a transformers model folder (with config.json) in {places}; "
                            f"put the folder there (config.json, safetensors, processor files) and press 'r' to refresh.")


def output_name_problem(name) -> str | None:
    """For validate_inputs and `output_path`: why `name` is not a plain file name, or None if it is."""
    if not isinstance(name, str):
        return f"The output name must be text, got {type(name).__name__} {name!r}; type a file name."
    if not name.strip() or name.strip() != name or name.startswith(".") or any(c in name for c in "\0/\\"):
        return (f"The output name {name!r} is not a plain file name: use letters, digits, '-' or '_', without "
                "'/', '\\', NUL, a leading '.' or surrounding spaces.")
    return None


def file_fingerprint(path: str) -> str:
    """Identifies a file's content (size, mtime_ns and sha256), so ComfyUI reloads a file rewritten under the same name."""
    import hashlib

    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"{stat.st_size}:{stat.st_mtime_ns}:{digest.hexdigest()}"


def output_path(folder_key: str, name, extension: str, *, overwrite: bool = False) -> str:
    """Where a node writes the model file `name` + `extension`: the pack's one policy for writes.

    The file goes into the FIRST registered folder of `folder_key` (created if missing). Refused
    with a ValueError that says the fix: a name that is not a plain file name (not a str, empty,
    NUL, path separators, ".", "..", a leading dot), a target that is a symlink or would land
    outside that folder, and an existing file unless `overwrite` is True.
    """
    problem = output_name_problem(name)
    if problem:
        raise ValueError(problem)
    if extension and name.lower().endswith(extension.lower()):
        name = name[: -len(extension)]
    base = folder_paths.get_folder_paths(folder_key)[0]
    os.makedirs(base, exist_ok=True)
    path = os.path.join(os.path.abspath(base), name + extension)
    if os.path.islink(path):
        raise ValueError(f"{path} is a symlink; the pack never writes through links. Remove the link or pick another name.")
    path_inside(base, name + extension, "Output name")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path} already exists; turn on 'overwrite' to replace it, or pick another name.")
    return path


def listed_path(base: str, name: str, what: str) -> str:
    """The path of an entry that a listing of `base` showed (the read rule of the module docstring):
    joined lexically, refusing absolute names, '.' and '..'; the entry itself may be a symlink."""
    base = os.path.abspath(base)
    path = os.path.normpath(os.path.join(base, name))
    if path == base or os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} '{name}' points outside {base}; pick an entry of that folder.")
    return path


def path_inside(base: str, name: str, what: str) -> str:
    """`base/name` with symlinks resolved, refusing names that land outside `base` (for writes)."""
    base = os.path.realpath(base)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} '{name}' points outside {base}; pick a file inside that folder.")
    return path
