"""The pack's file inputs and saves, shared by every Load/Save node: a safetensors file in a pack folder ->
object, and object -> a new numbered file that never replaces an earlier one.

- file_input(): a combo of the folder's safetensors files; the node-wide input checks (nodes/validation.py)
  refuse a name that is not there when the prompt is queued, with a message that names the folder.
- load_file(): the name -> full path -> the format's reader, with the same message at run time.
- prefix_input() / save_numbered(): the host's counter convention (<prefix>_00001_.safetensors, the next free
  number in that folder); empty, hidden (a part starting with '.') and escaping ('..', absolute) prefixes are
  refused naming filename_prefix; the name is reserved with an exclusive create, so two saves never share one."""
import logging
import os
import re

import folder_paths
from comfy_api.latest import io, ui

from ..folders import IDENTITIES, folder_label, safetensors_files

log = logging.getLogger("likeness")

PREFIX = "filename_prefix"
_FORBIDDEN = re.compile(r'[<>:"|?*\x00-\x1f]')   # not portable in a file name (Windows), or a drive letter


class FileInput(io.Combo.Input):
    """A combo of the safetensors files of one pack folder (folder_key is a folders.PACK_FOLDERS key)."""

    def __init__(self, id: str, folder_key: str, tooltip: str = None, optional: bool = False):
        super().__init__(id, options=safetensors_files(folder_key), tooltip=tooltip, optional=optional)
        self.folder_key = folder_key


class PrefixInput(io.String.Input):
    """filename_prefix of a Save node; checked when the prompt is queued (nodes/validation.py) and again on save."""


def file_input(name: str, folder_key: str, tooltip: str = None, optional: bool = False) -> FileInput:
    return FileInput(name, folder_key, tooltip=tooltip, optional=optional)


def prefix_input(default: str) -> PrefixInput:
    return PrefixInput(PREFIX, default=default, tooltip="sub/folder/name inside the folder; a new numbered file each save")


def missing_file_message(input_name: str, folder_key: str, name) -> str:
    listed = safetensors_files(folder_key)
    where = ", ".join(folder_paths.get_folder_paths(folder_key))
    hint = f"files there: {', '.join(listed[:8])}{' ...' if len(listed) > 8 else ''}" if listed else "that folder has no .safetensors file"
    return (f"{input_name}: '{name}' is not in {folder_label(folder_key)} ({where}); {hint}. Put the file there "
            "(or pick one that is), then refresh the node list (press r in the editor)")


def check_file_name(input_name: str, folder_key: str, name):
    """None when name is one of the folder's safetensors files, else the message to show."""
    if isinstance(name, str) and name in safetensors_files(folder_key):
        return None
    return missing_file_message(input_name, folder_key, name)


def resolve(folder_key: str, name: str, input_name: str) -> str:
    problem = check_file_name(input_name, folder_key, name)
    path = None if problem else folder_paths.get_full_path(folder_key, name)
    if path is None:
        raise ValueError(problem or missing_file_message(input_name, folder_key, name))
    return path


def load_file(folder_key: str, name: str, input_name: str, reader):
    """reader(full path) for a file picked in a file_input()."""
    return reader(resolve(folder_key, name, input_name))


def check_filename_prefix(prefix) -> str | None:
    """None when the prefix is a safe relative name, else the message naming filename_prefix."""
    text = prefix if isinstance(prefix, str) else ""
    cleaned = text.strip().replace("\\", "/")
    parts = [p for p in cleaned.split("/")]
    if not cleaned or not parts[-1]:
        return f"{PREFIX}: '{text}' gives no file name; write one such as 'faces/alice'"
    if cleaned.startswith("/") or os.path.isabs(text) or re.match(r"^[A-Za-z]:", cleaned):
        return f"{PREFIX}: '{text}' is an absolute path; write a name inside the folder, such as 'faces/alice'"
    if any(p in ("..", ".") for p in parts):
        return f"{PREFIX}: '{text}' leaves the folder ('..' or '.'); write a name inside it, such as 'faces/alice'"
    if any(p.startswith(".") for p in parts):
        return f"{PREFIX}: '{text}' would make a hidden file or folder (a part starts with '.'); drop the dot"
    if any(not p for p in parts):
        return f"{PREFIX}: '{text}' has an empty folder name ('//'); write a name such as 'faces/alice'"
    if _FORBIDDEN.search(cleaned):
        return f"{PREFIX}: '{text}' has a character that is not allowed in file names (<>:\"|?* or a control character)"
    return None


def _reserve(folder: str, filename: str, counter: int, ext: str) -> str:
    """Create the first free <filename>_<counter>_<ext> exclusively; returns its path."""
    while True:
        path = os.path.join(folder, f"{filename}_{counter:05}_{ext}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return path
        except FileExistsError:
            counter += 1


def save_numbered(folder_key: str, filename_prefix: str, writer, ext: str = ".safetensors") -> tuple[str, str]:
    """writer(path) writes the object to a new numbered file in the folder; returns (full path, path relative to
    the folder). Nothing is left behind when the writer fails."""
    problem = check_filename_prefix(filename_prefix)
    if problem:
        raise ValueError(problem)
    root = folder_paths.get_folder_paths(folder_key)[0]
    os.makedirs(root, exist_ok=True)
    prefix = filename_prefix.strip().replace("\\", "/")
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
    os.makedirs(folder, exist_ok=True)
    path = _reserve(folder, filename, counter, ext)
    try:
        writer(path)
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise
    return path, os.path.relpath(path, root).replace(os.sep, "/")


def save_node_output(folder_key: str, filename_prefix: str, writer, what: str, note: str) -> io.NodeOutput:
    """A Save node's whole run: write, log, and show 'saved <name> (<note>)' on the node."""
    path, rel = save_numbered(folder_key, filename_prefix, writer)
    log.info("Likeness: saved %s to %s", what, path)
    return io.NodeOutput(ui=ui.PreviewText(f"saved {rel} ({note})"))


def file_loader_node(node_id: str, display_name: str, category: str, description: str, input_name: str,
                     folder_key: str, output_type, output_name: str, reader):
    """A Load node class: one file_input() -> reader(full path) -> one output."""

    class FileLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, display_name=display_name, category=category, description=description,
                             inputs=[file_input(input_name, folder_key)],
                             outputs=[output_type.Output(display_name=output_name)])

        @classmethod
        def execute(cls, *args, **inputs) -> io.NodeOutput:   # the host passes keywords; scripts may not
            name = args[0] if args else inputs[input_name]
            return io.NodeOutput(load_file(folder_key, name, input_name, reader))

    FileLoader.__name__ = FileLoader.__qualname__ = node_id
    return FileLoader


def save_node(node_id: str, display_name: str, category: str, description: str, input_type, input_name: str,
              default_prefix: str, writer, what: str, describe):
    """A Save node class: writer(path, value) into a new numbered file of the identities folder; the node shows
    'saved <name> (<describe(value)>)'."""
    class Save(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id=node_id, display_name=display_name, category=category, description=description,
                             is_output_node=True, inputs=[input_type.Input(input_name), prefix_input(default_prefix)],
                             outputs=[])

        @classmethod
        def execute(cls, *args, **inputs) -> io.NodeOutput:   # (value, filename_prefix), as keywords or in order
            inputs.update(zip((input_name, PREFIX), args))
            value, prefix = inputs[input_name], inputs[PREFIX]
            return save_node_output(IDENTITIES, prefix, lambda path: writer(path, value), what, describe(value))

    Save.__name__ = Save.__qualname__ = node_id
    return Save
