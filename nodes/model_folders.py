"""The ComfyUI model folders this pack reads, registered without disturbing user config."""
from __future__ import annotations

import os

import folder_paths

AUDIOTOKEN_FOLDER = "audiotoken"
AUDIO_ENCODER_FOLDER = "audio_encoders"  # core ComfyUI's folder; we add it only where core lacks it
WEIGHT_EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".json"}


def register_folder(name: str, extensions) -> None:
    """Add models/<name> for `extensions`, keeping the paths extra_model_paths.yaml (or core) added."""
    default = os.path.join(folder_paths.models_dir, name)
    if name in folder_paths.folder_names_and_paths:
        paths, known = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[name] = (paths, set(known) | set(extensions))
    else:
        folder_paths.folder_names_and_paths[name] = ([default], set(extensions))


def register_model_folders() -> None:
    """Add models/audiotoken and models/audio_encoders, keeping paths extra_model_paths.yaml added."""
    for name in (AUDIOTOKEN_FOLDER, AUDIO_ENCODER_FOLDER):
        register_folder(name, WEIGHT_EXTENSIONS)


def list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files of a registered folder whose names end in one of `suffixes`, sorted."""
    return sorted(f for f in folder_paths.get_filename_list(folder) if f.lower().endswith(suffixes))


def resolve(folder: str, name: str) -> str:
    """A listed file name -> absolute path inside the folder (never outside it)."""
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
    if not isinstance(name, str) or name in list_files(folder, suffixes):
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
                return path_inside(base, name, "Model folder")
    places = " or ".join(f"models/{f}" for f in folders)
    raise FileNotFoundError(f"'{name}' is not a transformers model folder (with config.json) in {places}; "
                            f"put the folder there (config.json, safetensors, processor files) and press 'r' to refresh.")


def path_inside(base: str, name: str, what: str) -> str:
    """`base/name` resolved, refusing names that point outside `base` (UI values are untrusted)."""
    base = os.path.realpath(base)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"{what} '{name}' points outside {base}; pick a file inside that folder.")
    return path
