"""docs/troubleshooting.md lists every message the pack can show (tools/error_catalog.py)."""
from __future__ import annotations

import textwrap

from tools import error_catalog as ec


def test_collects_literal_fstring_joined_and_validation_messages(tmp_path):
    (tmp_path / "nodes").mkdir()
    (tmp_path / "audiotoken_core").mkdir()
    (tmp_path / "nodes" / "n.py").write_text(textwrap.dedent('''
        class Node:
            @classmethod
            def validate_inputs(cls, seconds):
                if seconds < 0:
                    return f"seconds={seconds} is negative; use 0 or more"
                return True

        def missing_message(name):
            return "no file " + name + "; put it in models/x"

        def check(x, ok):
            if x is None:
                raise PromptError("no prompt; write one")
            what = "a BEATs file" if ok else "an unknown file"
            raise ValueError(f"got {x!r}: " + what)
            raise ValueError(x)  # built at run time: nothing to list
        '''))
    found = ec.collect(tmp_path)
    assert [(m.kind, m.text) for m in found] == [
        ("validation", "seconds={seconds} is negative; use 0 or more"),
        ("message from missing_message()", "no file {name}; put it in models/x"),
        ("PromptError", "no prompt; write one"),
        ("part of a message", "a BEATs file"),
        ("part of a message", "an unknown file"),
        ("ValueError", "got {x!r}: {what}"),
    ]
    assert all(m.module == "nodes/n.py" for m in found)


def test_render_escapes_table_cells_and_replaces_only_the_generated_part():
    messages = [ec.Message("nodes/n.py", 1, "ValueError", "a | b <audio>\n  c")]
    doc = ec.updated_document("# Title\n\nhand-written\n", messages)
    assert doc.startswith("# Title\n\nhand-written\n\n" + ec.BEGIN)
    assert "| ValueError | a \\| b &lt;audio> c |" in doc
    again = ec.updated_document(doc + "after\n", [])
    assert "hand-written" in again and "a \\| b" not in again and again.endswith(ec.END + "\nafter\n")


def test_the_troubleshooting_document_is_up_to_date():
    current = ec.DOCUMENT.read_text(encoding="utf-8")
    assert current == ec.updated_document(current, ec.collect()), "run: python -m tools.error_catalog"
    assert current.count("\n| ") > 200  # the pack has hundreds of checks; a broken collector would find few
