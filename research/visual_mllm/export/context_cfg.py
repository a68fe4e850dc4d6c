"""The MindSpore Lite `context.cfg` (an INI file) that configures Ascend inference.

    [ascend_context]
    plugin_custom_ops=All
    provider=ge
    [ge_session_options]
    ge.exec.formatMode=1
    ...

Parsed strictly so that a typo is caught here with its line number, not deep inside the runtime.
"""
import os
import re

SECTIONS = ("ascend_context", "ge_session_options", "ge_graph_options", "graph_kernel_param")


class ContextConfigError(ValueError):
    """context.cfg is missing or malformed; the message names the file and line."""


def parse_context_cfg(path):
    """{section: {key: value}} of a context.cfg file."""
    if not os.path.isfile(path):
        raise ContextConfigError(f"context.cfg not found: {path}")
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            header = re.fullmatch(r"\[([^\]]*)\]", line)
            if header:
                current = header.group(1).strip()
                if current not in SECTIONS:
                    raise ContextConfigError(f"{path} line {number}: unknown section [{current}]; "
                                             f"expected one of {', '.join(SECTIONS)}")
                if current in sections:
                    raise ContextConfigError(f"{path} line {number}: section [{current}] appears twice")
                sections[current] = {}
                continue
            if current is None:
                raise ContextConfigError(f"{path} line {number}: '{line}' comes before any [section]")
            key, sep, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key or not value:
                raise ContextConfigError(f"{path} line {number}: expected key=value, got '{line}'")
            if key in sections[current]:
                raise ContextConfigError(f"{path} line {number}: {key} is set twice in [{current}]")
            sections[current][key] = value
    if "ascend_context" not in sections:
        raise ContextConfigError(f"{path}: has no [ascend_context] section")
    return sections
